"""Nothing a user owns is destroyed or read from outside the model (DESIGN.md section 4, Safety).

Every refused case: exit code 2, one line without a traceback naming the path (and the input or
index key), nothing left at the target or beside it, and every input byte-identical afterwards.
The kill tests run the real CLI in a subprocess, held at a chosen point by a small driver (test
code only: it patches the engine in the child), and kill it there.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

import fastmerge
from fastmerge import FastmergeError, safety
from fastmerge.cli import main

ENV = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
INDEX = "model.safetensors.index.json"


# ----------------------------------------------------------------------------------------- helpers


def tree_hash(root: Path) -> dict[str, str]:
    """Every file (content hash) and link (its target) under root, by relative path."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def beside(out: Path) -> list[str]:
    """fastmerge's own entries next to ``out``: its lock and temporaries."""
    return sorted(p.name for p in out.parent.glob(f".{out.name}.fastmerge*"))


def refused(rc: int, err: str, *names: object) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fastmerge: error: "), err
    for n in names:
        assert str(n) in lines[0], (n, lines[0])


def write_recipe(file: Path, base: Path, *models: Path) -> Path:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}} for m in models]}))
    return file


@pytest.fixture
def ws(families, tmp_path):
    """A workspace: tmp/models/{base,ft0,ft1} (copies), tmp/recipes/r.yml, and a hash of both."""
    models = tmp_path / "models"
    paths = [Path(shutil.copytree(p, models / p.name)) for p in families("llama")]
    recipe = write_recipe(tmp_path / "recipes" / "r.yml", *paths)

    class W:
        root = tmp_path
        base, ft0, ft1 = paths
        def snapshot(self) -> dict:
            return {"models": tree_hash(models), "recipes": tree_hash(recipe.parent)}

    w = W()
    w.models, w.recipe = models, recipe
    w.before = w.snapshot()
    return w


