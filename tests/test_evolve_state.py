"""The evolve run state is data, not code: ``state.json`` round-trips the CMA-ES optimizer bit for
bit (a resumed run logs what an uninterrupted one logs), a pickled ``state.pkl`` of an old run is
refused without being unpickled, a damaged or foreign state is refused in one line naming the file
and the key, a refused ``--resume`` leaves the recorded config as it was, and ``--help`` says that a
config is code."""

from __future__ import annotations

import base64
import builtins
import importlib
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from fastmerge.cli import main
from fastmerge.errors import FastmergeError
from fastmerge.evolve import read_trials

from .test_evolve import config, make_target

E = importlib.import_module("fastmerge.evolve")  # the module (fastmerge.evolve is also the function)


def _cma(n: int = 8, popsize: int = 4, generations: int = 3, seed: int = 1):
    from cmaes import CMA

    cma = CMA(mean=np.full(n, 0.5), sigma=1 / 6, bounds=np.tile([0.0, 1.0], (n, 1)), seed=seed,
              population_size=popsize)
    rng = np.random.default_rng(0)
    for _ in range(generations):
        xs = [cma.ask() for _ in range(popsize)]
        cma.tell([(x, float(((x - 0.3) ** 2).sum() + rng.normal(0, 1e-3))) for x in xs])
    return cma


def _state(cma) -> dict:
    return {"fingerprint": "f:8", "generation": 3, "trials": 12, "elapsed": 0.1 + 0.2, "done": False,
            "stop_reason": None, "cma": cma,
            "best": {"generation": 1, "trial": 5, "x": [0.1, 1 / 3], "decoded": {"weights": [[0.2]]},
                     "fitness": -0.5, "metrics": {"a": float("nan"), "b": "text", "n": 3}},
            "history": [{"generation": 0, "best": -1.0, "mean": None, "best_so_far": -1.0}]}


def _same_cma(a, b, written_only: bool = False) -> None:
    """Every attribute equal in type and bits. ``written_only``: of ``_funhist_values`` (``np.empty``
    in cmaes, filled one pair per generation) only the slots written so far, for two separate runs."""
    assert set(a.__dict__) == set(b.__dict__)
    for k, v in a.__dict__.items():
        w = b.__dict__[k]
        if k == "_funhist_values" and written_only:
            slots = [2 * (t % a._funhist_term) + i for t in range(1, a._g + 1) for i in (0, 1)]
            v, w = v[slots], w[slots]
        if k == "_rng":
            sa, sb = v.get_state(), w.get_state()
            assert sa[0] == sb[0] and np.array_equal(sa[1], sb[1]) and sa[2:] == sb[2:]
            continue
        assert type(v) is type(w), (k, type(v), type(w))
        if isinstance(v, np.ndarray):
            assert v.dtype == w.dtype and v.shape == w.shape and v.tobytes("A") == w.tobytes("A"), k
            assert v.flags.f_contiguous == w.flags.f_contiguous and v.flags.c_contiguous == w.flags.c_contiguous, k
        elif isinstance(v, float) and np.isnan(v):
            assert np.isnan(w), k
        else:
            assert v == w, k


# ----------------------------------------------------------------------------------------- round trip


def test_state_round_trips_exactly(tmp_path):
    cma = _cma()
    cma._C = np.asfortranarray(cma._C)  # memory order is kept too (BLAS may take another path otherwise)
    cma._rng.standard_normal()  # a cached Gaussian in the RNG state
    state = _state(cma)
    file = tmp_path / "state.json"
    E._save_state(file, state)
    data = json.loads(file.read_text())  # plain JSON, with the format and its version
    assert data["format"] == "fastmerge-evolve-state" and data["version"] == E.STATE_VERSION
    assert data["cma"]["rng"]["has_gauss"] == 1
    back = E._load_state(file)
    _same_cma(cma, back["cma"])
    for k in state:
        if k not in ("cma", "best"):
            assert back[k] == state[k], k
    assert back["best"]["x"] == state["best"]["x"] and np.isnan(back["best"]["metrics"]["a"])
    # the restored optimizer goes on exactly as the original: same genomes, same updates
    for _ in range(3):
        xs = [cma.ask() for _ in range(4)]
        ys = [back["cma"].ask() for _ in range(4)]
        assert all(np.array_equal(x, y) for x, y in zip(xs, ys))
        cma.tell([(x, float(x.sum())) for x in xs])
        back["cma"].tell([(y, float(y.sum())) for y in ys])
    _same_cma(cma, back["cma"])
    # and saving what was loaded gives the same bytes
    E._save_state(tmp_path / "a.json", E._load_state(file))
    assert (tmp_path / "a.json").read_bytes() == file.read_bytes()


