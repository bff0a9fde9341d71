"""Packaging: the version the CLI prints, every module imports, and the wheel holds every file.

The full check (a fresh venv, the wheel installed, used from outside the repository) is
``.ci/wheel_check.sh``; these are the quick ones.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import pkgutil
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import fastmerge
from fastmerge import cli
from fastmerge._optional import OPTIONAL, MissingDependency, missing, require

ROOT = Path(__file__).resolve().parents[1]


def test_version_flag_prints_the_distribution_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out == f"fastmerge {importlib.metadata.version('fastmerge')}\n"
    assert importlib.metadata.version("fastmerge") == fastmerge.__version__


def test_version_falls_back_to_the_package_attribute(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert cli.version() == fastmerge.__version__


def test_version_flag_from_the_console_entry():
    r = subprocess.run([sys.executable, "-m", "fastmerge", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"fastmerge {importlib.metadata.version('fastmerge')}\n"


def _modules() -> list[str]:
    """Every module of the package. An editable install maps fastmerge.kernels to kernels/ with an
    import hook that pkgutil does not see inside fastmerge/, so that subtree is walked on its own
    too (from a wheel the first walk finds it already)."""
    import fastmerge.kernels

    names = {"fastmerge", "fastmerge.kernels"}
    for pkg in (fastmerge, fastmerge.kernels):
        names.update(m.name for m in pkgutil.walk_packages(pkg.__path__, f"{pkg.__name__}."))
    # __main__ is `python -m fastmerge`: importing it runs the CLI
    return sorted(n for n in names if n.rpartition(".")[2] != "__main__")


def test_walk_finds_the_kernel_subpackages():
    names = _modules()
    for name in ("fastmerge.kernels", "fastmerge.kernels.fused_ta", "fastmerge.kernels.fused_ta_grouped",
                 "fastmerge.kernels.fused_ta_details", "fastmerge.kernels.fused_ta_details._select"):
        assert name in names


@pytest.mark.parametrize("name", _modules())
def test_every_module_imports(name):
    if name.startswith("fastmerge.kernels.") and importlib.util.find_spec("triton") is None:
        with pytest.raises(ModuleNotFoundError, match="triton"):  # the [triton] extra is not installed
            importlib.import_module(name)
        return
    importlib.import_module(name)


def test_kernels_resolve_to_the_kernels_folder():
    import fastmerge.kernels

    found = Path(fastmerge.kernels.__file__).resolve().parent
    # an editable install made from another clone maps fastmerge.kernels to that clone's kernels/ while
    # fastmerge itself comes from this tree: the kernel tests would then test the other clone's kernels
    assert found == ROOT / "kernels", (f"fastmerge.kernels is {found}, not this tree's kernels/: the editable "
                                       f"install points elsewhere; run `pip install -e .` in {ROOT}")


def _setuptools_major() -> int:
    try:
        return int(importlib.metadata.version("setuptools").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return 0


def _copy_source(dst: Path) -> None:
    """The files git tracks or would track (not build/, *.egg-info or the venvs of make test-oldest)."""
    try:
        r = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        r = None
    if r is None or r.returncode != 0:  # not a git checkout
        ignore = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                        ".ruff_cache", ".benchmarks", ".venv*", "out", "work", "*.so")
        shutil.copytree(ROOT, dst, ignore=ignore)
        return
    for name in r.stdout.decode().split("\0"):
        f = ROOT / name
        if name and f.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dst / name)


def _wheel(tmp_path: Path) -> Path:
    """The wheel of the working tree, built from a copy (a stale build/ in the checkout could hide a
    missing file)."""
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode != 0:
        pytest.skip("pip is not available")
    src = tmp_path / "src"
    _copy_source(src)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(src)]
    if _setuptools_major() >= 77:  # pyproject's build requirement is here: skip the isolated build env (~20 s)
        cmd.append("--no-build-isolation")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = (tmp_path / "dist").glob("fastmerge-*.whl")
    return wheel


def test_wheel_holds_every_module_and_the_c_source(tmp_path):
    wheel = zipfile.ZipFile(_wheel(tmp_path))
    names = set(wheel.namelist())
    details = sorted(p.name for p in (ROOT / "kernels" / "fused_ta_details").glob("*.py"))
    assert details, "kernels/fused_ta_details has no modules?"
    for name in details:
        assert f"fastmerge/kernels/fused_ta_details/{name}" in names
    assert "fastmerge/csrc/fused.c" in names
    # every module of the tree, wherever it lives
    want = {f"fastmerge/{p.relative_to(ROOT / 'fastmerge').as_posix()}" for p in (ROOT / "fastmerge").rglob("*.py")}
    want |= {f"fastmerge/kernels/{p.relative_to(ROOT / 'kernels').as_posix()}" for p in (ROOT / "kernels").rglob("*.py")}
    assert sorted(w for w in want - names if "__pycache__" not in w) == []
    # nothing outside the package (no top-level kernels/, tests/ or bench/)
    assert sorted(n for n in names if not n.startswith(("fastmerge/", "fastmerge-"))) == []
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    metadata = wheel.read(meta).decode()
    assert f"Version: {fastmerge.__version__}" in metadata
    assert "License-Expression: Apache-2.0" in metadata
    # the core requires none of the optional packages; each extra brings its own
    core = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    for dist, _extra in OPTIONAL.values():
        assert not any(line.split()[1].startswith(dist) for line in core), (dist, core)


# ------------------------------------------------------------------------- optional dependencies


def test_missing_optional_dependency_is_one_line_naming_the_extra():
    with pytest.raises(MissingDependency) as e:
        require("cmaes.no_such_submodule_here", "evolve (CMA-ES)")
    msg = str(e.value)
    assert "\n" not in msg
    assert "pip install 'fastmerge[evolve]'" in msg
    assert isinstance(e.value, ImportError) and isinstance(e.value, fastmerge.FastmergeError)


def test_not_installed_and_broken_are_told_apart():
    gone = ModuleNotFoundError("No module named 'triton'", name="triton")
    assert str(missing("triton", "the Triton backend", gone)) == (
        "the Triton backend needs triton, which is not installed: pip install 'fastmerge[triton]'")
    broken = ImportError("libcuda.so.1: cannot open shared object file\nmore detail")
    msg = str(missing("triton", "the Triton backend", broken))
    assert "\n" not in msg and "does not import (libcuda.so.1" in msg and "fastmerge[triton]" in msg


def test_require_refuses_unknown_modules():
    with pytest.raises(KeyError):
        require("numpy", "x")


def test_merger_without_triton_says_which_extra(monkeypatch, tmp_path):
    """What a CPU-only install (no [triton]) gets from the Triton backend, before any source is read
    (the model named does not exist: reading it would be another error)."""
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now fails as if not installed
    recipe = {"merge_method": "linear", "models": [{"model": str(tmp_path / "nowhere"), "parameters": {"weight": 1.0}}]}
    with pytest.raises(fastmerge.FastmergeError, match=r"pip install 'fastmerge\[triton\]'"):
        fastmerge.Merger(recipe, backend="triton")
