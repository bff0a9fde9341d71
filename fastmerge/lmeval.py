"""lm-evaluation-harness tasks as fitness (DESIGN 8): ``{name: lm_eval, tasks: [...], include_path: DIR}``.

Any lm-eval task -- a local task YAML over a local JSONL (``dataset_path: json``,
``dataset_kwargs: {data_files: ...}``), or a built-in one whose data are in the Hugging Face cache --
scores the live candidate, so a merge can be evolved towards exactly the numbers a leaderboard run
of ``lm_eval`` would report. The tasks (and their data) are loaded once, in the constructor, so a bad
task name, directory or metric fails before any model is loaded; each call runs lm-eval's own
``evaluate`` over the current weights:

- a ``transformers.PreTrainedModel`` (a ``Merger``'s module, a checkpoint) is scored by lm-eval's own
  ``HFLM`` wrapped around the live module (built once per module: candidates change its weights in
  place), so the result is lm-eval's to the last digit;
- anything else -- a :class:`~fastmerge.backends.Backend` (the vLLM engine), a DFS ``PathModel``, a
  plain module honouring the HF forward contract -- through :class:`BackendLM`, an ``lm_eval`` ``LM``
  over the backend interface that tokenizes exactly as ``HFLM`` does;
- an ``lm_eval.api.model.LM`` is used as it is.

Metrics are ``"<task>/<metric>"`` for every task (lm-eval's ``acc,none`` is ``acc``; a metric under a
named filter keeps it: ``exact_match,strict-match``) and ``"score"``: the weighted mean over the
configured tasks of one metric each (a metric lm-eval marks lower-is-better, e.g. perplexity, enters
negated, so a higher score is always better). ``lm_eval`` is imported here only when an evaluator is
built: ``pip install 'fastmerge[lm-eval]'``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ._optional import require
from .backends import Backend, HFBackend
from .errors import FastmergeError

__all__ = ["LMEvalEvaluator", "metric_key"]  # and BackendLM, made on first access (module __getattr__)

#: the few-shot sampler's seed: lm-eval's default (``simple_evaluate``'s ``fewshot_random_seed``)
FEWSHOT_SEED = 1234
#: generation settings a greedy backend honours (sampling settings are moot when do_sample is off)
_GREEDY_KWARGS = frozenset({"do_sample", "temperature", "top_p", "top_k"})
#: lm-eval modules that draw tqdm bars on every call (silenced while a candidate is scored)
_TQDM_MODULES = ("lm_eval.api.task", "lm_eval.api.model", "lm_eval.models.huggingface")
_CWD_LOCK = threading.Lock()


def _lm_eval() -> Any:
    """``import lm_eval``, offline unless the user said otherwise, quiet unless asked to talk."""
    _offline()
    mod = require("lm_eval", "the lm_eval evaluator (lm-evaluation-harness tasks)")
    log = logging.getLogger("lm_eval")
    level = os.environ.get("LMEVAL_LOG_LEVEL")  # lm-eval's own switch wins
    if level:
        log.setLevel(level.upper())
    elif log.level == logging.NOTSET:
        # warnings on every task load and every call ("metric acc is defined, but aggregation is not")
        log.setLevel(logging.ERROR)
    return mod


def _offline() -> None:
    """No network: a fitness call must not wait on, or depend on, the hub. ``HF_DATASETS_OFFLINE`` and
    ``HF_HUB_OFFLINE`` are set when unset (set either to 0 to allow downloads); both libraries read
    them at import, so one already imported is switched too."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        if var in os.environ:
            continue
        os.environ[var] = "1"
        if var == "HF_DATASETS_OFFLINE" and "datasets.config" in sys.modules:
            cfg = sys.modules["datasets.config"]
            cfg.HF_HUB_OFFLINE = cfg.HF_DATASETS_OFFLINE = True
        if var == "HF_HUB_OFFLINE" and "huggingface_hub.constants" in sys.modules:
            sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = True