def test_a_lossy_state_would_be_caught(tmp_path):
    """The round-trip check above can fail: one bit off in the covariance, or a fresh RNG, shows."""
    cma = _cma()
    file = tmp_path / "state.json"
    E._save_state(file, _state(cma))
    back = E._load_state(file)["cma"]
    back._C[0, 1] = np.nextafter(back._C[0, 1], 1.0)
    with pytest.raises(AssertionError):
        _same_cma(cma, back)
    back = E._load_state(file)["cma"]
    back._rng = np.random.RandomState(1)
    with pytest.raises(AssertionError):
        _same_cma(cma, back)


def _ps_config(families, tmp_path, out: str, generations: int) -> dict:
    family = families("llama", layers=4)
    cfg = config(family, tmp_path / out, merge_method="dare_ties", ps={"group_size": 2},
                 budget={"generations": generations}, cma={"popsize": 4, "seed": 5})
    target = tmp_path / "target.safetensors"
    if not target.exists():
        make_target(cfg, np.full(8, 0.6), target)
    cfg["evaluator"]["target"] = str(target)
    return cfg


def test_resume_in_steps_gives_the_uninterrupted_log(families, tmp_path):
    """2 generations, then resumed to 3, then to 5: the log, the best and the state equal one 5-generation run."""
    cfg = _ps_config(families, tmp_path, "steps", 2)
    evolve = E.evolve
    evolve(cfg)
    assert (tmp_path / "steps/ps/state.json").exists() and not (tmp_path / "steps/ps/state.pkl").exists()
    evolve({**cfg, "budget": {"generations": 3}}, resume=True)
    resumed = evolve({**cfg, "budget": {"generations": 5}}, resume=True)
    straight = evolve({**cfg, "out": str(tmp_path / "straight"), "budget": {"generations": 5}})
    a = read_trials(tmp_path / "steps/ps/trials.jsonl", timings=False)
    b = read_trials(tmp_path / "straight/ps/trials.jsonl", timings=False)
    assert len(a) == 20 and a == b
    assert resumed.best.best_x == straight.best.best_x and resumed.best.trials == 20
    _same_cma(E._load_state(tmp_path / "steps/ps/state.json")["cma"],
              E._load_state(tmp_path / "straight/ps/state.json")["cma"], written_only=True)


# ----------------------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def finished_run(families, tmp_path_factory):
    """A finished one-generation PS run and its config file (copied per test)."""
    root = tmp_path_factory.mktemp("state-run")
    cfg = _ps_config(families, root, "run", 1)
    file = root / "evolve.yml"
    file.write_text(yaml.safe_dump(cfg))
    assert main(["evolve", str(file), "--no-progress"]) == 0
    return root


def _copy_run(finished_run: Path, tmp_path: Path) -> tuple[Path, Path]:
    shutil.copytree(finished_run / "run", tmp_path / "run")
    cfg = yaml.safe_load((finished_run / "evolve.yml").read_text())
    cfg["out"] = str(tmp_path / "run")
    file = tmp_path / "evolve.yml"
    file.write_text(yaml.safe_dump(cfg))
    return file, tmp_path / "run"


def _refused(capsys, argv: list[str], *parts: str) -> str:
    """``main(argv)`` exits 2 with one line on stderr holding every part."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastmerge: error: "), err
    for p in parts:
        assert p in lines[0], (p, lines[0])
    return lines[0]


class _Payload:
    """Unpickling this creates ``marker``: the code a pickled state could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


