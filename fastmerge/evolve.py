"""Evolutionary model merging (DESIGN.md section 7): CMA-ES over merge recipes, in parameter space
(PS), data-flow space (DFS) or both (PS then DFS, the PS merge becoming model A).

The loop, per generation: ask CMA-ES for ``popsize`` genomes in [0, 1]^n -> decode each -> merge
it in place (``Merger``) or switch the layer path (``PathModel``) -> evaluate -> tell. Why this
shape:

- The models are loaded once per process and every candidate is written into the same live
  module, so a trial costs one in-memory merge plus one evaluation, never a checkpoint on disk.
- Every trial is one JSON line in ``trials.jsonl``; after each generation the optimizer (every
  attribute of the ``cmaes.CMA``, arrays bit-exact, and its own RNG's state), the best trial and
  the number of logged trials are written atomically to ``state.json``. The state is data only: it
  is read with ``json`` and checked key by key, so ``--resume`` never runs code from the output
  directory (a ``state.pkl`` of an older version is refused, not unpickled). ``resume`` drops log
  lines of the generation that was cut off and re-asks it from the saved optimizer, so the log
  equals that of an uninterrupted run (evaluation is deterministic: greedy decoding, a fixed DARE
  seed).
- The config, on the other hand, is code: its evaluator may be any ``module:function`` with
  arguments, imported and called in this process, so running someone else's config is running
  their script.
- ``workers > 1`` scores a generation's candidates in a ``torch.multiprocessing`` (spawn) pool,
  each worker holding its own Merger/PathModel; results come back in order, so the log and the
  optimizer see exactly what one worker would give them. ``scale: ray`` does the same with one Ray
  actor per worker, across GPUs and machines (``fastmerge.ray_scale``; Ray is imported only then).
- The library reports progress through a callback; only the CLI draws.

Layout of ``out``: ``config.yml``, ``result.json`` and one directory per stage (``ps/``, ``dfs/``)
holding ``trials.jsonl``, ``state.json``, ``space.json``, ``fitness.png`` and the best candidate
(``best.yml``, a mergekit recipe, or ``best_path.json``), plus ``model/`` when materialized.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import queue
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ._optional import require
from .errors import FastmergeError
from .evolve_config import Budget, EvolveConfig
from .io import atomic_write, is_hub_id, local_model
from .safety import OutputClaim, given_file, protected_inputs
from .space import DFSSpace, PSSpace

#: the run state file of a stage (JSON: data only, never code) and its format; version 1 was ``state.pkl``
STATE_FILE = "state.json"
STATE_FORMAT = "fastmerge-evolve-state"
STATE_VERSION = 2
#: the pickled state of version 1: refused, never loaded (unpickling can run code)
LEGACY_STATE_FILE = "state.pkl"
#: what CMA-ES is told for a failed (NaN) fitness: worse than any real one, still finite
_FAILED = 1e30
#: trial fields that are timings, not results (a resumed run's log equals an uninterrupted one's without them)
TIMING_FIELDS = ("merge_s", "upload_s", "eval_s")


# ----------------------------------------------------------------------------------------- public results


@dataclass
class EvolveProgress:
    """One progress report: after each trial (``kind="trial"``), generation, and at stage ends."""

    stage: str
    kind: str  # "start" | "ready" (models loaded) | "trial" | "generation" | "end"
    generation: int  # the generation in progress (0-based), or the number completed at "generation"/"end"
    trials: int  # trials logged in this stage (including those of a resumed run)
    trials_total: int | None  # from the budget, when it is a count
    best: float | None
    mean: float | None  # mean fitness of the last completed generation
    trials_per_min: float  # in this session
    merge_s: float  # seconds merging / evaluating in this session
    eval_s: float
    upload_s: float = 0.0  # seconds handing candidates to the evaluation engine (vllm; 0 on hf)


@dataclass
class StageResult:
    stage: str
    best_fitness: float
    best_metrics: dict
    best_x: list[float]
    best_decoded: dict
    best_file: Path
    trials: int
    generations: int
    stop_reason: str
    plot: Path | None = None
    model_dir: Path | None = None


@dataclass
class EvolveResult:
    out: Path
    stages: list[StageResult] = field(default_factory=list)

    @property
    def best(self) -> StageResult:
        return self.stages[-1]


ProgressFn = Callable[[EvolveProgress], None]


# ----------------------------------------------------------------------------------------- entry point


def evolve(config: EvolveConfig | str | Path | dict, *, resume: bool = False, materialize: bool = False,
           out: str | Path | None = None, progress: ProgressFn | None = None) -> EvolveResult:
    """Run (or with ``resume`` continue) the evolution a config describes; returns the best per stage.

    ``config``: an ``EvolveConfig`` or what ``EvolveConfig.from_yaml`` reads. ``out`` overrides the
    config's output directory. ``materialize`` also writes the best candidate as a checkpoint
    (``<stage>/model``). Every config error is raised before a model is loaded.

    A config is code, like a script: its evaluator may name any ``module:function`` (with
    arguments), which is imported and called here, so running a config you did not write is like
    running that person's script. Only run configs you wrote or have read. (The run's saved state
    is data, not code: ``resume`` loads it without unpickling anything.)
    """
    source = given_file(config)
    if not isinstance(config, EvolveConfig):
        config = EvolveConfig.from_yaml(config, out=out)
    else:
        if out is not None:
            config = config.model_copy(update={"out": str(Path(out).resolve())})
        config.check()
    if config.scale == "ray":  # a missing Ray fails here, before the output directory is touched
        from .ray_scale import import_ray

        import_ray()
    root = Path(config.out)
    with _claim_out_dir(root, config, resume, source):
        return _evolve_claimed(root, config, resume, materialize, progress)


def _evolve_claimed(root: Path, config: EvolveConfig, resume: bool, materialize: bool,
                    progress: ProgressFn | None) -> EvolveResult:
    """``evolve`` once its output directory is claimed."""
    recorded = config
    config = _localize(config)
    if resume:
        _check_resume(root, config)  # a refused resume leaves the recorded config as it was
    _record_config(root, recorded)
    result = EvolveResult(root)
    ps_model: Path | None = None
    for stage in config.stages:
        stage_dir = root / stage
        if stage == "ps":
            space = ps_space(config)
            spec = _RunnerSpec("ps", space, config.evaluator, config.metric, _tokenizer_dirs(config, config.ps_models),
                               config.device, config.backend, threads=config.threads, draw_cache=config.draw_cache,
                               eval_backend=config.eval_backend, vllm=config.vllm.model_dump(),
                               engine_model=config.ps_models[0])
        else:
            models = ([str(ps_model)] if ps_model is not None else []) + config.dfs_models
            space = dfs_space(config, models)
            spec = _RunnerSpec("dfs", space, config.evaluator, config.metric,
                               _tokenizer_dirs(config, [models[space.head], *models]), config.device, config.backend,
                               threads=config.threads)
        res = _run_stage(stage, config, space, spec, stage_dir, resume, progress)
        if stage == "ps" and (materialize or "dfs" in config.stages):
            res.model_dir = _materialize(res.best_file, stage_dir / "model", _materialize_ps, config.device)
            ps_model = res.model_dir
        elif stage == "dfs" and materialize:
            res.model_dir = _materialize(res.best_file, stage_dir / "model", _materialize_dfs, config.device)
        result.stages.append(res)
        _write_result(result)
    return result


@contextlib.contextmanager
def _claim_out_dir(root: Path, config: EvolveConfig, resume: bool, source: Path | None = None) -> Iterator[None]:
    """Hold the output directory for the run (``safety.OutputClaim``: locked, a second run to it
    fails at once); refuse one that is, holds or lies inside an input model, or holds the config
    file, the evaluator's data or task directory, or the working directory; refuse to mix a new run
    into an old one."""
    models: list[str] = []
    config.with_model_paths(lambda p: models.append(p) or p)
    files = [("the config file", source)]
    if isinstance(config.evaluator, dict) and isinstance(config.evaluator.get("data"), str):
        files.append(("the evaluator's data", config.evaluator["data"]))
    if isinstance(config.evaluator, dict):  # lm_eval's task directories
        paths = config.evaluator.get("include_path")
        files += [("the evaluator's task directory", p) for p in (paths if isinstance(paths, list) else [paths])
                  if isinstance(p, str)]
    with OutputClaim(root, protected=protected_inputs(models, files), label="evolve output", staged=False):
        used = [root / s / f for s in ("ps", "dfs") for f in ("trials.jsonl", STATE_FILE, LEGACY_STATE_FILE)]
        if not resume and any(p.exists() for p in used):
            raise FastmergeError(f"{root}: already holds an evolve run; pass --resume to continue it, "
                                 "or choose another output directory")
        root.mkdir(parents=True, exist_ok=True)
        yield


def _localize(config: EvolveConfig) -> EvolveConfig:
    """Hub ids -> local snapshot directories (the only network access, before anything else)."""
    if not any(is_hub_id(m) for m in [*config.models, config.base_model or "", *(config.dfs.models or []),
                                          config.tokenizer or ""]):
        return config
    return config.with_model_paths(lambda name: None if name is None else local_model(name))


# ----------------------------------------------------------------------------------------- search spaces


def _config_json(model: str) -> dict:
    return json.loads((Path(model) / "config.json").read_text())


def ps_space(config: EvolveConfig) -> PSSpace:
    """The PS genes of a config (layer count from the base model's config.json, or its checkpoint)."""
    from .plan import model_num_layers

    ps = config.ps
    return PSSpace(method=config.merge_method, models=list(config.models), base_model=config.base_model,
                   num_layers=int(model_num_layers(config.ps_models[0])), group_size=ps.group_size,
                   filters=list(ps.filters), weight_range=tuple(ps.weight), density_range=tuple(ps.density),
                   parameters=dict(ps.parameters), random_seed=ps.random_seed)


def dfs_space(config: EvolveConfig, models: Sequence[str]) -> DFSSpace:
    """The DFS genome over ``models`` (model A first for ps+dfs)."""
    from .dfs import DFSGenome

    d = config.dfs
    layers = [int(_config_json(m)["num_hidden_layers"]) for m in models]
    genome = DFSGenome(layers, repetitions=d.repetitions, fix_ends=d.fix_ends, head=d.head,
                       scale_range=tuple(d.scale_range), init=d.init)
    return DFSSpace(models=list(models), genome=genome)


def _decoded_json(space: PSSpace | DFSSpace, x: np.ndarray) -> dict:
    if isinstance(space, PSSpace):
        return space.decode(x).to_json()
    return space.decode(x).to_dict()


def _space_json(space: PSSpace | DFSSpace) -> dict:
    """What the genes mean, so a trial line's ``x`` and ``decoded`` can be read without the code."""
    if isinstance(space, PSSpace):
        groups = [[g * (space.group_size or space.num_layers), min((g + 1) * (space.group_size or space.num_layers),
                                                                   space.num_layers)] for g in range(space.groups)]
        return {"space": "ps", "size": space.size, "method": space.method, "base_model": space.base_model,
                "models": space.models, "layer_groups": groups, "filters": [*space.filters, "*"] if space.filters else ["*"],
                "weight_range": list(space.weight_range),
                "density_range": list(space.density_range) if space.searches_density else None,
                "layout": "x = weights then densities, each (group, filter, model) in C order; decoded the same"}
    g = space.genome
    return {"space": "dfs", "size": space.size, "models": space.models, "layers": g.layers,
            "repetitions": g.repetitions, "fix_ends": g.fix_ends, "head": g.head,
            "scale_range": list(g.scale_range), "init": g.init}


# ----------------------------------------------------------------------------------------- trial runners


@dataclass
class _RunnerSpec:
    """Everything a process needs to score genomes (picklable: it travels to spawned workers and Ray actors)."""

    stage: str
    space: PSSpace | DFSSpace
    evaluator: dict | str
    metric: str
    tokenizer_dirs: list[str]
    device: str = "cpu"
    backend: str | None = None
    threads: int | None = None
    draw_cache: bool = True
    eval_backend: str = "hf"
    vllm: dict = field(default_factory=dict)  # VLLMConfig as a dict, for eval_backend "vllm"
    engine_model: str | None = None  # the checkpoint a vllm engine starts from (the PS base)


def _tokenizer_dirs(config: EvolveConfig, models: Sequence[str]) -> list[str]:
    return [config.tokenizer] if config.tokenizer else list(dict.fromkeys(models))


def _load_tokenizer(dirs: Sequence[str]):
    """The first tokenizer found in ``dirs`` (None when none has one: a user evaluator may not need it)."""
    from transformers import AutoTokenizer

    for d in dirs:
        if any((Path(d) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            try:
                return AutoTokenizer.from_pretrained(d)
            except (OSError, ValueError, TypeError) as e:
                raise FastmergeError(f"{d}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None
    return None


def _load_processor(path: Path):
    """A VLM's processor (what a VQA evaluator feeds images and chat prompts through)."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        raise FastmergeError(f"{path}: cannot load its processor ({str(e).splitlines()[0]})") from None


class _Runner:
    """Scores genomes in one process: models loaded once, each candidate merged/switched in place."""

    def __init__(self, spec: _RunnerSpec):
        from .evaluate import load_evaluator

        self.spec = spec
        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.evaluate = load_evaluator(spec.evaluator)
        known = getattr(self.evaluate, "metric_names", None)  # an evaluator that knows them before it runs
        if known is not None and spec.metric not in known:
            raise FastmergeError(f"metric {spec.metric!r} is not among the evaluator's metrics "
                                 f"({', '.join(sorted(known))})")
        self.tokenizer = _load_tokenizer(spec.tokenizer_dirs)
        if self.tokenizer is None and not (isinstance(spec.evaluator, str) or ":" in str(spec.evaluator.get("name"))):
            raise FastmergeError(f"no tokenizer in {', '.join(spec.tokenizer_dirs)}; set tokenizer: in the config")
        self.backend = None
        self.bound = False  # the merge writes into the engine's own weights (Backend.weight_targets)
        if spec.stage == "ps":
            from .merger import Merger

            self.merger = Merger(spec.space.base_recipe(), device=spec.device, backend=spec.backend,
                                 threads=spec.threads, draw_cache=spec.draw_cache)
            self.model = self.merger.module
            frame = self.merger.plan.frame
            if frame is not None and getattr(self.evaluate, "takes_processor", False):
                # a VLM (self.model: its live module) and an evaluator that asks for images: the frame's
                # processor (image processor, tokenizer, chat template) in place of the tokenizer
                self.tokenizer = _load_processor(frame.path)
            if spec.eval_backend == "vllm":
                from .backends.vllm_engine import VLLMBackend

                # the engine starts from the base's checkpoint (the candidates' architecture and shapes);
                # every candidate then replaces all of its weights
                self.backend = VLLMBackend(spec.engine_model, self.tokenizer, device=spec.device,
                                           threads=spec.threads, **spec.vllm)
                if frame is None:
                    # where the engine lets the merge write into its own weights, a candidate's upload
                    # is only the engine's repacking (no copy, no reload), and the module shares them
                    targets = self.backend.weight_targets(dict(self.model.named_parameters()))
                    if targets is not None:
                        self.merger.bind(targets)
                        self.bound = True
        else:
            from .dfs import PathModel, load_sources

            space: DFSSpace = spec.space
            dtype = torch.float32 if spec.device == "cpu" else "auto"
            sources, _ = load_sources(space.models, head=space.head, device=spec.device, dtype=dtype)
            self.model = PathModel(sources, space.decode(space.x0()), head=space.head).eval()

    def _apply(self, x: np.ndarray) -> None:
        space = self.spec.space
        if isinstance(space, PSSpace):
            self.merger.merge(space.candidate(space.decode(x)))
        else:
            self.model.set_path(space.decode(x))

    def __call__(self, x: Sequence[float]) -> dict:
        x = np.asarray(x, dtype=np.float64)
        t0 = time.perf_counter()
        self._apply(x)
        _sync(self.spec.device)
        t1 = t_up = time.perf_counter()
        if self.backend is not None:
            if self.bound:
                self.backend.weights_written()
            else:
                # parameters only: buffers (rotary inv_freq) are derived, and the engine derives its own
                self.backend.load_weights(self.model.named_parameters())
            t_up = time.perf_counter()
        with torch.no_grad():
            # a user evaluator gets the live module on hf, the backend (generate / loglikelihood / llm) on vllm
            metrics = self.evaluate(self.backend if self.backend is not None else self.model, self.tokenizer)
        if not isinstance(metrics, dict):
            raise FastmergeError(f"the evaluator returned {type(metrics).__name__}, not a dict of metrics")
        _sync(self.spec.device)
        t2 = time.perf_counter()
        if self.spec.metric not in metrics:
            raise FastmergeError(f"metric {self.spec.metric!r} is not among the evaluator's metrics "
                                 f"({', '.join(map(str, metrics)) or 'none'})")
        fitness = float(metrics[self.spec.metric])
        return {"fitness": fitness, "metrics": _jsonable(metrics), "merge_s": t1 - t0, "upload_s": t_up - t1,
                "eval_s": t2 - t_up}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)  # this worker's GPU, not the current one


def _jsonable(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (bool, int, float, str)) or v is None:
            out[str(k)] = v
        elif hasattr(v, "item"):
            out[str(k)] = v.item()
        else:
            out[str(k)] = str(v)
    return out


# One runner per worker process, built on its first genome (a failing Pool initializer would be
# restarted forever; a failing task is reported to the parent).
_WORKER: dict[str, Any] = {}


def _worker_init(spec: _RunnerSpec, devices) -> None:
    try:
        spec.device = devices.get(timeout=10)
    except queue.Empty:  # a worker restarted after a crash: the configured device
        pass
    _WORKER["spec"] = spec


def _worker_run(x: list[float]) -> dict:
    if "runner" not in _WORKER:
        _WORKER["runner"] = _Runner(_WORKER["spec"])
    return _WORKER["runner"](x)


class _Scorer:
    """Scores a generation's genomes, in order: in this process, in a spawn pool of workers, or on
    Ray actors (``scale: ray``, ``fastmerge.ray_scale``)."""

    def __init__(self, spec: _RunnerSpec, workers: int, scale: str = "local", ray_address: str | None = None):
        self.spec, self.workers, self.scale, self.ray_address = spec, workers, scale, ray_address
        self._runner: _Runner | None = None
        self._pool = None
        self._ray = None

    def __enter__(self) -> _Scorer:
        if self.scale == "ray":
            from .ray_scale import RayScorer

            self._ray = RayScorer(self.spec, self.workers, self.ray_address).start()
            return self
        if self.workers == 1:
            self._runner = _Runner(self.spec)
            return self
        ctx = torch.multiprocessing.get_context("spawn")
        devices = ctx.Queue()
        for i in range(self.workers):
            devices.put(_worker_device(self.spec.device, i))
        spec = _RunnerSpec(**{**self.spec.__dict__, "threads": self.spec.threads or _threads_per_worker(self.workers)})
        self._pool = ctx.Pool(self.workers, initializer=_worker_init, initargs=(spec, devices))
        return self

    def __exit__(self, *exc) -> None:
        if self._ray is not None:
            self._ray.close()
        if self._pool is not None:
            if exc[0] is None:
                self._pool.close()
            else:
                self._pool.terminate()
            self._pool.join()

    def __call__(self, xs: Sequence[np.ndarray]) -> Iterator[dict]:
        if self._ray is not None:
            return self._ray.score(xs)
        if self._runner is not None:
            return (self._runner(x) for x in xs)
        return self._pool.imap(_worker_run, [np.asarray(x).tolist() for x in xs], chunksize=1)


def _worker_device(device: str, i: int) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return f"cuda:{i % torch.cuda.device_count()}"
    return device


def _threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


# ----------------------------------------------------------------------------------------- the loop


def _popsize(config: EvolveConfig, n: int) -> int:
    return config.cma.popsize or 4 + math.floor(3 * math.log(n))


def _new_state(config: EvolveConfig, stage: str, space: PSSpace | DFSSpace) -> dict:
    CMA = require("cmaes", "evolve (CMA-ES)").CMA

    x0 = space.x0(config.cma.x0) if stage == "ps" else space.x0()
    n = space.size
    cma = CMA(mean=np.asarray(x0, dtype=np.float64), sigma=config.cma.sigma0, bounds=np.tile([0.0, 1.0], (n, 1)),
              seed=config.cma.seed, population_size=_popsize(config, n))
    return {"fingerprint": _fingerprint(config, stage, space), "cma": cma,
            "generation": 0, "trials": 0, "elapsed": 0.0, "best": None, "history": [], "done": False,
            "stop_reason": None}


def _fingerprint(config: EvolveConfig, stage: str, space: PSSpace | DFSSpace) -> str:
    return f"{config.fingerprint(stage)}:{space.size}"


def _budget_total(budget: Budget, popsize: int) -> int | None:
    counts = []
    if budget.trials is not None:
        counts.append(math.ceil(budget.trials / popsize) * popsize)
    if budget.generations is not None:
        counts.append(budget.generations * popsize)
    return min(counts) if counts else None


def _stop_reason(state: dict, budget: Budget, popsize: int) -> str | None:
    """Why the stage ends now (checked between generations), or None to run another generation."""
    total = _budget_total(budget, popsize)
    if total is not None and state["trials"] >= total:
        return "budget"
    wall = budget.seconds()
    if wall is not None and state["elapsed"] >= wall:
        return "wall_time"
    if state["generation"] > 0 and state["cma"].should_stop():
        return "converged"
    return None


def _run_stage(stage: str, config: EvolveConfig, space: PSSpace | DFSSpace, spec: _RunnerSpec, out: Path,
               resume: bool, progress: ProgressFn | None) -> StageResult:
    out.mkdir(parents=True, exist_ok=True)
    log_file, state_file = out / "trials.jsonl", out / STATE_FILE
    state = _resume_state(config, stage, space, out, resume)
    atomic_write(out / "space.json", (json.dumps(_space_json(space), indent=1) + "\n").encode())
    budget = config.budget_for(stage)
    cma = state["cma"]
    popsize = cma.population_size
    clock = _Clock(state, budget, popsize, stage, progress)
    clock.report("start")
    if not state["done"]:
        with _Scorer(spec, config.workers, config.scale, config.ray_address) as score, open(log_file, "a") as log:
            clock.ready()
            while (reason := _stop_reason(state, budget, popsize)) is None:
                _generation(state, space, score, log, clock)
                _save_state(state_file, state)
                clock.report("generation")
        state["done"], state["stop_reason"] = True, reason
        _save_state(state_file, state)
    best = state["best"]
    if best is None:
        raise FastmergeError(f"{stage}: no trial gave a finite {config.metric} ({state['trials']} trials); "
                             f"see {log_file}")
    best_file = _write_best(stage, space, np.asarray(best["x"]), out)
    plot = _plot(state["history"], out / "fitness.png", f"{stage.upper()} search")
    clock.report("end")
    return StageResult(stage, best["fitness"], best["metrics"], best["x"], best["decoded"], best_file,
                       state["trials"], state["generation"], state["stop_reason"], plot)


def _generation(state: dict, space: PSSpace | DFSSpace, score, log, clock: _Clock) -> None:
    """Ask, score in order, log every trial as it comes, tell; then update best and history."""
    cma = state["cma"]
    g = state["generation"]
    t0 = time.perf_counter()
    xs = [cma.ask() for _ in range(cma.population_size)]
    told, fitnesses = [], []
    for i, (x, res) in enumerate(zip(xs, score(xs))):
        rec = {"generation": g, "trial": state["trials"] + i, "x": x.tolist(), "decoded": _decoded_json(space, x),
               "fitness": res["fitness"], "metrics": res["metrics"], "merge_s": res["merge_s"],
               "upload_s": res["upload_s"], "eval_s": res["eval_s"]}
        log.write(json.dumps(rec) + "\n")
        log.flush()
        f = res["fitness"]
        fitnesses.append(f)
        told.append((x, -f if math.isfinite(f) else _FAILED))
        if math.isfinite(f) and (state["best"] is None or f > state["best"]["fitness"]):
            state["best"] = {k: rec[k] for k in ("generation", "trial", "x", "decoded", "fitness", "metrics")}
        clock.trial(res["merge_s"], res["upload_s"], res["eval_s"])
    cma.tell(told)
    finite = [f for f in fitnesses if math.isfinite(f)]
    state["history"].append({"generation": g, "best": max(finite) if finite else None,
                             "mean": float(np.mean(finite)) if finite else None,
                             "best_so_far": state["best"]["fitness"] if state["best"] else None})
    state["generation"] += 1
    state["trials"] += len(xs)
    state["elapsed"] += time.perf_counter() - t0


class _Clock:
    """Session counters behind the progress reports."""

    def __init__(self, state: dict, budget: Budget, popsize: int, stage: str, progress: ProgressFn | None):
        self.state, self.stage, self.progress = state, stage, progress
        self.total = _budget_total(budget, popsize)
        self.start = time.perf_counter()
        self.done = 0
        self.in_gen = 0
        self.merge_s = self.upload_s = self.eval_s = 0.0

    def ready(self) -> None:
        """Models loaded (in this process or on the Ray actors; pool workers load on their first
        genome): trials start now."""
        self.start = time.perf_counter()
        self.report("ready")

    def trial(self, merge_s: float, upload_s: float, eval_s: float) -> None:
        self.done += 1
        self.in_gen += 1
        self.merge_s += merge_s
        self.upload_s += upload_s
        self.eval_s += eval_s
        self.report("trial")

    def report(self, kind: str) -> None:
        if kind == "generation":
            self.in_gen = 0
        if self.progress is None:
            return
        st = self.state
        minutes = (time.perf_counter() - self.start) / 60
        hist = st["history"]
        self.progress(EvolveProgress(
            stage=self.stage, kind=kind, generation=st["generation"], trials=st["trials"] + self.in_gen,
            trials_total=self.total, best=st["best"]["fitness"] if st["best"] else None,
            mean=hist[-1]["mean"] if hist else None, trials_per_min=self.done / minutes if minutes > 0 else 0.0,
            merge_s=self.merge_s, eval_s=self.eval_s, upload_s=self.upload_s))


# ----------------------------------------------------------------------------------------- checkpoints


def _resume_state(config: EvolveConfig, stage: str, space: PSSpace | DFSSpace, out: Path, resume: bool) -> dict:
    """A fresh state, or the saved one with the log cut back to the trials it accounts for."""
    log_file, state_file = out / "trials.jsonl", out / STATE_FILE
    if not state_file.exists():
        if (out / LEGACY_STATE_FILE).exists():
            raise _legacy_state_error(out / LEGACY_STATE_FILE)
        if log_file.exists():  # cut off inside the first generation: nothing to keep
            log_file.unlink()
        return _new_state(config, stage, space)
    if not resume:
        raise FastmergeError(f"{out}: already holds an evolve run; pass --resume to continue it")
    state = _load_state(state_file)
    if state["fingerprint"] != _fingerprint(config, stage, space):
        raise _config_changed(out)
    lines = log_file.read_bytes().split(b"\n") if log_file.exists() else []
    if len(lines) < state["trials"] or any(not ln for ln in lines[: state["trials"]]):
        raise FastmergeError(f"{log_file}: holds fewer trials than its checkpoint ({state['trials']}); cannot resume")
    keep = b"".join(ln + b"\n" for ln in lines[: state["trials"]])
    atomic_write(log_file, keep)
    state["done"] = state["done"] and _stop_reason(state, config.budget_for(stage), state["cma"].population_size) \
        is not None
    return state


def _check_resume(root: Path, config: EvolveConfig) -> None:
    """Before ``--resume`` writes anything (the recorded config first of all): every saved stage
    state must load and belong to this config. (The genome size, which needs the models, is checked
    again when each stage starts.)"""
    for stage in ("ps", "dfs"):
        out = root / stage
        if not (out / STATE_FILE).exists():
            if (out / LEGACY_STATE_FILE).exists():
                raise _legacy_state_error(out / LEGACY_STATE_FILE)
            continue
        state = _load_state(out / STATE_FILE)
        if stage not in config.stages or state["fingerprint"].rpartition(":")[0] != config.fingerprint(stage):
            raise _config_changed(out)


def _record_config(root: Path, config: EvolveConfig) -> None:
    """Keep the config next to its results (on --resume only after ``_check_resume`` accepted it)."""
    atomic_write(root / "config.yml", yaml.safe_dump(config.model_dump(), sort_keys=False).encode())


def _config_changed(out: Path) -> FastmergeError:
    return FastmergeError(f"{out}: the config changed since this run started (only budget, out, workers, "
                          "threads, scale, ray_address, device, backend, draw_cache, eval_backend and vllm may change on "
                          "--resume); start a new run in another directory")


def _legacy_state_error(file: Path) -> FastmergeError:
    return FastmergeError(f"{file}: a checkpoint in the old pickle format, which fastmerge no longer loads (loading "
                          f"a pickle can run code); start the run again in a new directory")


# The state file is data: one JSON object, read with json.loads and checked key by key; the
# optimizer's arrays (and its RNG's key) are little-endian bytes in base64 with a whitelisted dtype,
# so nothing in the file can name a class or a function to call.

#: the in-memory state's keys, all saved (plus "format", "version"; "cma" is encoded)
_STATE_KEYS = ("fingerprint", "generation", "trials", "elapsed", "best", "history", "done", "stop_reason", "cma")
_ARRAY_DTYPES = ("float64", "int64", "uint32", "bool")
_SCALAR_DTYPES = ("float64", "int64", "bool")


def _save_state(file: Path, state: dict) -> None:
    data = {"format": STATE_FORMAT, "version": STATE_VERSION}
    data.update({k: state[k] for k in _STATE_KEYS if k != "cma"})
    data["cma"] = _cma_dump(state["cma"])
    atomic_write(file, (json.dumps(data) + "\n").encode())


def _json_type(v: Any) -> str:
    if _is_int(v) and abs(v) >= 2**63:
        return "a number out of range"
    for t, name in ((dict, "an object"), (list, "an array"), (str, "a string"), (bool, "a boolean"),
                    ((int, float), "a number")):
        if isinstance(v, t):
            return name
    return "null"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    """A JSON number that is also a float (an integer beyond float range is not)."""
    return isinstance(v, float) or (_is_int(v) and abs(v) < 2**63)


def _is_num_or_null(v: Any) -> bool:
    return v is None or _is_num(v)


def _check_keys(file: Path, where: str, d: Any, schema: dict, strict: bool = True) -> None:
    """``d`` must be an object holding ``schema``'s keys (and, if ``strict``, no others), each passing its check."""
    if not isinstance(d, dict):
        raise FastmergeError(f"{file}: {where or 'the file'}: expected an object, got {_json_type(d)}")
    prefix = f"{where}." if where else ""
    for key, (check, want) in schema.items():
        if key not in d:
            raise FastmergeError(f"{file}: {prefix}{key}: missing")
        if not check(d[key]):
            raise FastmergeError(f"{file}: {prefix}{key}: expected {want}, got {_json_type(d[key])}")
    if strict and (extra := sorted(set(d) - set(schema))):
        raise FastmergeError(f"{file}: {prefix}{extra[0]}: unknown key")


_BEST_SCHEMA = {
    "generation": (_is_int, "an integer"), "trial": (_is_int, "an integer"),
    "x": (lambda v: isinstance(v, list) and all(map(_is_num, v)), "an array of numbers"),
    "decoded": (lambda v: isinstance(v, dict), "an object"), "fitness": (_is_num, "a number"),
    "metrics": (lambda v: isinstance(v, dict), "an object"),
}
_HISTORY_SCHEMA = {"generation": (_is_int, "an integer"), "best": (_is_num_or_null, "a number or null"),
                   "mean": (_is_num_or_null, "a number or null"),
                   "best_so_far": (_is_num_or_null, "a number or null")}
_STATE_SCHEMA = {
    "format": (lambda v: True, ""),  # both checked first, with their own message
    "version": (lambda v: True, ""),
    "fingerprint": (lambda v: isinstance(v, str), "a string"),
    "generation": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "trials": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "elapsed": (_is_num, "a number"),
    "best": (lambda v: v is None or isinstance(v, dict), "an object or null"),
    "history": (lambda v: isinstance(v, list), "an array"),
    "done": (lambda v: isinstance(v, bool), "a boolean"),
    "stop_reason": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "cma": (lambda v: isinstance(v, dict), "an object"),
}


def _load_state(file: Path) -> dict:
    """The state ``_save_state`` wrote, checked; anything else is a one-line FastmergeError naming
    the file and the key."""
    try:
        raw = file.read_bytes()
    except OSError as e:
        raise FastmergeError(f"{file}: cannot read the evolve state ({e.strerror or e})") from None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FastmergeError(f"{file}: not an evolve state file (invalid JSON: {reason})") from None
    if not isinstance(data, dict):
        raise FastmergeError(f"{file}: not an evolve state file (a JSON value that is {_json_type(data)}, "
                             "expected an object)")
    for key, want in (("format", STATE_FORMAT), ("version", STATE_VERSION)):
        if key not in data:
            raise FastmergeError(f"{file}: {key}: missing (not an evolve state file of this fastmerge)")
        if data[key] != want or type(data[key]) is not type(want):
            raise FastmergeError(f"{file}: {key}: {data[key]!r}, this fastmerge reads {want!r} only")
    _check_keys(file, "", data, _STATE_SCHEMA)
    if data["best"] is not None:
        _check_keys(file, "best", data["best"], _BEST_SCHEMA)
    for i, h in enumerate(data["history"]):
        _check_keys(file, f"history[{i}]", h, _HISTORY_SCHEMA)
    state = {k: data[k] for k in _STATE_KEYS}
    state["cma"] = _cma_load(file, data["cma"])
    return state


def _enc(v: Any, key: str) -> Any:
    """One CMA attribute as JSON: Python scalars as they are, numpy scalars and arrays tagged with their dtype."""
    if v is None or type(v) in (bool, int, float, str):
        return v
    if isinstance(v, np.ndarray) and v.dtype.name in _ARRAY_DTYPES:
        order = "F" if v.flags.f_contiguous and not v.flags.c_contiguous else "C"
        data = v.astype(v.dtype.newbyteorder("<"), copy=False).tobytes(order=order)
        return {"ndarray": v.dtype.name, "shape": list(v.shape), "order": order,
                "data": base64.b64encode(data).decode("ascii")}
    if isinstance(v, np.generic) and v.dtype.name in _SCALAR_DTYPES:
        return {"scalar": v.dtype.name, "value": v.item()}
    raise TypeError(f"cma.{key}: cannot save a {type(v).__name__} in the evolve state")


def _dec(file: Path, where: str, v: Any) -> Any:
    if v is None or type(v) in (bool, int, float, str):
        return v
    if isinstance(v, dict) and set(v) == {"scalar", "value"}:
        name, value = v["scalar"], v["value"]
        ok = {"float64": _is_num, "int64": _is_int, "bool": lambda x: isinstance(x, bool)}.get(name)
        if ok is None or not ok(value):
            raise FastmergeError(f"{file}: {where}: not a float64, int64 or bool scalar")
        try:
            return np.dtype(name).type(value)
        except OverflowError:
            raise FastmergeError(f"{file}: {where}: {value} does not fit a {name}") from None
    if isinstance(v, dict) and set(v) == {"ndarray", "shape", "order", "data"}:
        name, shape, order = v["ndarray"], v["shape"], v["order"]
        if name not in _ARRAY_DTYPES or order not in ("C", "F") or not isinstance(v["data"], str) or \
                not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
            raise FastmergeError(f"{file}: {where}: not a valid array (dtype, shape, order or data)")
        try:
            raw = base64.b64decode(v["data"], validate=True)
        except ValueError:
            raise FastmergeError(f"{file}: {where}: data: not base64") from None
        dtype = np.dtype(name)
        if len(raw) != math.prod(shape) * dtype.itemsize:
            raise FastmergeError(f"{file}: {where}: data: {len(raw)} bytes, the shape {shape} needs "
                                 f"{math.prod(shape) * dtype.itemsize}")
        flat = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype)
        return np.array(flat.reshape(shape, order=order), order=order)
    raise FastmergeError(f"{file}: {where}: expected a number, a string, null or an encoded numpy value, "
                         f"got {_json_type(v)}")


def _cma_dump(cma) -> dict:
    """The optimizer's exact state, as data. Not cmaes's own pickling, which drops the RNG (a fresh
    unseeded one comes back) and stores the covariance as a symmetrized triangle (C is only symmetric
    to ~1e-16), so a resumed run would ask different genomes than an uninterrupted one: every
    attribute with its exact type and bits, arrays with their memory order, the RNG's full state."""
    from cmaes import CMA

    if type(cma) is not CMA:
        raise TypeError(f"cannot save a {type(cma).__name__} optimizer in the evolve state")
    name, key, pos, has_gauss, cached = cma._rng.get_state()
    return {"class": "cmaes.CMA", "attrs": {k: _enc(v, k) for k, v in cma.__dict__.items() if k != "_rng"},
            "rng": {"bit_generator": name, "key": _enc(key, "_rng"), "pos": int(pos), "has_gauss": int(has_gauss),
                    "cached_gaussian": float(cached)}}


def _cma_load(file: Path, d: dict):
    """The ``cmaes.CMA`` ``_cma_dump`` described; checked against a fresh one of the same size (the
    same attributes, arrays of the same dtype and shape) so that a damaged or foreign file fails here,
    in one line, rather than inside the optimizer."""
    CMA = require("cmaes", "resuming an evolve run (CMA-ES)").CMA

    _check_keys(file, "cma", d, {"class": (lambda v: v == "cmaes.CMA", "'cmaes.CMA'"),
                                 "attrs": (lambda v: isinstance(v, dict), "an object"),
                                 "rng": (lambda v: isinstance(v, dict), "an object")})
    attrs = {k: _dec(file, f"cma.attrs.{k}", v) for k, v in d["attrs"].items()}
    mean, weights = attrs.get("_mean"), attrs.get("_weights")
    if not (isinstance(mean, np.ndarray) and mean.ndim == 1 and mean.size > 0 and np.all(np.abs(mean) < 1e32)):
        raise FastmergeError(f"{file}: cma.attrs._mean: missing or not a non-empty vector")
    if not (isinstance(weights, np.ndarray) and weights.ndim == 1 and weights.size >= 2):
        raise FastmergeError(f"{file}: cma.attrs._weights: missing or not a vector of at least 2 weights")
    n = mean.size
    fresh = CMA(mean=np.full(n, 0.5), sigma=1.0, bounds=np.tile([0.0, 1.0], (n, 1)), population_size=weights.size)
    want = {k: v for k, v in fresh.__dict__.items() if k != "_rng"}
    if missing := sorted(set(want) - set(attrs)):
        raise FastmergeError(f"{file}: cma.attrs.{missing[0]}: missing (a state from another cmaes version?)")
    if extra := sorted(set(attrs) - set(want)):
        raise FastmergeError(f"{file}: cma.attrs.{extra[0]}: unknown (a state from another cmaes version?)")
    for k, w in want.items():
        v = attrs[k]
        if isinstance(w, np.ndarray) or k in ("_D", "_B"):
            ok = (v is None and k in ("_D", "_B", "_bounds")) or (
                isinstance(v, np.ndarray) and v.dtype == np.float64
                and (k in ("_D", "_B") or v.shape == w.shape))
        elif isinstance(w, (bool, np.bool_)):
            ok = isinstance(v, (bool, np.bool_))
        else:
            ok = isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, (bool, np.bool_))
        if not ok:
            raise FastmergeError(f"{file}: cma.attrs.{k}: not what cmaes.CMA holds there")
    if attrs["_n_dim"] != n or attrs["_popsize"] != weights.size:
        raise FastmergeError(f"{file}: cma.attrs._n_dim: does not match the optimizer's arrays")
    rng = np.random.RandomState()
    r = d["rng"]
    _check_keys(file, "cma.rng", r, {
        "bit_generator": (lambda v: v == "MT19937", "'MT19937'"), "key": (lambda v: isinstance(v, dict), "an array"),
        "pos": (_is_int, "an integer"), "has_gauss": (_is_int, "an integer"), "cached_gaussian": (_is_num, "a number")})
    key = _dec(file, "cma.rng.key", r["key"])
    if not (isinstance(key, np.ndarray) and key.dtype == np.uint32 and key.shape == (624,)):
        raise FastmergeError(f"{file}: cma.rng.key: expected 624 uint32 words")
    try:
        rng.set_state((r["bit_generator"], key, r["pos"], r["has_gauss"], float(r["cached_gaussian"])))
    except (ValueError, TypeError, OverflowError) as e:
        raise FastmergeError(f"{file}: cma.rng: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    cma = CMA.__new__(CMA)
    cma.__dict__.update(attrs)
    cma._rng = rng
    return cma


def read_trials(file: str | Path, timings: bool = True) -> list[dict]:
    """The trial log as dicts (``timings=False`` drops merge/eval seconds, e.g. to compare runs)."""
    rows = [json.loads(ln) for ln in Path(file).read_text().splitlines() if ln]
    if not timings:
        rows = [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]
    return rows


# ----------------------------------------------------------------------------------------- outputs


def _write_best(stage: str, space: PSSpace | DFSSpace, x: np.ndarray, out: Path) -> Path:
    if isinstance(space, PSSpace):
        from .recipe import load_recipe

        recipe = space.recipe(space.decode(x))
        load_recipe(recipe)  # what we write must be what `fastmerge merge` accepts
        file = out / "best.yml"
        atomic_write(file, yaml.safe_dump(recipe, sort_keys=False).encode())
        return file
    file = out / "best_path.json"
    space.decode(x).save(file, models=space.models, head=space.head)
    return file


def _plot(history: list[dict], file: Path, title: str) -> Path | None:
    """Best and mean fitness per generation (Agg: no display needed)."""
    if not history:
        return None
    matplotlib = require("matplotlib", "the fitness plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gens = [h["generation"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for key, style, label in (("best", "o-", "best in generation"), ("mean", "s--", "mean"),
                              ("best_so_far", "-", "best so far")):
        ys = [np.nan if h[key] is None else h[key] for h in history]
        ax.plot(gens, ys, style, label=label, markersize=3)
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    tmp = file.with_name(f".{file.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, file)
    return file


def _materialize(best: Path, out: Path, write: Callable[[Path, Path, str], Path], device: str) -> Path:
    """Write the best candidate's checkpoint once: a resumed, finished run (e.g. ps+dfs continuing
    into its DFS stage) reuses the model already written for the same best file."""
    import hashlib

    digest = hashlib.sha256(best.read_bytes()).hexdigest()
    marker = out.with_name(f"{out.name}.source")
    if (out / "config.json").exists() and marker.exists() and marker.read_text().strip() == digest:
        return out
    write(best, out, device)
    atomic_write(marker, (digest + "\n").encode())
    return out


def _materialize_ps(best: Path, out: Path, device: str) -> Path:
    from .engine import MergeOptions, merge

    merge(best, out, MergeOptions(device="cuda" if device.startswith("cuda") else "cpu", force=True))
    return out


def _materialize_dfs(best: Path, out: Path, device: str) -> Path:
    from .dfs import export, load_path_file, load_sources

    path, models, head = load_path_file(best)
    sources, tokenizer = load_sources(models, head=head)
    export(sources, path, out, head=head, tokenizer=tokenizer, force=True)
    return out


def _write_result(result: EvolveResult) -> None:
    def conv(v):
        return str(v) if isinstance(v, Path) else v

    stages = [{k: conv(v) for k, v in asdict(s).items() if k not in ("best_x",)} for s in result.stages]
    atomic_write(result.out / "result.json", (json.dumps({"stages": stages}, indent=1) + "\n").encode())