def _silent_tqdm(*args: Any, **kwargs: Any) -> Any:
    from tqdm import tqdm

    kwargs["disable"] = True
    return tqdm(*args, **kwargs)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No progress bars from lm-eval (three per task and call) or datasets while inside."""
    saved = {}
    for name in _TQDM_MODULES:
        mod = sys.modules.get(name)
        if mod is not None and hasattr(mod, "tqdm"):
            saved[mod] = mod.tqdm
            mod.tqdm = _silent_tqdm
    ds_logging = sys.modules.get("datasets.utils.logging")
    bars = ds_logging is not None and ds_logging.is_progress_bar_enabled()
    if bars:
        ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        for mod, orig in saved.items():
            mod.tqdm = orig
        if bars:
            ds_logging.enable_progress_bar()


@contextlib.contextmanager
def _cwd(path: Path | None) -> Iterator[None]:
    """Run in ``path`` (None: where we are). datasets resolves a task's relative ``data_files``
    against the working directory; loading from the task YAML's directory lets a task and its data
    move together."""
    if path is None:
        yield
        return
    with _CWD_LOCK:
        old = os.getcwd()
        os.chdir(path)
        try:
            yield
        finally:
            os.chdir(old)


def _relative_paths(cfg: Mapping) -> list[str]:
    """The relative local paths a task config reads its data from (dataset_path, data_files, data_dir)."""
    out: list[str] = []

    def add(v: Any) -> None:
        if isinstance(v, str):
            if v and not Path(v).expanduser().is_absolute() and "://" not in v:
                out.append(v)
        elif isinstance(v, Mapping):
            for x in v.values():
                add(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                add(x)

    kw = cfg.get("dataset_kwargs")
    if isinstance(kw, Mapping):
        add(kw.get("data_files"))
        add(kw.get("data_dir"))
    path = cfg.get("dataset_path")
    if isinstance(path, str) and os.sep in path:  # "json", "gsm8k" are builders / hub ids, not paths
        add(path)
    return out


def _exists(base: Path, p: str) -> bool:
    return any(base.glob(p)) if any(c in p for c in "*?[") else (base / p).exists()


def _leaf_entries(index: Mapping[str, Any], name: str, seen: set[str] | None = None) -> list[Any]:
    """The task-index entries of ``name``'s tasks: itself, or a group's or tag's members."""
    seen = set() if seen is None else seen
    entry = index.get(name)
    if entry is None or name in seen:
        return []
    seen.add(name)
    kind = getattr(getattr(entry, "kind", None), "name", "")
    if kind == "TAG":
        members = sorted(getattr(entry, "tags", ()))
    elif kind == "GROUP" and isinstance(getattr(entry, "cfg", None), Mapping):
        task = entry.cfg.get("task")
        members = [m if isinstance(m, str) else m.get("task") for m in (task if isinstance(task, list) else [])
                   if isinstance(m, (str, Mapping))]
    else:
        return [entry]
    return [e for m in members if isinstance(m, str) for e in _leaf_entries(index, m, seen)]


def _data_dir(index: Mapping[str, Any], name: str) -> Path | None:
    """The directory of ``name``'s task YAMLs when their data are given relative to it and not to
    the working directory (which is what lm-eval itself reads them relative to), else None. Tasks of
    a group whose data lie beside YAMLs in different directories are left to lm-eval."""
    dirs = set()
    for entry in _leaf_entries(index, name):
        yaml_path, cfg = getattr(entry, "yaml_path", None), getattr(entry, "cfg", None)
        if yaml_path is None or not isinstance(cfg, Mapping):
            continue
        root = Path(yaml_path).resolve().parent
        rel = _relative_paths(cfg)
        if any(_exists(root, p) for p in rel) and not any(_exists(Path.cwd(), p) for p in rel):
            dirs.add(root)
    return dirs.pop() if len(dirs) == 1 else None


def metric_key(key: str) -> str | None:
    """lm-eval's result key -> ours: ``acc,none`` -> ``acc``; ``exact_match,strict-match`` stays;
    None for what is not a metric (``alias``, ``sample_len``, ``acc_stderr,none``)."""
    name, sep, filt = key.partition(",")
    if not sep or name.endswith("_stderr"):
        return None
    return name if filt == "none" else key


