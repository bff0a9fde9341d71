"""The evolve config (``fastmerge evolve CONFIG.yml``): schema, defaults and validation.

Why validation is its own step: an evolutionary run loads several models and may run for hours,
so every mistake that can be found from the YAML and the files' headers (a missing model, an
unknown method or metric, an empty range, no budget) is reported before any weight is read.

Relative paths in the config (models, base model, tokenizer, evaluator data, the lm_eval evaluator's
include_path, the vqa evaluator's processor) are resolved against the config file's directory, so a config and its models can move
together; ``out`` given on the command line is relative to the working directory.

A config is code, like a script: ``evaluator`` may name any ``module:function`` (with arguments),
which ``fastmerge evolve`` imports and calls, so running a config you did not write is like running
its author's script. Validation checks that a config is well formed, not that it is safe; run only
configs you wrote or have read.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import FastmergeError
from .io import HUB_ID, is_hub_id
from .methods import METHODS, Names
from .recipe import VALIDATORS
from .vlm import DFS_UNSUPPORTED

#: the merge methods a PS search can drive: one fused task-arithmetic op with per-model weights
#: (derived from the registry, fastmerge.methods)
PS_METHODS = Names(lambda m: m.searchable)
#: methods whose per-model density is a searched gene (the others have weights only)
SPARSIFYING = Names(lambda m: m.searchable and m.sparsifies)
#: Llama-family architectures the DFS executor runs (fastmerge.dfs.FAMILIES)
DFS_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
#: metrics the built-in evaluators report; a ``module:function`` evaluator is checked on its first trial
BUILTIN_METRICS = {"math": ("acc", "acc_lang", "n"), "loglik": ("loglik", "ppl", "n", "tokens"),
                   "vqa": ("score", "rouge_l", "rouge_l_ungated", "acc_lang", "n")}
#: every built-in evaluator; lm_eval reports "score" and "<task>/<metric>" for its tasks (the names are
#: checked once its tasks are loaded, before any model)
BUILTIN_EVALUATORS = (*BUILTIN_METRICS, "lm_eval")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Budget(_Strict):
    """When a stage stops: whichever of these comes first, checked between generations.

    ``trials`` rounds up to whole generations (CMA-ES learns from complete generations only).
    ``wall_time`` is seconds, or a string such as ``90s``, ``30m``, ``2h``.
    """

    trials: int | None = None
    generations: int | None = None
    wall_time: float | str | None = None

    def seconds(self) -> float | None:
        return None if self.wall_time is None else parse_duration(self.wall_time)


class CMAConfig(_Strict):
    """CMA-ES settings; the defaults are the paper's (Optuna's CmaEsSampler defaults)."""

    x0: float = 0.5
    sigma0: float = 1 / 6
    popsize: int | None = None  # default 4 + floor(3 ln n)
    seed: int = 0


class PSConfig(_Strict):
    """Parameter-space search: per-model weight (and density) genes, optionally per layer group
    (``group_size`` layers each) and per filter (substrings of tensor names, e.g. ``self_attn``,
    ``mlp``; tensors matching none share one more set of genes)."""

    group_size: int | None = None  # None: one gene set for the whole model
    filters: list[str] = Field(default_factory=list)
    weight: tuple[float, float] = (0.0, 1.0)
    density: tuple[float, float] = (0.0, 1.0)
    parameters: dict[str, Any] = Field(default_factory=dict)  # shared method parameters (normalize, lambda, ...)
    random_seed: int = 0  # the DARE seed written into the recipe
    budget: Budget | None = None


class DFSConfig(_Strict):
    """Data-flow-space search (fastmerge.dfs.DFSGenome). ``models``: the collection the path
    draws from (default: the config's ``models``); with ``ps+dfs`` the best PS merge is put in
    front of it as model A (the head)."""

    models: list[str] | None = None
    repetitions: int = 3
    fix_ends: bool = True
    head: int = 0
    scale_range: tuple[float, float] = (0.0, 2.0)
    init: Literal["paper", "uniform"] = "paper"
    budget: Budget | None = None


class VLLMConfig(_Strict):
    """The ``vllm`` evaluation backend's engine (``eval_backend: vllm``); see fastmerge.backends.vllm_engine."""

    dtype: str | None = None  # None: float32 on a CPU, the checkpoint's own on a GPU
    max_model_len: int | None = None  # None: the model's context length
    kv_cache_gib: float | None = None  # CPU engines only; None: vLLM's default
    enforce_eager: bool | None = None  # None: eager on a CPU, CUDA graphs on a GPU
    engine_args: dict[str, Any] = Field(default_factory=dict)  # any other vllm.LLM keyword


class EvolveConfig(_Strict):
    """What to evolve, how to score it and for how long (DESIGN.md section 7)."""

    models: list[str]
    base_model: str | None = None
    merge_method: str = "dare_ties"
    space: Literal["ps", "dfs", "ps+dfs"] = "ps"
    ps: PSConfig = Field(default_factory=PSConfig)
    dfs: DFSConfig = Field(default_factory=DFSConfig)
    evaluator: dict[str, Any] | str
    metric: str
    tokenizer: str | None = None
    cma: CMAConfig = Field(default_factory=CMAConfig)
    budget: Budget | None = None
    out: str | None = None
    workers: int = 1
    threads: int | None = None  # CPU threads per worker (torch, vLLM); None: the cores split between workers
    scale: Literal["local", "ray"] = "local"  # local: this process or a spawn pool; ray: one Ray actor per worker
    ray_address: str | None = None  # join this Ray cluster (default: start a local one for the stage)
    device: str = "cpu"
    backend: Literal["cpu", "triton"] | None = None
    draw_cache: bool = True  # cpu backend: keep DARE's draws between candidates (Merger(draw_cache=...))
    eval_backend: Literal["hf", "vllm"] = "hf"
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)

    def with_model_paths(self, f: Callable[[str | None], str | None]) -> EvolveConfig:
        """A copy with ``f`` applied to every model location (models, base, tokenizer, DFS models):
        the one list of those fields, for resolving relative paths and for downloading hub ids."""
        c = self.model_copy(deep=True)
        c.models = [f(m) for m in c.models]
        c.base_model = f(c.base_model)
        c.tokenizer = f(c.tokenizer)
        if c.dfs.models is not None:
            c.dfs.models = [f(m) for m in c.dfs.models]
        return c

    # -- loading

    @classmethod
    def from_yaml(cls, source: str | Path | dict, out: str | Path | None = None) -> EvolveConfig:
        """Parse, resolve relative paths and validate (no model is loaded)."""
        where, root, data = "config", Path.cwd(), source
        if not isinstance(source, dict):
            text = str(source)
            path = Path(text)
            if "\n" not in text and path.suffix in (".yml", ".yaml", ".json"):
                if not path.is_file():
                    raise FastmergeError(f"{path}: config file not found")
                where, root, text = str(path), path.resolve().parent, path.read_text()
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise FastmergeError(f"{where}: invalid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise FastmergeError(f"{where}: an evolve config is a mapping (models, evaluator, metric, budget, ...)")
        try:
            config = cls.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            raise FastmergeError(f"{where}: {loc}: {msg}") from None
        config = config._resolved(root)
        if out is not None:
            config.out = str(Path(out).resolve())
        config.check(where)
        return config

    def _resolved(self, root: Path) -> EvolveConfig:
        def fix(p: str | None) -> str | None:
            if p is None:
                return None
            q = Path(p).expanduser()
            if q.is_absolute():
                return str(q)
            if (root / q).exists() or not HUB_ID.match(p):
                return str((root / q).resolve())
            return p  # a hub id

        c = self.with_model_paths(fix)
        if isinstance(c.evaluator, dict):
            def at_root(p: Any) -> Any:
                return str((root / Path(p).expanduser()).resolve()) if isinstance(p, str) else p

            for key in ("data", "include_path", "processor"):
                if key in c.evaluator:
                    v = c.evaluator[key]
                    c.evaluator[key] = [at_root(p) for p in v] if isinstance(v, list) else at_root(v)
        if c.out is not None:
            c.out = str((root / Path(c.out).expanduser()).resolve())
        return c

    # -- validation

    def check(self, where: str = "config") -> None:
        """Every error findable without loading a model, as one clear line."""

        def fail(msg: str) -> None:
            raise FastmergeError(f"{where}: {msg}")

        if not self.models:
            fail("models: give at least one source model")
        if len(set(self.models)) != len(self.models):
            fail("models: a model is listed twice")
        if self.out is None:
            fail("out: no output directory (set out: in the config or pass --out)")
        for key, b in self.stage_budgets().items():
            _check_budget(b, key, fail)
        _check_cma(self.cma, fail)
        if self.workers < 1:
            fail(f"workers: must be >= 1, got {self.workers}")
        if self.threads is not None and self.threads < 1:
            fail(f"threads: must be >= 1, got {self.threads}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            fail(f"device: expected cpu, cuda or cuda:N, got {self.device!r}")
        self._check_scale(fail)
        if self.backend == "cpu" and self.device != "cpu":
            fail("backend: the cpu backend merges CPU tensors; use backend: triton on a GPU")
        self._check_evaluator(fail)
        self._check_eval_backend(fail)
        if self.tokenizer is not None and not is_hub_id(self.tokenizer) and not Path(self.tokenizer).is_dir():
            fail(f"tokenizer: {self.tokenizer}: directory not found")
        if "ps" in self.stages:
            self._check_ps(fail)
        if "dfs" in self.stages:
            self._check_dfs(fail)

    def _check_eval_backend(self, fail) -> None:
        if self.eval_backend != "vllm":
            if self.vllm != VLLMConfig():
                fail("vllm: engine options are for eval_backend: vllm (the config uses eval_backend: hf)")
            return
        if any(_is_vlm(m) for m in self.ps_models):
            fail("eval_backend: vllm scores text models; a VLM's merges are scored on eval_backend: hf")
        if "dfs" in self.stages:
            fail(f"eval_backend: vllm scores parameter-space merges; a DFS path model is no vLLM architecture "
                 f"(space: {self.space}: use space: ps, or eval_backend: hf)")
        v = self.vllm
        if v.max_model_len is not None and v.max_model_len < 1:
            fail(f"vllm.max_model_len: must be >= 1, got {v.max_model_len}")
        if v.kv_cache_gib is not None and not (v.kv_cache_gib > 0 and math.isfinite(v.kv_cache_gib)):
            fail(f"vllm.kv_cache_gib: must be > 0, got {v.kv_cache_gib}")
        if v.kv_cache_gib is not None and self.device != "cpu":
            fail("vllm.kv_cache_gib: sizes a CPU engine's KV cache; on a GPU set "
                 "vllm.engine_args: {gpu_memory_utilization: ...}")
        reserved = {"model", "tokenizer", "skip_tokenizer_init", "seed"} & set(v.engine_args)
        if reserved:
            fail(f"vllm.engine_args: {', '.join(sorted(reserved))} is set by fastmerge (the model is the base, "
                 "prompts are tokenized by the config's tokenizer)")

    def _check_scale(self, fail) -> None:
        if self.ray_address is not None and self.scale != "ray":
            fail("ray_address: joining a Ray cluster needs scale: ray")
        if self.ray_address is not None and not self.ray_address.strip():
            fail("ray_address: empty; give the head's host:port or auto, or leave it out to start a local cluster")
        if self.scale == "ray" and self.device.startswith("cuda:"):
            fail(f"device: with scale: ray each worker gets its own GPU from Ray; use device: cuda, not {self.device}")

    def _check_evaluator(self, fail) -> None:
        ev = self.evaluator
        if isinstance(ev, str):
            if ":" not in ev and ev not in BUILTIN_EVALUATORS:
                fail(f"evaluator: {ev!r} is neither a built-in evaluator ({', '.join(BUILTIN_EVALUATORS)}) "
                     "nor 'package.module:function'")
            if ev == "lm_eval":
                fail("evaluator: lm_eval needs its tasks: {name: lm_eval, tasks: [...], include_path: DIR}")
            name = ev
        else:
            name = ev.get("name")
            if not isinstance(name, str):
                fail("evaluator: a mapping needs a 'name' (math, loglik, lm_eval or 'package.module:function')")
            data = ev.get("data")
            if data is not None and not Path(data).is_file():
                fail(f"evaluator.data: {data}: file not found")
        if not self.metric:
            fail("metric: name the evaluator metric to maximise (e.g. acc_lang)")
        if name == "lm_eval":
            _check_lm_eval(ev, self.metric, fail)
        known = BUILTIN_METRICS.get(name)
        if known is not None and self.metric not in known:
            fail(f"metric: {self.metric!r} is not reported by the {name!r} evaluator (it reports {', '.join(known)})")

    def _check_ps(self, fail) -> None:
        method = self.merge_method
        if method not in PS_METHODS:
            fail(f"merge_method: {method!r} cannot be searched in parameter space (use one of {', '.join(PS_METHODS)})")
        spec = METHODS[method]
        if spec.needs_base and self.base_model is None:
            fail(f"base_model: merge_method {method!r} needs a base_model")
        if not spec.needs_base and self.base_model is not None:
            fail(f"base_model: merge_method {method!r} has no base model; list every model under models")
        if self.base_model in self.models:
            fail("base_model: the base model is also listed under models")
        ps = self.ps
        if ps.group_size is not None and ps.group_size < 1:
            fail(f"ps.group_size: must be >= 1 layers, got {ps.group_size}")
        if len(set(ps.filters)) != len(ps.filters) or any(not f for f in ps.filters):
            fail("ps.filters: filters must be distinct non-empty substrings of tensor names")
        _check_range(ps.weight, "ps.weight", fail)
        if method in SPARSIFYING:
            _check_range(ps.density, "ps.density", fail)
            if ps.density[0] < 0 or ps.density[1] > 1:
                fail(f"ps.density: a density is a keep fraction in [0, 1], got {list(ps.density)}")
        for key, value in ps.parameters.items():
            if key not in spec.shared:
                fail(f"ps.parameters: unknown parameter {key!r} for merge_method {method!r} "
                     f"(known: {', '.join(sorted(spec.shared))})")
            try:
                VALIDATORS[key](value)
            except (ValidationError, FastmergeError):
                fail(f"ps.parameters.{key}: invalid value {value!r}")
        layers = {m: _num_layers(m, fail) for m in self.ps_models}
        if len(set(layers.values()) - {None}) > 1:
            fail(f"models: the PS models have different layer counts ({layers}); a PS merge needs one architecture")
        n = self.ps_num_genes(next((v for v in layers.values() if v), 1))
        if n < 1:
            fail("ps: the search space is empty")

    def _check_dfs(self, fail) -> None:
        d = self.dfs
        models = self.dfs_models
        for m in [*models, *(self.ps_models if self.space == "ps+dfs" else [])]:
            if _is_vlm(m):
                fail(f"{m} is a vision-language model: {DFS_UNSUPPORTED} (use space: ps)")
        if d.repetitions < 1:
            fail(f"dfs.repetitions: must be >= 1, got {d.repetitions}")
        n_models = len(models) + (1 if self.space == "ps+dfs" else 0)
        if not 0 <= d.head < n_models:
            fail(f"dfs.head: {d.head} is not one of the {n_models} DFS models")
        if self.space == "ps+dfs" and d.head != 0:
            fail("dfs.head: with ps+dfs the PS merge is model A (head 0)")
        _check_range(d.scale_range, "dfs.scale_range", fail)
        kinds = {}
        for m in models:
            cfg = _config_json(m, fail)
            if cfg is not None:
                if cfg.get("model_type") not in DFS_FAMILIES:
                    fail(f"dfs.models: {m} is {cfg.get('model_type')!r}; DFS runs {', '.join(DFS_FAMILIES)}")
                kinds[m] = (cfg.get("model_type"), cfg.get("hidden_size"))
        if len(set(kinds.values())) > 1:
            fail(f"dfs.models: a path needs one family and hidden size, got {sorted(set(kinds.values()))}")

    # -- derived

    @property
    def stages(self) -> list[str]:
        return {"ps": ["ps"], "dfs": ["dfs"], "ps+dfs": ["ps", "dfs"]}[self.space]

    @property
    def ps_models(self) -> list[str]:
        return ([self.base_model] if self.base_model else []) + list(self.models)

    @property
    def dfs_models(self) -> list[str]:
        """The DFS collection (without the PS merge that ps+dfs puts in front)."""
        return list(self.dfs.models) if self.dfs.models is not None else list(self.models)

    def stage_budgets(self) -> dict[str, Budget | None]:
        own = {"ps": self.ps.budget, "dfs": self.dfs.budget}
        return {f"{s}.budget" if own[s] else "budget": own[s] or self.budget for s in self.stages}

    def budget_for(self, stage: str) -> Budget:
        b = {"ps": self.ps.budget, "dfs": self.dfs.budget}[stage] or self.budget
        assert b is not None  # check() guarantees it
        return b

    def ps_num_genes(self, num_layers: int) -> int:
        groups = 1 if not self.ps.group_size else math.ceil(num_layers / self.ps.group_size)
        per = 2 if self.merge_method in SPARSIFYING else 1
        return groups * (len(self.ps.filters) + 1 if self.ps.filters else 1) * len(self.models) * per

    def fingerprint(self, stage: str) -> str:
        """What a resumed stage must share with the run it continues: not the budget, out, nor where
        and how the candidates are scored (workers, threads, scale, ray_address, devices, merge and
        evaluation backends), which do not change the search."""
        keep = self.model_dump(exclude={"budget", "workers", "threads", "scale", "ray_address", "out", "device",
                                        "backend", "draw_cache", "eval_backend", "vllm"})
        keep["ps"].pop("budget", None)
        keep["dfs"].pop("budget", None)
        keep["stage"] = stage
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------- helpers


def parse_duration(value: float | str) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([smhd]?)\s*", str(value))
    if not m:
        raise FastmergeError(f"wall_time: expected seconds or a duration like 30m or 2h, got {value!r}")
    return float(m[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]]


def _check_budget(b: Budget | None, key: str, fail) -> None:
    if b is None or (b.trials is None and b.generations is None and b.wall_time is None):
        fail(f"{key}: give a budget (trials, generations or wall_time)")
    for name in ("trials", "generations"):
        v = getattr(b, name)
        if v is not None and v < 1:
            fail(f"{key}.{name}: must be >= 1, got {v}")
    if b.wall_time is not None:
        try:
            s = b.seconds()
        except FastmergeError as e:
            fail(f"{key}.{e}")
        if not s > 0:
            fail(f"{key}.wall_time: must be > 0, got {b.wall_time!r}")


def _check_cma(c: CMAConfig, fail) -> None:
    if not 0.0 <= c.x0 <= 1.0:
        fail(f"cma.x0: the search space is [0, 1]; x0 must lie in it, got {c.x0}")
    if not (c.sigma0 > 0 and math.isfinite(c.sigma0)):
        fail(f"cma.sigma0: must be > 0, got {c.sigma0}")
    if c.popsize is not None and c.popsize < 4:  # below 4, CMA-ES's rank-mu update has zero weight (0/0)
        fail(f"cma.popsize: must be >= 4, got {c.popsize}")


def _check_lm_eval(ev: dict, metric: str, fail) -> None:
    """The lm_eval evaluator's shape (its task names and metrics are checked when its tasks load)."""
    tasks = ev.get("tasks")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        fail(f"evaluator.tasks: a non-empty list of lm-eval task names, got {tasks!r}")
    paths = ev.get("include_path")
    for p in paths if isinstance(paths, list) else [] if paths is None else [paths]:
        if not isinstance(p, str) or not Path(p).is_dir():
            fail(f"evaluator.include_path: {p}: directory not found")
    task, slash, name = metric.partition("/")
    if metric != "score" and not (slash and task and name):
        fail(f"metric: the lm_eval evaluator reports 'score' (the weighted mean over its tasks) and "
             f"'<task>/<metric>' (e.g. {tasks[0]}/acc), not {metric!r}")


def _check_range(r: tuple[float, float], key: str, fail) -> None:
    lo, hi = r
    if not (math.isfinite(lo) and math.isfinite(hi)) or not lo < hi:
        fail(f"{key}: expected [low, high] with low < high, got {list(r)}")


def _config_json(model: str, fail) -> dict | None:
    """A local model's config.json (None for a hub id: it is fetched when the run starts)."""
    if is_hub_id(model):
        return None
    path = Path(model)
    if not path.is_dir():
        fail(f"{model}: model directory not found")
    cfg = path / "config.json"
    if not cfg.is_file():
        fail(f"{model}: no config.json (not a Hugging Face model directory)")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        fail(f"{cfg}: invalid JSON ({e})")
    return None


def _is_vlm(model: str) -> bool:
    """A local model directory whose config.json describes a vision-language model (fastmerge.vlm)."""
    from .vlm import is_vlm

    cfg = Path(model) / "config.json"
    try:
        return not is_hub_id(model) and cfg.is_file() and is_vlm(json.loads(cfg.read_text()))
    except (OSError, ValueError):
        return False


def _num_layers(model: str, fail) -> int | None:
    cfg = _config_json(model, fail)
    if cfg is None:
        return None
    from .plan import model_num_layers

    n = model_num_layers(model)
    if not isinstance(n, int) or n < 1:
        fail(f"{model}/config.json: no layer count (num_hidden_layers, n_layer, num_layers or n_layers)")
    return n
