"""Print how the installed releases differ from the ones CI last passed with (constraints.txt).

`make test-latest` runs this before the tests, so that a failure against the newest releases comes
with the list of packages that moved; it never fails by itself.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from packaging.utils import canonicalize_name


def pins(file: Path) -> dict[str, str]:
    out = {}
    for line in file.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[canonicalize_name(name)] = version.strip()
    return out


def main() -> int:
    file = Path(sys.argv[1] if len(sys.argv) > 1 else "constraints.txt")
    tested = pins(file)
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    moved = [(n, tested[n], installed[n]) for n in sorted(tested) if n in installed and installed[n] != tested[n]]
    if not moved:
        print(f"drift: none -- every installed release is the one in {file}")
        return 0
    print(f"drift: {len(moved)} release(s) differ from {file} (what CI last passed with):")
    for name, was, now in moved:
        print(f"  {name:<24} tested {was:<14} installed {now}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