# --------------------------------------------------------------------------------------------------
# An lm-eval LM over any fastmerge backend
# --------------------------------------------------------------------------------------------------


def _backend_lm_class() -> type:
    """``BackendLM`` subclasses lm-eval's ``TemplateLM``, so it is defined on first use (lm-eval is
    an optional dependency): ``BackendLM(backend, batch_size=16, max_length=None, max_gen_toks=256,
    add_bos_token=None)``."""
    global _BACKEND_LM
    if _BACKEND_LM is not None:
        return _BACKEND_LM
    _lm_eval()
    from lm_eval import utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import (
        _add_special_kwargs,
        handle_stop_sequences,
        has_bos_prefix,
        normalize_gen_kwargs,
        postprocess_generated_text,
        resolve_max_length,
    )

    class BackendLM(TemplateLM):
        """lm-eval's ``LM`` over a :class:`~fastmerge.backends.Backend`: what the vLLM backend and DFS
        path models are scored through. Tokenization is ``HFLM``'s -- context ids + continuation ids
        with the context's trailing whitespace moved into the continuation (``TemplateLM._encode_pair``),
        an empty context replaced by the bos (or eos) token, the same left truncation -- so on the same
        weights it gives ``HFLM``'s numbers. Generation is greedy only."""

        def __init__(self, backend: Backend, batch_size: int = 16, max_length: int | None = None,
                     max_gen_toks: int = 256, add_bos_token: bool | None = None) -> None:
            super().__init__()
            self.backend = backend
            self.tokenizer = backend.tokenizer
            self.batch_size = batch_size
            self.add_bos_token = add_bos_token
            self._max_gen_toks = max_gen_toks
            if max_length is None:  # the engine's own limit: vLLM's max_model_len, else the model config's
                max_length = getattr(backend, "max_length", None) or getattr(
                    getattr(getattr(backend, "llm", None), "model_config", None), "max_model_len", None)
            if max_length is None:
                config = getattr(getattr(backend, "model", None), "config", None)
                max_length = resolve_max_length(config, self.tokenizer)
            self._max_length = int(max_length)

        # -- what lm-eval asks of a TemplateLM

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:
            bos = self.tokenizer.bos_token_id
            return bos if bos is not None else self.tokenizer.eos_token_id

        @property
        def max_length(self) -> int:
            return self._max_length

        @property
        def max_gen_toks(self) -> int:
            return self._max_gen_toks

        def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                       left_truncate_len: int | None = None, **kwargs: Any) -> list[int]:
            """As ``HFLM.tok_encode``: special tokens per the tokenizer unless told, none when the
            text already starts with the bos."""
            special = _add_special_kwargs(add_special_tokens, self.add_bos_token)
            if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
                special["add_special_tokens"] = False
            ids = list(self.tokenizer.encode(string, **special))
            return ids[-left_truncate_len:] if left_truncate_len else ids

        def _loglikelihood_tokens(self, requests: Sequence[tuple[Any, list[int], list[int]]],
                                  disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
            pairs = []
            for _, ctx, cont in requests:
                if not cont:
                    raise FastmergeError("lm_eval: a request's continuation is empty (nothing to score)")
                if len(cont) > self.max_length:
                    raise FastmergeError(f"lm_eval: a continuation of {len(cont)} tokens does not fit "
                                         f"the model's {self.max_length}")
                whole = (list(ctx) + list(cont))[-(self.max_length + 1):]  # HFLM's left truncation
                pairs.append((whole[:len(whole) - len(cont)], list(cont)))
            return self.backend.loglikelihood(pairs, batch_size=self.batch_size)

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
            """As ``HFLM``: the text (with its special tokens) in disjoint windows of the model's
            length, each conditioned on what precedes it, the first on the bos token."""
            windows, counts = [], []
            for (text,) in (r.args for r in requests):
                ws = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)]
                windows.extend((None, ctx, cont) for ctx, cont in ws)
                counts.append(len(ws))
            scores = self._loglikelihood_tokens(windows)
            out, i = [], 0
            for n in counts:
                out.append(sum(lp for lp, _ in scores[i:i + n]))
                i += n
            return out

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
            """Greedy continuations cut before the first ``until`` string (or the eos), at most
            ``max_gen_toks`` tokens; requests are grouped by their settings, as ``HFLM`` does."""
            out: list[str | None] = [None] * len(requests)
            groups: dict[str, list[int]] = {}
            for i, r in enumerate(requests):
                groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
            eos = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
            for idx in groups.values():
                kwargs = dict(normalize_gen_kwargs(requests[idx[0]].args[1], self.max_gen_toks))
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                max_gen = int(kwargs.pop("max_gen_toks"))
                if kwargs.get("do_sample"):
                    raise FastmergeError("lm_eval: a task samples (do_sample: true); only greedy decoding is "
                                         "scored through a fastmerge backend")
                extra = sorted(k for k in kwargs if k not in _GREEDY_KWARGS)
                if extra:
                    raise FastmergeError(f"lm_eval: generation_kwargs {', '.join(extra)} are not supported "
                                         "through a fastmerge backend (greedy, until and max_gen_toks only)")
                if self.max_length - max_gen <= 0:
                    raise FastmergeError(f"lm_eval: max_gen_toks {max_gen} leaves no room for a prompt in the "
                                         f"model's {self.max_length} tokens")
                rows = [self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_gen)
                        for i in idx]
                ids = self.backend.generate_ids(rows, max_gen, until, batch_size=self.batch_size)
                for i, r in zip(idx, ids):
                    text = self.tokenizer.decode(r, skip_special_tokens=True)
                    out[i] = postprocess_generated_text(text, until, None)
            return out  # type: ignore[return-value]

    BackendLM.__module__ = __name__
    _BACKEND_LM = BackendLM
    return _BACKEND_LM