def cli(argv: list, capsys) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def run(*argv, timeout: float = 120, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastmerge", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=cwd)


# ----------------------------------------------------------------------------------------- --force and what it may replace


def test_force_never_replaces_a_directory_holding_input_models(ws, capsys):
    """The reported bug: ``fastmerge merge r.yml models/ --force`` deleted every source model."""
    rc, err = cli(["merge", ws.recipe, ws.models, "--force", "--no-progress"], capsys)
    refused(rc, err, ws.models, "holds the input model", ws.base)
    assert ws.snapshot() == ws.before
    assert beside(ws.models) == []


@pytest.mark.parametrize("case", ["is-model", "inside-model", "holds-recipe", "holds-cwd", "is-cwd",
                                  "link-to-model", "link-parent"])
def test_outputs_that_would_destroy_or_write_into_inputs_are_refused(ws, case, capsys, monkeypatch):
    force = ["--force"]
    if case == "is-model":
        out, what = ws.base, "is the input model"
    elif case == "inside-model":
        out, what, force = ws.ft0 / "merged", "is inside the input model", []
    elif case == "holds-recipe":
        out, what = ws.recipe.parent, "holds the recipe file"
    elif case == "holds-cwd":
        (ws.root / "work" / "deep").mkdir(parents=True)
        monkeypatch.chdir(ws.root / "work" / "deep")
        out, what = ws.root / "work", "holds the working directory"
    elif case == "is-cwd":
        (ws.root / "work").mkdir()
        monkeypatch.chdir(ws.root / "work")
        out, what = Path("."), "is the working directory"
    elif case == "link-to-model":  # a link's real path is compared
        out, what = ws.root / "link", "is the input model"
        out.symlink_to(ws.ft1)
    else:  # the same model reached through a linked parent directory
        (ws.root / "alias").symlink_to(ws.models)
        out, what = ws.root / "alias" / "base", "is the input model"
    rc, err = cli(["merge", ws.recipe, out, *force, "--no-progress"], capsys)
    refused(rc, err, out, what)
    assert ws.snapshot() == ws.before
    assert beside(ws.root / "work" if case == "is-cwd" else out) == []
    if case == "inside-model":
        assert not out.exists()
    if case == "link-to-model":
        assert out.is_symlink() and out.resolve() == ws.ft1


def test_library_merge_refuses_too(ws):
    with pytest.raises(FastmergeError, match="holds the input model"):
        fastmerge.merge(ws.recipe, ws.models, fastmerge.MergeOptions(force=True))
    assert ws.snapshot() == ws.before


def test_dfs_export_force_never_replaces_its_sources(ws, capsys):
    pfile = ws.root / "paths" / "p.json"
    pfile.parent.mkdir()
    pfile.write_text(json.dumps({"hops": [[0, 0, 1.0], [1, 1, 1.0]], "models": [str(ws.base), str(ws.ft0)]}))
    paths_before = tree_hash(pfile.parent)
    for out, what in [(ws.models, "holds the input model"), (ws.base, "is the input model"),
                      (pfile.parent, "holds the path file"), (ws.ft0 / "x", "is inside the input model")]:
        rc, err = cli(["dfs", "export", pfile, out, "--force"], capsys)
        refused(rc, err, out, what)
        assert beside(out) == []
    assert ws.snapshot() == ws.before and tree_hash(pfile.parent) == paths_before
    # an ordinary export still works, and --force replaces an earlier one atomically
    out = ws.root / "exported"
    assert cli(["dfs", "export", pfile, out], capsys)[0] == 0
    assert cli(["dfs", "export", pfile, out, "--force"], capsys)[0] == 0
    assert (out / "config.json").exists() and beside(out) == []


def evolve_config(ws, out: Path) -> Path:
    data = ws.root / "data" / "text.jsonl"
    data.parent.mkdir(exist_ok=True)
    data.write_text(json.dumps({"text": "two plus two is four"}) + "\n")
    cfg = {"models": [str(ws.ft0), str(ws.ft1)], "base_model": str(ws.base), "merge_method": "task_arithmetic",
           "evaluator": {"name": "loglik", "data": str(data)}, "metric": "loglik",
           "budget": {"trials": 4}, "cma": {"popsize": 4, "seed": 1}, "out": str(out)}
    file = ws.root / "cfg" / "evolve.yml"
    file.parent.mkdir(exist_ok=True)
    file.write_text(yaml.safe_dump(cfg))
    return file


def test_evolve_output_directory_rules(ws, capsys):
    cfg = evolve_config(ws, ws.root / "run")
    for out, what in [(ws.models, "holds the input model"), (ws.ft1 / "run", "is inside the input model"),
                      (cfg.parent, "holds the config file"), (ws.root / "data", "holds the evaluator's data")]:
        rc, err = cli(["evolve", cfg, "--out", out, "--no-progress"], capsys)
        refused(rc, err, out, what)
        assert beside(out) == []
    assert ws.snapshot() == ws.before and not (ws.ft1 / "run").exists()
    # a second evolve into a directory another run holds fails at once, naming the holder
    run_dir = ws.root / "run"
    with safety.OutputClaim(run_dir, staged=False):
        rc, err = cli(["evolve", cfg, "--out", run_dir, "--no-progress"], capsys)
    refused(rc, err, run_dir, "is being written by another fastmerge process", f"pid {os.getpid()}")
    assert not run_dir.exists() and beside(run_dir) == []


# ----------------------------------------------------------------------------------------- what is read: index names, regular files


def with_index(ws, edit) -> Path:
    """A copy of ft0 whose index ``edit(weight_map)`` changed; the recipe reads it instead of ft0."""
    model = ws.root / "edited"
    shutil.copytree(ws.ft0, model)
    index = json.loads((model / INDEX).read_text())
    edit(index["weight_map"], model)
    (model / INDEX).write_text(json.dumps(index))
    write_recipe(ws.recipe, ws.base, model, ws.ft1)
    return model


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "inner-dotdot"])
def test_index_shard_names_stay_inside_the_model(ws, kind, capsys):
    """An index may not pull any safetensors file on the machine into the output."""
    outside = ws.root / "elsewhere" / "stolen.safetensors"
    outside.parent.mkdir()
    key = "model.layers.0.mlp.up_proj.weight"

    def edit(wm, model):
        shutil.copy(model / wm[key], outside)
        wm[key] = {"absolute": str(outside), "dotdot": "../elsewhere/stolen.safetensors",
                   "inner-dotdot": "sub/../../elsewhere/stolen.safetensors"}[kind]

    model = with_index(ws, edit)
    out = ws.root / "out"
    rc, err = cli(["merge", ws.recipe, out, "--no-progress"], capsys)
    refused(rc, err, model / INDEX, repr(key), "not a file name inside the model directory")
    assert not out.exists() and beside(out) == []