def test_a_pickled_state_is_refused_and_never_unpickled(finished_run, tmp_path, capsys):
    file, run = _copy_run(finished_run, tmp_path)
    # the payload works: unpickled, it runs (so the assertions below can fail)
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists()
    marker = tmp_path / "marker"
    payload = pickle.dumps({"version": 1, "cma": _Payload(marker)})
    (run / "ps/state.json").unlink()
    (run / "ps/state.pkl").write_bytes(payload)  # an old run's checkpoint
    recorded = (run / "config.yml").read_bytes()
    _refused(capsys, ["evolve", str(file), "--resume", "--no-progress"], str(run / "ps/state.pkl"), "pickle")
    _refused(capsys, ["evolve", str(file), "--no-progress"], "already holds an evolve run")
    assert not marker.exists()
    # the same bytes under the new name are not JSON
    (run / "ps/state.pkl").unlink()
    (run / "ps/state.json").write_bytes(payload)
    _refused(capsys, ["evolve", str(file), "--resume", "--no-progress"], str(run / "ps/state.json"), "invalid JSON")
    assert not marker.exists()
    assert (run / "config.yml").read_bytes() == recorded
    # the library says the same
    with pytest.raises(FastmergeError, match="invalid JSON"):
        E.evolve(file, resume=True)
    assert not marker.exists()


def _set(path: str, value):
    """A mutation of the state's JSON: set (or with value DELETE, remove) the key at a dotted path."""
    def mutate(d: dict) -> dict:
        *parents, last = path.split(".")
        node = d
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value(node[last]) if callable(value) else value
        return d
    return mutate


DELETE = object()


def _truncate(enc: dict) -> dict:
    return {**enc, "data": base64.b64encode(base64.b64decode(enc["data"])[:-8]).decode()}


BAD_STATES = [
    ("not json", b"{not json", "invalid JSON"),
    ("empty", b"", "invalid JSON"),
    ("deeply nested", b"[" * 100_000, "invalid JSON"),
    ("a list", b"[1, 2]", "expected an object"),
    ("a string", b'"state"', "expected an object"),
    ("no format", _set("format", DELETE), "format: missing"),
    ("other format", _set("format", "something-else"), "format: 'something-else'"),
    ("no version", _set("version", DELETE), "version: missing"),
    ("old version", _set("version", 1), "version: 1, this fastmerge reads 2 only"),
    ("version as text", _set("version", "2"), "version: '2'"),
    ("no trials", _set("trials", DELETE), "trials: missing"),
    ("trials as text", _set("trials", "4"), "trials: expected an integer >= 0, got a string"),
    ("elapsed too large", _set("elapsed", 10**400), "elapsed: expected a number, got a number out of range"),
    ("unknown key", _set("extra", 1), "extra: unknown key"),
    ("best not an object", _set("best", [1]), "best: expected an object or null"),
    ("best without x", _set("best.x", DELETE), "best.x: missing"),
    ("history entry", _set("history.0.mean", "high"), "history[0].mean: expected a number or null"),
    ("cma class", _set("cma.class", "os.system"), "cma.class: expected 'cmaes.CMA'"),
    ("cma attr missing", _set("cma.attrs._sigma", DELETE), "cma.attrs._sigma: missing"),
    ("cma attr unknown", _set("cma.attrs._evil", 1), "cma.attrs._evil: unknown"),
    ("cma attr wrong type", _set("cma.attrs._C", [[1.0]]), "cma.attrs._C: expected a number"),
    ("array truncated", _set("cma.attrs._C", _truncate), "cma.attrs._C: data:"),
    ("array dtype", _set("cma.attrs._mean", lambda e: {**e, "ndarray": "object"}), "cma.attrs._mean: not a valid array"),
    ("array shape", _set("cma.attrs._pc", lambda e: {**e, "shape": [2, 4]}), "cma.attrs._pc: not what cmaes.CMA"),
    ("array base64", _set("cma.attrs._pc", lambda e: {**e, "data": "!!"}), "cma.attrs._pc: data: not base64"),
    ("scalar dtype", _set("cma.attrs._sigma", {"scalar": "object", "value": 1}), "cma.attrs._sigma: not a float64"),
    ("rng key", _set("cma.rng.key", lambda e: {**e, "shape": [623], "data": base64.b64encode(b"\0" * 4 * 623).decode()}),
     "cma.rng.key: expected 624 uint32 words"),
    ("rng name", _set("cma.rng.bit_generator", "PCG64"), "cma.rng.bit_generator: expected 'MT19937'"),
    ("rng pos", _set("cma.rng.pos", None), "cma.rng.pos: expected an integer"),
    ("rng pos too large", _set("cma.rng.pos", 2**80), "cma.rng:"),
    ("int64 overflow", _set("cma.attrs._sigma", {"scalar": "int64", "value": 2**70}), "cma.attrs._sigma: 1180591620717411303424 does not fit"),
    ("float64 overflow", _set("cma.attrs._sigma", {"scalar": "float64", "value": 10**400}), "cma.attrs._sigma:"),
    ("one weight", _set("cma.attrs._weights", lambda e: {**e, "shape": [1], "data": base64.b64encode(b"\0" * 8).decode()}),
     "cma.attrs._weights: missing or not a vector of at least 2"),
    ("huge genome claimed", _set("cma.attrs._n_dim", 10**9), "cma.attrs._n_dim: does not match"),
]