_BACKEND_LM: type | None = None


def __getattr__(name: str) -> Any:
    """``fastmerge.lmeval.BackendLM``: the class, made (and lm-eval imported) on first access."""
    if name == "BackendLM":
        return _backend_lm_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------------
# The evaluator
# --------------------------------------------------------------------------------------------------


def _as_names(tasks: Any) -> list[str]:
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",")]
    if not isinstance(tasks, (list, tuple)) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise FastmergeError(f"lm_eval: tasks must be a non-empty list of task names, got {tasks!r}")
    if len(set(tasks)) != len(tasks):
        raise FastmergeError(f"lm_eval: a task is listed twice in {list(tasks)}")
    return list(tasks)


def _as_dirs(include_path: Any) -> list[Path]:
    if include_path is None:
        return []
    items = include_path if isinstance(include_path, (list, tuple)) else [include_path]
    dirs = []
    for p in items:
        if not isinstance(p, (str, os.PathLike)) or not Path(p).expanduser().is_dir():
            raise FastmergeError(f"lm_eval: include_path {p}: directory not found")
        dirs.append(Path(p).expanduser().resolve())
    return dirs


def _is_path_model(module: Any) -> bool:
    """A DFS ``PathModel`` is a PreTrainedModel too, but its decoder is a path over other models'
    layers: it is scored by the hf backend's own loop (the one tested on path models), through
    :class:`BackendLM`. fastmerge.dfs is not imported for this: no path model exists without it."""
    dfs = sys.modules.get("fastmerge.dfs")
    return dfs is not None and isinstance(module, dfs.PathModel)