def test_linked_shards_inside_the_model_are_fine(ws, capsys):
    """The Hugging Face cache layout: snapshots/<rev>/<shard> are links to ../../blobs/<hash>."""
    hub = ws.root / "hub"
    (hub / "blobs").mkdir(parents=True)
    snap = hub / "snapshots" / "rev"
    snap.mkdir(parents=True)
    for f in sorted(ws.ft0.iterdir()):
        blob = hub / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    plain, linked = ws.root / "plain", ws.root / "linked"
    assert cli(["merge", ws.recipe, plain, "--no-progress"], capsys)[0] == 0
    write_recipe(ws.recipe, ws.base, snap, ws.ft1)
    assert cli(["merge", ws.recipe, linked, "--no-progress"], capsys)[0] == 0
    assert tree_hash(plain)["model.safetensors"] == tree_hash(linked)["model.safetensors"]


@pytest.mark.parametrize("what", ["shard", "linked-shard", "config", "index", "single"])
def test_non_regular_files_are_refused_without_hanging(ws, what):
    """A named pipe at a shard path used to block the merge forever (run in a child with a timeout)."""
    model = ws.root / "edited"
    shutil.copytree(ws.ft0, model)
    if what == "single":  # a single-file model whose model.safetensors is a pipe
        for f in model.glob("*.safetensors*"):
            f.unlink()
        target = model / "model.safetensors"
    elif what in ("shard", "linked-shard"):
        target = model / json.loads((model / INDEX).read_text())["weight_map"]["model.norm.weight"]
    else:
        target = model / ("config.json" if what == "config" else INDEX)
    target.unlink(missing_ok=True)
    if what == "linked-shard":  # a link inside the model to a pipe elsewhere: the link is followed
        fifo = ws.root / "pipe"
        os.mkfifo(fifo)
        target.symlink_to(fifo)
    else:
        os.mkfifo(target)
    write_recipe(ws.recipe, ws.base, model, ws.ft1)
    out = ws.root / "out"
    try:
        p = run("merge", ws.recipe, out, "--no-progress", timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the merge blocked on the named pipe {target}")
    refused(p.returncode, p.stderr, target, "is a named pipe, not a regular file")
    assert not out.exists() and beside(out) == []


# ----------------------------------------------------------------------------------------- the lock


DRIVER = textwrap.dedent('''
    """Run the fastmerge CLI, stopping at a chosen point (HOLD=phase:marker) until killed."""
    import os, sys, time
    from pathlib import Path
    from fastmerge import engine
    from fastmerge.cli import entry

    phase, marker = os.environ["HOLD"].split(":", 1)

    def hold():
        Path(marker).write_text(str(os.getpid()))
        time.sleep(120)

    if phase == "early":  # locked, temporary made, nothing written
        execute = engine._execute
        def _execute(*a, **k):
            hold()
            return execute(*a, **k)
        engine._execute = _execute
    elif phase == "midway":  # half the tensors in the output shard
        class Progress(engine.Progress):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                if self.tensors_done == self.tensors_total // 2:
                    hold()
        engine.Progress = Progress
    elif phase == "late":  # every file written, not yet moved into place
        write_metadata = engine._write_metadata
        def _write_metadata(*a, **k):
            write_metadata(*a, **k)
            hold()
        engine._write_metadata = _write_metadata
    sys.argv = ["fastmerge", *sys.argv[1:]]
    entry()
''')


def start_held(ws, phase: str, *argv) -> subprocess.Popen:
    """The CLI in a child, stopped at ``phase``; returns once it is there."""
    driver = ws.root / "driver.py"
    driver.write_text(DRIVER)
    marker = ws.root / f"at-{phase}"
    marker.unlink(missing_ok=True)
    p = subprocess.Popen([sys.executable, str(driver), *map(str, argv)], env=dict(ENV, HOLD=f"{phase}:{marker}"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not marker.exists():
        if p.poll() is not None:
            pytest.fail(f"the held merge ended early: {p.stderr.read()}")
        if time.monotonic() > deadline:
            p.kill()
            pytest.fail("the held merge never got there")
        time.sleep(0.02)
    return p


def stop(p: subprocess.Popen, sig: int) -> tuple[int, str]:
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    return p.returncode, err


def test_a_second_merge_to_a_held_output_fails_at_once(ws, capsys):
    out = ws.root / "out"
    first = start_held(ws, "early", "merge", ws.recipe, out, "--no-progress")
    try:
        (tmp,) = [n for n in beside(out) if ".fastmerge-tmp-" in n]
        assert f"-tmp-{first.pid}-" in tmp  # the temporary names its owner
        for extra in ([], ["--force"]):
            t0 = time.monotonic()
            rc, err = cli(["merge", ws.recipe, out, "--no-progress", *extra], capsys)
            assert time.monotonic() - t0 < 10
            refused(rc, err, f"{out} is being written by another fastmerge process (pid {first.pid})")
            assert tmp in beside(out)  # the holder's temporary is not the second run's to remove
    finally:
        rc, err = stop(first, signal.SIGTERM)
    assert rc == 143 and "Traceback" not in err
    assert not out.exists() and beside(out) == []
    assert cli(["merge", ws.recipe, out, "--no-progress"], capsys)[0] == 0
    assert beside(out) == []


def test_two_racing_merges_never_both_succeed(ws):
    out = ws.root / "out"
    procs = [subprocess.Popen([sys.executable, "-m", "fastmerge", "merge", str(ws.recipe), str(out), "--no-progress"],
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    (err,) = [e for rc, e in results if rc == 2]
    assert "is being written by another fastmerge process" in err or "output exists" in err
    assert "Traceback" not in err
    assert (out / "model.safetensors").exists() and beside(out) == []


# ----------------------------------------------------------------------------------------- kills


@pytest.fixture
def bigger(families, tmp_path):
    """A family with more tensors (so "midway" is a real point), its recipe and a reference merge."""
    paths = families("llama", layers=4, hidden=128)
    recipe = write_recipe(tmp_path / "r.yml", *paths)
    ref = tmp_path / "reference" / "out"  # the model card names the output
    fastmerge.merge(recipe, ref)

    class B:
        root = tmp_path
    b = B()
    b.paths, b.recipe, b.ref = paths, recipe, tree_hash(ref)
    b.before = {p.name: tree_hash(p) for p in paths}
    return b


@pytest.mark.parametrize("phase", ["early", "midway", "late"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["TERM", "KILL"])
def test_killed_merge_leaves_nothing_or_a_stale_temporary_the_next_run_removes(bigger, phase, sig):
    out = bigger.root / "out"
    p = start_held(bigger, phase, "merge", bigger.recipe, out, "--no-progress")
    pid = p.pid
    rc, err = stop(p, sig)
    if sig == signal.SIGTERM:  # handled like Ctrl-C: the clean-up ran
        assert rc == 143 and "terminated" in err and "Traceback" not in err, err
        assert not out.exists() and beside(out) == []
    else:
        assert rc == -signal.SIGKILL and not out.exists()
        (tmp,) = [n for n in beside(out) if ".fastmerge-tmp-" in n]
        assert f"-tmp-{pid}-" in tmp
    again = run("merge", bigger.recipe, out, "--no-progress")
    assert again.returncode == 0, again.stderr
    if sig == signal.SIGKILL:
        assert f"removed {tmp}, a temporary left by an interrupted fastmerge run (pid {pid})" in again.stderr
    assert tree_hash(out) == bigger.ref and beside(out) == []
    assert {p.name: tree_hash(p) for p in bigger.paths} == bigger.before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["TERM", "KILL"])
def test_killed_forced_merge_keeps_the_old_output(bigger, sig):
    out = bigger.root / "out"
    out.mkdir()
    (out / "mine.txt").write_text("an earlier output")
    old = tree_hash(out)
    p = start_held(bigger, "late", "merge", bigger.recipe, out, "--force", "--no-progress")
    stop(p, sig)
    assert tree_hash(out) == old
    assert run("merge", bigger.recipe, out, "--force", "--no-progress").returncode == 0
    assert tree_hash(out) == bigger.ref and beside(out) == []


def test_sigterm_handler_is_put_back(ws, capsys):
    before = signal.getsignal(signal.SIGTERM)
    assert cli(["merge", ws.recipe, ws.root / "out", "--no-progress"], capsys)[0] == 0
    assert cli(["merge", ws.recipe, ws.models, "--force", "--no-progress"], capsys)[0] == 2
    assert signal.getsignal(signal.SIGTERM) is before


# ----------------------------------------------------------------------------------------- the commit


def test_an_output_made_meanwhile_is_not_replaced_without_force(ws):
    out = ws.root / "out"

    def someone_else_writes(ev):
        if ev.tensors_done == 1:
            out.mkdir()
            (out / "theirs.txt").write_text("not fastmerge's")

    with pytest.raises(FastmergeError, match="output appeared while this run was writing it"):
        fastmerge.merge(ws.recipe, out, progress=someone_else_writes)
    assert tree_hash(out) == {"theirs.txt": hashlib.sha256(b"not fastmerge's").hexdigest()}
    assert beside(out) == []
    shutil.rmtree(out)
    fastmerge.merge(ws.recipe, out, fastmerge.MergeOptions(force=True), progress=someone_else_writes)
    assert (out / "model.safetensors").exists() and not (out / "theirs.txt").exists() and beside(out) == []


@pytest.mark.parametrize("exists", [False, True])
def test_commit_without_renameat2_flags(ws, monkeypatch, exists):
    """Filesystems without RENAME_NOREPLACE/EXCHANGE (NFS, some cluster filesystems): two renames."""
    monkeypatch.setattr(safety, "_renameat2", lambda src, dst, flags: errno.EINVAL)
    out = ws.root / "out"
    if exists:
        out.mkdir()
        (out / "old.txt").write_text("old")
    fastmerge.merge(ws.recipe, out, fastmerge.MergeOptions(force=exists))
    assert (out / "model.safetensors").exists() and not (out / "old.txt").exists() and beside(out) == []


def test_an_old_output_moved_aside_by_a_killed_commit_is_put_back(ws):
    """A run killed between the fallback commit's two renames left the old output aside."""
    out = ws.root / "out"
    aside = ws.root / ".out.fastmerge-old-999999-0badf00d"
    aside.mkdir()
    (aside / "old.txt").write_text("old")
    with pytest.warns(UserWarning, match="put back the previous output"):
        with pytest.raises(FastmergeError, match="output exists; pass --force"):
            fastmerge.merge(ws.recipe, out)
    assert (out / "old.txt").read_text() == "old" and beside(out) == []


def test_check_target_compares_real_paths(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (tmp_path / "via").symlink_to(tmp_path)
    prot = safety.protected_inputs([model], cwd=False)
    for bad in (tmp_path, tmp_path / "via", model, tmp_path / "via" / "m" / "x"):
        with pytest.raises(FastmergeError):
            safety.check_target(bad, prot)
    safety.check_target(tmp_path / "elsewhere", prot)
    safety.check_target(tmp_path / "m2", prot)  # a name that only starts like the model's


def test_signals_wait_for_the_commit_renames():
    """SIGTERM/Ctrl-C during the commit act once its renames are done, never between them."""
    order = []

    def handler(signum, frame):
        order.append("handler")
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with safety._signals_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                order.append("renames done")
    finally:
        signal.signal(signal.SIGTERM, old)
    assert order == ["renames done", "handler"]