@pytest.mark.parametrize("mutation,message", [b[1:] for b in BAD_STATES], ids=[b[0] for b in BAD_STATES])
def test_a_damaged_state_is_refused_in_one_line(finished_run, tmp_path, capsys, mutation, message):
    file, run = _copy_run(finished_run, tmp_path)
    state = run / "ps/state.json"
    if isinstance(mutation, bytes):
        state.write_bytes(mutation)
    else:
        state.write_text(json.dumps(mutation(json.loads(state.read_text()))))
    before = {p: p.read_bytes() for p in (run / "config.yml", state, run / "ps/trials.jsonl")}
    _refused(capsys, ["evolve", str(file), "--resume", "--no-progress"], str(state), message)
    assert {p: p.read_bytes() for p in before} == before


def test_the_untouched_copy_resumes(finished_run, tmp_path, capsys):
    """The refusals above come from the mutations: the same copy, unmutated, resumes (with more budget)."""
    file, run = _copy_run(finished_run, tmp_path)
    cfg = yaml.safe_load(file.read_text())
    cfg["budget"] = {"generations": 2}
    file.write_text(yaml.safe_dump(cfg))
    assert main(["evolve", str(file), "--resume", "--no-progress"]) == 0
    assert len(read_trials(run / "ps/trials.jsonl")) == 8
    assert yaml.safe_load((run / "config.yml").read_text())["budget"]["generations"] == 2  # recorded once accepted


@pytest.mark.parametrize("change", [{"cma": {"popsize": 4, "seed": 6}}, {"ps": {"group_size": 1}},
                                    {"space": "dfs"}], ids=["seed", "group_size", "space"])
def test_a_changed_config_is_refused_before_the_recorded_one_is_touched(finished_run, tmp_path, capsys, change):
    file, run = _copy_run(finished_run, tmp_path)
    cfg = yaml.safe_load(file.read_text())
    cfg.update(change)
    file.write_text(yaml.safe_dump(cfg))
    before = {p: p.read_bytes() for p in (run / "config.yml", run / "ps/state.json", run / "ps/trials.jsonl")}
    _refused(capsys, ["evolve", str(file), "--resume", "--no-progress"], str(run / "ps"), "config changed")
    assert {p: p.read_bytes() for p in before} == before
    assert not (run / "dfs").exists()


def test_help_says_a_config_is_code(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["evolve", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "A config is code, like a script" in text
    assert "running a config you did not write is like running its author's script" in text
    assert "config is code" in E.evolve.__doc__ and "is code" in E.__doc__
    assert "config is code" in importlib.import_module("fastmerge.evolve_config").__doc__