class LMEvalEvaluator:
    """lm-evaluation-harness tasks as one evaluator: ``{"<task>/<metric>": float, ..., "score": float}``.

    ``tasks``: task (or group) names, looked up in ``include_path`` (a directory, or a list of them,
    of task YAMLs; lm-eval's ``--include_path``) and, for names not found there (or with no
    ``include_path``), among lm-eval's built-in tasks (indexing those takes ~15 s; their data must be
    in the local Hugging Face cache: nothing is downloaded unless ``HF_DATASETS_OFFLINE=0``).
    ``include_defaults``: True/False to always/never index the built-in tasks.
    ``metric``: the metric each task contributes to ``score`` -- one name for all, or a mapping
    task -> name (default: each task's first metric, under its first filter).
    ``weights``: task -> weight (a task not named weighs 1), or a list in task order (default equal:
    a plain average, the paper's JP-LMEH score). ``num_fewshot``, ``limit`` (a count, or a fraction < 1), ``batch_size`` and
    ``max_length`` are lm-eval's. A relative data path in a task YAML is read relative to the YAML's
    directory when it is there (lm-eval itself reads it relative to the working directory).
    """

    def __init__(self, tasks: Sequence[str] | str, include_path: str | Path | Sequence[str | Path] | None = None,
                 metric: str | Mapping[str, str] | None = None,
                 weights: Mapping[str, float] | Sequence[float] | None = None, num_fewshot: int | None = None,
                 limit: int | float | None = None, batch_size: int = 16, include_defaults: bool | None = None,
                 max_length: int | None = None, fewshot_seed: int = FEWSHOT_SEED) -> None:
        self.tasks = _as_names(tasks)
        self.include_path = _as_dirs(include_path)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise FastmergeError(f"lm_eval: batch_size must be an integer >= 1, got {batch_size!r}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0):
            raise FastmergeError(f"lm_eval: limit must be a count >= 1 or a fraction in (0, 1), got {limit!r}")
        if limit is not None and limit >= 1 and limit != int(limit):
            raise FastmergeError(f"lm_eval: limit above 1 must be a whole count, got {limit!r}")
        if num_fewshot is not None and (not isinstance(num_fewshot, int) or isinstance(num_fewshot, bool)
                                        or num_fewshot < 0):
            raise FastmergeError(f"lm_eval: num_fewshot must be an integer >= 0, got {num_fewshot!r}")
        self.limit = int(limit) if limit is not None and limit >= 1 else limit
        self.batch_size = batch_size
        self.max_length = max_length
        self.fewshot_seed = fewshot_seed
        self.weights = self._weights(weights)
        self._loaded = self._load(include_defaults)
        self._set_fewshot(num_fewshot)
        self.score_metrics, self.higher_is_better = self._score_metrics(metric)
        self.last_results: dict = {}
        self._cached: tuple[Any, Any, Any] | None = None  # (model, tokenizer, LM) of the last call

    # -- construction

    def _weights(self, weights: Mapping[str, float] | Sequence[float] | None) -> dict[str, float]:
        if weights is None:
            out = dict.fromkeys(self.tasks, 1.0)
        elif isinstance(weights, Mapping):
            unknown = [k for k in weights if k not in self.tasks]
            if unknown:
                raise FastmergeError(f"lm_eval: weights: {unknown[0]!r} is not one of the tasks "
                                     f"({', '.join(self.tasks)})")
            out = {t: weights.get(t, 1.0) for t in self.tasks}
        elif isinstance(weights, (list, tuple)):
            if len(weights) != len(self.tasks):
                raise FastmergeError(f"lm_eval: weights: {len(weights)} weights for {len(self.tasks)} tasks")
            out = dict(zip(self.tasks, weights))
        else:
            raise FastmergeError(f"lm_eval: weights must be a mapping task -> weight or a list, got {weights!r}")
        for t, w in out.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not (math.isfinite(w) and w >= 0):
                raise FastmergeError(f"lm_eval: weights: {t}: expected a finite number >= 0, got {w!r}")
        if not sum(out.values()) > 0:
            raise FastmergeError("lm_eval: weights: every weight is 0")
        return {t: float(w) for t, w in out.items()}

    def _load(self, include_defaults: bool | None) -> dict:
        """Every task built (and its data read) once, from include_path first, then the built-ins."""
        _lm_eval()
        from lm_eval.tasks import TaskManager

        paths = [str(p) for p in self.include_path] or None
        defaults = bool(include_defaults) or not self.include_path
        with _quiet():
            own = TaskManager(include_path=paths, include_defaults=defaults)
            missing = [t for t in self.tasks if t not in own.all_tasks and not Path(t).is_file()]
            managers = dict.fromkeys(self.tasks, own)
            if missing and include_defaults is None and not defaults:
                defaults = True
                full = TaskManager(include_path=paths, include_defaults=True)
                managers.update(dict.fromkeys(missing, full))
                missing = [t for t in missing if t not in full.all_tasks]
            if missing:
                where = ([f"include_path {', '.join(paths)}"] if paths else []) + \
                    (["lm-eval's built-in tasks"] if defaults else [])
                hint = " (lm-eval skips a task YAML it cannot parse)" if paths else ""
                raise FastmergeError(f"lm_eval: no task {missing[0]!r} in {' or '.join(where)}{hint}")
            loaded: dict = {"tasks": {}, "groups": {}, "group_map": {}, "names": {}}
            for name in self.tasks:
                tm = managers[name]
                try:
                    with _cwd(_data_dir(tm.task_index, name)):
                        got = tm.load([name])
                except FastmergeError:
                    raise
                except Exception as e:  # lm-eval and datasets raise anything: a bad YAML, missing data, ...
                    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                    raise FastmergeError(f"lm_eval: cannot load task {name!r}: {type(e).__name__}: {first}") from None
                loaded["names"][name] = self._result_name(name, got)
                for key in ("tasks", "groups", "group_map"):
                    for k, v in got.get(key, {}).items():
                        if key == "tasks" and k in loaded["tasks"]:
                            raise FastmergeError(f"lm_eval: task {k!r} is loaded twice (listed, or in two groups)")
                        loaded[key][k] = v
        return loaded

    @staticmethod
    def _result_name(spec: str, got: dict) -> str:
        """The name lm-eval reports ``spec``'s results under (a tag has none: name its tasks)."""
        if spec in got.get("tasks", {}) or spec in got.get("groups", {}):
            return spec
        if not got.get("groups") and len(got.get("tasks", {})) == 1:  # a YAML file path
            return next(iter(got["tasks"]))
        raise FastmergeError(f"lm_eval: {spec!r} is a tag of {len(got.get('tasks', {}))} tasks; list them "
                             "(or a group of them) under tasks")

    def _set_fewshot(self, num_fewshot: int | None) -> None:
        """As ``lm_eval.simple_evaluate``: a task whose config says 0 shots keeps 0."""
        for task in self._loaded["tasks"].values():
            if num_fewshot is not None:
                if task.get_config("num_fewshot") != 0:
                    task.set_config(key="num_fewshot", value=num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)

    def _predicted(self, name: str) -> dict[str, bool] | None:
        """Our metric names a task will report -> higher is better (None for a group: known only
        once it has run)."""
        task = self._loaded["tasks"].get(self._loaded["names"][name])
        if task is None:
            return None
        better = dict(task.higher_is_better())
        filters = [getattr(f, "name", "none") for f in getattr(task, "_filters", None) or []] or ["none"]
        return {metric_key(f"{m},{f}"): bool(hib) for f in filters for m, hib in better.items()}

    def _score_metrics(self, metric: str | Mapping[str, str] | None) -> tuple[dict[str, str | None], dict[str, bool]]:
        """task -> the metric it contributes to ``score`` (checked against what it reports), and
        task -> whether that metric is higher-is-better (a group's: known once it has run)."""
        if isinstance(metric, Mapping):
            unknown = [k for k in metric if k not in self.tasks]
            if unknown:
                raise FastmergeError(f"lm_eval: metric: {unknown[0]!r} is not one of the tasks "
                                     f"({', '.join(self.tasks)})")
        elif metric is not None and not isinstance(metric, str):
            raise FastmergeError(f"lm_eval: metric must be a metric name or a mapping task -> name, got {metric!r}")
        out: dict[str, str | None] = {}
        better: dict[str, bool] = {}
        for t in self.tasks:
            want = metric.get(t) if isinstance(metric, Mapping) else metric
            if want is not None and not isinstance(want, str):
                raise FastmergeError(f"lm_eval: metric: {t}: expected a metric name, got {want!r}")
            known = self._predicted(t)
            if known is None:  # a group: its aggregate metrics are checked when it has run
                out[t] = want
                continue
            if want is None:
                want = next(iter(known))
            want = want.removesuffix(",none")
            if want not in known:
                filtered = [k for k in known if k.partition(",")[0] == want]
                if len(filtered) != 1:
                    raise FastmergeError(f"lm_eval: task {t!r} reports no metric {want!r} "
                                         f"(it reports {', '.join(known)})")
                want = filtered[0]
            out[t] = want
            better[t] = known[want]
        return out, better

    @property
    def metric_names(self) -> set[str] | None:
        """Every metric a call reports, known before any model is loaded (None: a group's are not)."""
        names = {"score"}
        for t in self.tasks:
            known = self._predicted(t)
            if known is None:
                return None
            names.update(f"{self._loaded['names'][t]}/{m}" for m in known)
        return names

    # -- scoring

    def _lm_for(self, model: Any, tokenizer: Any) -> Any:
        """The lm-eval ``LM`` for ``model``: made once per model (weights change in place)."""
        if self._cached is not None and self._cached[0] is model and self._cached[1] is tokenizer:
            return self._cached[2]
        from lm_eval.api.model import LM

        if isinstance(model, LM):
            lm = model
        else:
            module = model.model if isinstance(model, HFBackend) else model
            tok = model.tokenizer if isinstance(model, Backend) else tokenizer
            if tok is None:
                raise FastmergeError("lm_eval: no tokenizer (set tokenizer: in the config)")
            from transformers import PreTrainedModel

            if isinstance(module, PreTrainedModel) and not _is_path_model(module):
                from lm_eval.models.huggingface import HFLM

                # a copy: HFLM may give a tokenizer without one a pad token, and the caller shares it
                with _quiet():
                    lm = HFLM(pretrained=module, tokenizer=copy.deepcopy(tok), batch_size=self.batch_size,
                              max_length=self.max_length)
            else:
                backend = model if isinstance(model, Backend) else HFBackend(module, tok)
                lm = _backend_lm_class()(backend, batch_size=self.batch_size, max_length=self.max_length)
        self._cached = (model, tokenizer, lm)
        return lm

    def __call__(self, model: Any, tokenizer: Any) -> dict[str, float]:
        import lm_eval.evaluator

        lm = self._lm_for(model, tokenizer)
        for task in self._loaded["tasks"].values():
            task.set_fewshot_seed(seed=self.fewshot_seed)  # the same few-shot examples for every candidate
        task_dict = {k: self._loaded[k] for k in ("tasks", "groups", "group_map")}
        try:
            with _quiet():
                res = lm_eval.evaluator.evaluate(lm=lm, task_dict=task_dict, limit=self.limit, bootstrap_iters=0,
                                                 log_samples=False)
        except ValueError as e:  # lm-eval's word for a task it cannot run (unsafe code, multimodal, ...)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise FastmergeError(f"lm_eval: evaluation failed: {type(e).__name__}: {first}") from None
        self.last_results = dict(res)
        return self._metrics(res)

    def _metrics(self, res: Mapping[str, Any]) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, row in res["results"].items():
            for key, v in row.items():
                m = metric_key(key)
                if m is not None and isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[f"{name}/{m}"] = float(v)
        total = 0.0
        for t in self.tasks:
            name = self._loaded["names"][t]
            m = self.score_metrics[t]
            if m is None:  # a group with no metric named: its first aggregate
                m = next((k.partition("/")[2] for k in out if k.startswith(f"{name}/")), None)
            key = f"{name}/{m}"
            if key not in out:
                have = [k.partition("/")[2] for k in out if k.startswith(f"{name}/")]
                raise FastmergeError(f"lm_eval: {name!r} reported no {m!r} "
                                     f"(it reported {', '.join(have) or 'nothing'})")
            hib = self.higher_is_better.get(t)
            if hib is None:  # a group's, as lm-eval reports it
                hib = bool(res.get("higher_is_better", {}).get(name, {}).get(m.partition(",")[0], True))
            total += self.weights[t] * (out[key] if hib else -out[key])
        out["score"] = total / sum(self.weights.values())
        return out
