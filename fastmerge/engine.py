"""plan -> checkpoint: a reader thread, the fused op, a writer thread, and an atomic rename.

The reader maps the next tensor group and pre-faults its pages (and, for the fused CPU loop, the
output's pages in the shard, for writing) while the current one is merged. The fused CPU loop
(which releases the GIL) writes its result straight into the output shard through a shared map, so
the kernel's writeback is its writer; results made as tensors (torch ops, the GPU) go to a writer
thread that ``pwrite``s them at their precomputed offsets. Peak memory is the groups in flight,
not the model. Everything goes to a temporary sibling directory that is renamed into place only
when complete; any failure, including Ctrl-C, removes it.

Each tensor's route (copy, fused, torch) is decided by the plan from the method's declaration
(fastmerge.methods); the pipeline looks it up and picks the executor once per tensor.

A CPU merge of the task-arithmetic family (linear, task_arithmetic, ties, dare_*) over safetensors
never imports torch: the fused loop reads the mapped input bytes and writes the mapped output by
address. torch (1.6-2.5 s to import on the 2-core machine, as long as the whole merge of a 250M
model) is imported only for what needs it: slerp, passthrough with a scale, vocabulary-size
mismatches, .bin inputs, other dtypes, and the GPU.
"""

from __future__ import annotations

import json
import math
import queue
import shutil
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import cpu, dtypes, methods, vlm, vocab
from .errors import FastmergeError
from .io import CheckpointReader, OutTensor, ShardedWriter, local_model, read_json_object
from .plan import Plan, TensorPlan, build_plan
from .recipe import Recipe, dump_recipe, load_recipe
from .safety import OutputClaim, given_file, protected_inputs

if TYPE_CHECKING:
    import torch

    from .device import DeviceRunner

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "vocab.txt",
)
_DONE = object()
#: what the Triton kernel takes (dtypes, models per launch); other fused tensors run on the CPU path
KERNEL_CODES = ("F32", "BF16", "F16")
KERNEL_MAX_K = 8


class _Stopped(Exception):
    """The main thread waited on a thread that has failed: that thread's error is raised instead."""


@dataclass
class MergeOptions:
    """How to run a merge (what to merge is the recipe)."""

    device: str = "cpu"  # cpu | cuda | auto
    backend: str | None = None  # cpu (the fused C loop) | triton (the kernel on the device); default by device
    threads: int | None = None
    out_shard_size: int = 5 * 1024**3  # bytes
    #: parameters per shard (mergekit's ``--out-shard-size 5B``): bytes = this x the output dtype's size;
    #: overrides ``out_shard_size`` when set
    out_shard_params: int | None = None
    seed: int | None = None
    force: bool = False
    allow_bin: bool = False
    prefetch: int = 2
    check_finite: bool = True
    #: copy the tokenizer files of the base (or reference) model; a recipe's tokenizer source is always copied
    copy_tokenizer: bool = True
    #: write the model card (README.md) and the recipe as mergekit_config.yml
    write_model_card: bool = True


@dataclass
class Progress:
    tensors_done: int
    tensors_total: int
    bytes_done: int
    bytes_total: int
    name: str


@dataclass
class MergeResult:
    path: Path
    tensors: int
    read_bytes: int
    write_bytes: int
    seconds: float
    nonfinite: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        gb = (self.read_bytes + self.write_bytes) / 1e9
        return (f"merged {self.tensors} tensors: read {self.read_bytes / 1e9:.2f} GB, wrote "
                f"{self.write_bytes / 1e9:.2f} GB in {self.seconds:.2f} s ({gb / max(self.seconds, 1e-9):.2f} GB/s)")


def resolve_device(device: str) -> str:
    """The device the merge runs on; says why when it is not the one asked for."""
    if device not in ("cpu", "cuda", "auto"):
        raise FastmergeError(f"--device: expected cpu, cuda or auto, got {device!r}")
    if device == "cpu":
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        if device == "cuda":
            warnings.warn("no CUDA GPU is present: falling back to the fused CPU path", stacklevel=2)
        return "cpu"
    return "cuda"


def open_models(recipe: Recipe, allow_bin: bool = False) -> dict[str, CheckpointReader]:
    readers = {}
    for n in _source_models(recipe):
        if not Path(n).exists():
            raise FastmergeError(f"{n}: model not found")
        readers[n] = vlm.view(CheckpointReader(n, allow_bin=allow_bin))  # a VLM: its language model
    return readers


def compute(task: TensorPlan, tensors: list[torch.Tensor], threads: int | None = None,
            out: torch.Tensor | None = None, nonfinite: list[int] | None = None) -> torch.Tensor:
    """The output tensor of one plan entry from its loaded inputs (base first when present): the
    executor of the tensor routes, shared by the streaming engine and ``Merger``.

    ``out`` (fused route only) is written in place; ``nonfinite`` receives the inputs' NaN/Inf
    counts when the fused loop counted them (it stays empty otherwise).
    """
    if task.vocab is not None:  # a tokenizer source: each input rebuilt for the output vocabulary, then merged
        return compute(replace(task, vocab=None), vocab.rebuild(task.vocab, tensors), threads, nonfinite=nonfinite)
    if task.rows is not None:  # vocabulary mismatch: merge the common rows, the rest from the full input
        full = next(t for t in tensors if tuple(t.shape) == task.shape)
        result = full.to(task.dtype, copy=True)
        sub = replace(task, shape=(task.rows, *task.shape[1:]), rows=None)
        result[: task.rows] = compute(sub, [t[: task.rows] for t in tensors], threads, nonfinite=nonfinite)
        return result
    return TENSOR_ROUTES[task.route](task, tensors, threads, out, nonfinite)


def _run_copy(task: TensorPlan, tensors: list[torch.Tensor], threads: int | None, out: torch.Tensor | None,
              nonfinite: list[int] | None) -> torch.Tensor:
    return tensors[0].to(task.dtype)


def _run_fused(task: TensorPlan, tensors: list[torch.Tensor], threads: int | None, out: torch.Tensor | None,
               nonfinite: list[int] | None) -> torch.Tensor:
    base, models = task.split(tensors)
    counts: list[int] = []
    result = cpu.fused_merge(base, models, task.fused, task.key, task.dtype, out=out, threads=threads,
                             nonfinite=counts if nonfinite is not None else None)
    if nonfinite is not None:
        nonfinite[:] = per_source(task, counts)
    return result


def _run_torch(task: TensorPlan, tensors: list[torch.Tensor], threads: int | None, out: torch.Tensor | None,
               nonfinite: list[int] | None) -> torch.Tensor:
    """A registered method's torch function, cast once to the output dtype (no copy when it is)."""
    base, inputs = task.split(tensors)
    ctx = methods.MergeContext(task.key, task.position, task.seed, task.dtype, threads)
    return methods.get(task.method).merge(inputs, base, task.params, ctx).to(task.dtype)


#: route -> how a tensor of that route is computed from torch tensors (the plan chose the route)
TENSOR_ROUTES: dict[str, Callable[..., torch.Tensor]] = {"copy": _run_copy, "fused": _run_fused, "torch": _run_torch}


class _OutputBuffers:
    """A few reusable output buffers, so each tensor's result does not fault in fresh pages.

    Buffers cycle main thread -> writer thread -> back; when all are in use the main thread
    waits, which is the back-pressure that bounds memory.
    """

    def __init__(self, capacity: int, count: int):
        self.capacity = capacity
        self.free: queue.Queue = queue.Queue()
        self.count = count
        self.made = 0

    def take(self, stop: threading.Event) -> np.ndarray:
        """A whole buffer (uint8, ``capacity`` bytes); the caller views its first bytes."""
        if self.free.empty() and self.made < self.count:
            self.made += 1
            self.free.put(np.empty(self.capacity, dtype=np.uint8))
        while True:
            try:
                return self.free.get(timeout=0.1)
            except queue.Empty:
                if stop.is_set():
                    raise _Stopped from None

    def give(self, buf: np.ndarray) -> None:
        self.free.put(buf)


def _raw_ok(task: TensorPlan, readers: dict[str, CheckpointReader]) -> bool:
    """Whether the fused loop can merge the task straight from the mapped bytes (no torch)."""
    if task.route != "fused" or not task.whole or task.code not in cpu.CODES:
        return False
    for s in task.sources:
        r = readers[s.model]
        if not r.mappable(s.name) or r.meta(s.name).code not in cpu.CODES:
            return False
    return True


def _compute_raw(task: TensorPlan, readers: dict[str, CheckpointReader], arrays: list[np.ndarray],
                 out: np.ndarray, threads: int | None, nonfinite: list[int] | None) -> None:
    """``compute`` of a fused task on mapped bytes into ``out`` (bytes of the output tensor)."""
    metas = [readers[s.model].meta(s.name) for s in task.sources]
    flats = [cpu.Flat(a.ctypes.data, m.code, m.numel) for m, a in zip(metas, arrays)]
    base, models = task.split(flats)
    n = math.prod(task.shape)
    counts: list[int] = []
    cpu.merge_into(base, models, task.fused, task.key, cpu.Flat(out.ctypes.data, task.code, n), threads,
                   nonfinite=counts if nonfinite is not None else None)
    if nonfinite is not None:
        nonfinite[:] = per_source(task, counts)


def per_source(task: TensorPlan, counts: list[int]) -> list[int]:
    """The fused loop's NaN/Inf counts (base slot first, always) in ``task.sources`` order."""
    return counts if task.base else counts[1:]


def merge(
    recipe: Recipe | str | Path | dict,
    out_path: str | Path,
    options: MergeOptions | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> MergeResult:
    """Merge checkpoints per a mergekit-style recipe into ``out_path`` (a HF model directory)."""
    opts = options or MergeOptions()
    recipe_file = given_file(recipe)
    recipe_source = recipe_file.read_text(encoding="utf-8") if recipe_file else recipe if isinstance(recipe, str) else None
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    shown = recipe  # as the user wrote it (hub ids, not cache paths): the model card's
    recipe = recipe.with_model_paths(local_model)  # hub ids -> snapshots (the only network access)
    out = Path(out_path)
    tok_dir = [t for t in [recipe.tokenizer_source] if t not in ("union", "base")]
    claim = OutputClaim(out, opts.force, protected_inputs([*_source_models(recipe), *tok_dir],
                                                    [("the recipe file", recipe_file)]))
    claim.check()  # before any work; again under the lock
    device = resolve_device(opts.device)
    backend = opts.backend or ("triton" if device == "cuda" else "cpu")
    if backend not in ("cpu", "triton"):
        raise FastmergeError(f"backend: expected cpu or triton, got {backend!r}")
    runner = None
    if backend == "triton":
        from .device import DeviceRunner

        runner = DeviceRunner(device)
    readers = open_models(recipe, opts.allow_bin)
    plan = build_plan(recipe, readers, seed=opts.seed)
    for w in plan.warnings:
        warnings.warn(w, stacklevel=2)
    if backend == "cpu" and any(t.route == "fused" for t in plan.tensors):
        cpu.available()  # build the fused loop, or fall back to numpy with a notice, before any output exists
    # an unknown template name (or auto without one) is an error before any tensor is merged
    template = vocab.chat_template_text(recipe.chat_template, list(readers)) if recipe.chat_template else None
    start = time.perf_counter()
    try:
        with claim:  # the target locked, stale temporaries removed, ``claim.tmp`` made; left: removed
            nonfinite = _execute(plan, readers, claim.tmp, opts, progress, runner)
            _write_metadata(plan, recipe, readers, claim.tmp, opts, _recipe_source(shown, recipe_source), shown,
                            template)
            claim.commit()
    finally:
        for r in readers.values():
            r.close()
    seconds = time.perf_counter() - start
    for name, count in nonfinite.items():
        warnings.warn(f"{name}: {count} non-finite values (NaN/Inf)", stacklevel=2)
    return MergeResult(out, len(plan.tensors), plan.read_bytes, plan.write_bytes, seconds, nonfinite, plan.warnings)


def _execute(plan: Plan, readers: dict[str, CheckpointReader], tmp: Path, opts: MergeOptions,
             progress: Callable[[Progress], None] | None, runner: DeviceRunner | None = None) -> dict[str, int]:
    """Run the plan: reader thread -> executor (main thread) -> writer thread. Returns the inputs'
    NaN/Inf counts by file and tensor."""
    try:
        writer = ShardedWriter(tmp, [OutTensor(t.name, t.code, t.shape) for t in plan.tensors], shard_bytes(plan, opts))
    except OSError as e:  # a full disk while writing the headers or the index
        where = _final_path(tmp) / Path(e.filename).name if e.filename else _final_path(tmp)
        raise FastmergeError(f"{where}: cannot write the output: {e.strerror or e}") from None
    except FastmergeError as e:  # no room for a shard: name it where the user will look for it
        raise FastmergeError(str(e).replace(str(tmp), str(_final_path(tmp)))) from None
    return _Pipeline(plan, readers, writer, tmp, opts, progress, runner).run()


def shard_bytes(plan: Plan, opts: MergeOptions) -> int:
    """The byte limit of an output shard: ``out_shard_size``, or ``out_shard_params`` (mergekit's
    parameters) times the output dtype's size (the first floating tensor's, as config.json says)."""
    if opts.out_shard_params is None:
        return opts.out_shard_size
    codes = [t.code for t in plan.tensors if dtypes.is_float(t.code)] or [t.code for t in plan.tensors]
    return opts.out_shard_params * (dtypes.itemsize(codes[0]) if codes else 1)


def _recipe_source(recipe: Recipe, text: str | None) -> str:
    """What ``mergekit_config.yml`` holds: the recipe file's text as given (as mergekit writes it),
    or the recipe as YAML when it came as a dict or ``Recipe``."""
    return text if text is not None else dump_recipe(recipe)


def on_device_runner(task: TensorPlan) -> bool:
    """Whether the Triton kernels take the tensor: the fused route within their limits (K models,
    output dtypes); the streaming engine and the in-memory ``Merger`` ask the same question."""
    return (task.route == "fused" and task.whole and task.fused.k <= KERNEL_MAX_K
            and task.code in KERNEL_CODES and "triton" in methods.get(task.method).executors)


class _Pipeline:
    """One streaming merge. Each tensor's executor is chosen once, from its planned route:

    - ``raw``: the fused C loop reads the mapped input bytes and writes straight into the output
      shard (no torch, no copy; the shard's map is the writer);
    - ``device``: the device runner (Triton), results collected as they are ready;
    - ``tensor``: ``compute`` (any route, on torch tensors), the result handed to the writer thread.
    """

    def __init__(self, plan: Plan, readers: dict[str, CheckpointReader], writer: ShardedWriter, tmp: Path,
                 opts: MergeOptions, progress: Callable[[Progress], None] | None, runner: DeviceRunner | None):
        self.plan, self.readers, self.writer, self.tmp = plan, readers, writer, tmp
        self.opts, self.progress, self.runner = opts, progress, runner
        self.stop = threading.Event()
        self.loaded: queue.Queue = queue.Queue(maxsize=max(1, opts.prefetch))
        self.merged: queue.Queue = queue.Queue(maxsize=max(1, opts.prefetch))
        self.nonfinite: dict[str, int] = {}
        self.errors: list[BaseException] = []
        self.how = {t.name: self._executor(t) for t in plan.tensors}
        pooled = [t.out_bytes for t in plan.tensors if self.how[t.name] == "tensor" and t.route == "fused"
                  and t.whole]
        self.buffers = _OutputBuffers(max(pooled, default=0), count=max(1, opts.prefetch) + 2)
        self.executors = {"raw": self._run_raw, "device": self._run_device, "tensor": self._run_tensor}
        self.done = 0
        self.done_bytes = 0

    def _executor(self, task: TensorPlan) -> str:
        if self.runner is not None:
            return "device" if on_device_runner(task) else "tensor"
        return "raw" if _raw_ok(task, self.readers) else "tensor"

    # -- threads

    def put(self, q: queue.Queue, item) -> bool:
        while not self.stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def note_nonfinite(self, task: TensorPlan, counts: list[int]) -> None:
        for s, bad in zip(task.sources, counts):
            if bad:
                meta = self.readers[s.model].meta(s.name)
                self.nonfinite[f"{meta.file}: tensor {meta.name}"] = bad

    def read_loop(self) -> None:
        try:
            for task in self.plan.tensors:
                if self.stop.is_set():
                    return
                how = self.how[task.name]
                readers = self.readers
                if how == "raw":
                    tensors = [readers[s.model].map_bytes(s.name) for s in task.sources]
                else:
                    tensors = [readers[s.model].map(s.name) for s in task.sources]
                for s in task.sources:
                    readers[s.model].prefault(s.name)
                if how == "raw":
                    self.writer.prefault_out(task.name)
                if self.opts.check_finite and (task.route != "fused" or how == "device"):  # the C loop counts
                    self.note_nonfinite(task, [cpu.count_nonfinite(t) for t in tensors])
                if how == "device":
                    tensors = self.runner.stage(tensors)
                if not self.put(self.loaded, (task, tensors)):
                    return
            self.put(self.loaded, _DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self.errors.append(e)
            self.put(self.loaded, _DONE)

    def write_loop(self) -> None:
        try:
            while True:
                try:
                    item = self.merged.get(timeout=0.1)
                except queue.Empty:
                    if self.stop.is_set():
                        return
                    continue
                if item is _DONE:
                    return
                name, tensor, pooled = item
                try:
                    self.writer.write(name, tensor)
                except OSError as e:  # a full disk, an I/O error: say which file and tensor
                    raise FastmergeError(f"{_shard_path(self.writer, name, self.tmp)}: cannot write tensor {name}: "
                                         f"{e.strerror or e}") from None
                if pooled is not None:
                    self.buffers.give(pooled)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self.errors.append(e)
            self.stop.set()

    # -- executors: (task, loaded inputs) -> [(name, result or None if already written, pooled, in_bytes)]

    def _run_raw(self, task: TensorPlan, arrays: list) -> list:
        counts: list[int] = []
        _compute_raw(task, self.readers, arrays, self.writer.map_out(task.name), self.opts.threads,
                     counts if self.opts.check_finite else None)
        self.writer.release_out(task.name)
        self.note_nonfinite(task, counts)
        return [(task.name, None, None, task.in_bytes)]

    def _run_device(self, task: TensorPlan, tensors: list) -> list:
        self.runner.submit(task, tensors, (task.name, task.in_bytes))
        return [(name, out, None, nbytes) for name, nbytes, out in self.runner.ready()]

    def _run_tensor(self, task: TensorPlan, tensors: list) -> list:
        pooled = self.buffers.take(self.stop) if task.route == "fused" and task.whole else None
        counts: list[int] = []
        view = None
        if pooled is not None:
            import torch

            view = torch.from_numpy(pooled[: task.out_bytes]).view(task.dtype).reshape(task.shape)
        out = compute(task, tensors, self.opts.threads, out=view, nonfinite=counts if self.opts.check_finite else None)
        self.note_nonfinite(task, counts)
        return [(task.name, out, pooled, task.in_bytes)]

    def emit(self, task_name: str, out, pooled: np.ndarray | None, in_bytes: int) -> bool:
        """Hand a result to the writer (``out`` None: already in its shard) and report progress."""
        if out is not None and not self.put(self.merged, (task_name, out, pooled)):
            return False
        self.done += 1
        self.done_bytes += in_bytes
        if self.progress:
            self.progress(Progress(self.done, len(self.plan.tensors), self.done_bytes, self.plan.read_bytes, task_name))
        return True

    def run(self) -> dict[str, int]:
        reader_t = threading.Thread(target=self.read_loop, name="fastmerge-reader", daemon=True)
        writer_t = threading.Thread(target=self.write_loop, name="fastmerge-writer", daemon=True)
        reader_t.start()
        writer_t.start()
        try:
            while True:
                try:
                    item = self.loaded.get(timeout=0.1)
                except queue.Empty:
                    if self.stop.is_set() or self.errors:  # the writer failed while the reader was blocked
                        break
                    continue
                if item is _DONE or self.errors:
                    break
                task, tensors = item
                results = self.executors[self.how[task.name]](task, tensors)
                for s in task.sources:
                    self.readers[s.model].release(s.name)
                del tensors
                if not all(self.emit(*r) for r in results):
                    break
            if self.runner is not None and not self.errors and not self.stop.is_set():
                for name, nbytes, out in self.runner.ready(drain=True):
                    self.emit(name, out, None, nbytes)
            if not self.errors:
                self.put(self.merged, _DONE)
                writer_t.join()
        except _Stopped:  # the writer failed while the main thread waited for a buffer: its error follows
            pass
        finally:
            self.stop.set()
            reader_t.join(timeout=5)
            writer_t.join(timeout=5)
            self.writer.close()
        if self.errors:
            raise self.errors[0]
        if self.done != len(self.plan.tensors):
            raise FastmergeError("merge stopped before all tensors were written")
        return self.nonfinite


def _final_path(tmp: Path) -> Path:
    """The output directory a temporary one becomes (for messages: the temporary one is removed)."""
    return tmp.parent / tmp.name.split(".fastmerge-tmp")[0].lstrip(".")


def _shard_path(writer: ShardedWriter, name: str, tmp: Path) -> Path:
    fd = writer.location[name][0]
    return _final_path(tmp) / writer.files[writer._fds.index(fd)]


def _write_metadata(plan: Plan, recipe: Recipe, readers: dict[str, CheckpointReader], tmp: Path,
                    opts: MergeOptions | None = None, recipe_source: str | None = None,
                    shown: Recipe | None = None, template: str | None = None) -> None:
    """config.json, generation config and tokenizer files (with ``template``, the recipe's chat
    template resolved before the merge), the model card: a full disk (or any
    failed write) is one line naming the file, and ``merge`` removes the temporary directory.
    ``shown``: the recipe as the user wrote it (hub ids rather than cache paths), for the card."""
    final = _final_path(tmp)

    def write_text(name: str, text: str) -> None:
        try:
            (tmp / name).write_text(text, encoding="utf-8")
        except OSError as e:
            raise FastmergeError(f"{final / name}: cannot write: {e.strerror or e}") from None

    def copy(src: Path) -> None:
        try:
            shutil.copy2(src, tmp / src.name)
        except OSError as e:
            raise FastmergeError(f"{final / src.name}: cannot copy from {src}: {e.strerror or e}") from None

    config = dict(plan.config)
    float_codes = [t.code for t in plan.tensors if dtypes.is_float(t.code)]
    if float_codes:
        name = dtypes.torch_name(float_codes[0])
        keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
        for k in keys:
            config[k] = name
        for sub in ("text_config", "vision_config"):  # a VLM's: every tensor was cast to the output dtype
            if isinstance(config.get(sub), dict):
                config[sub] = {**config[sub], **{k: name for k in ("torch_dtype", "dtype") if k in config[sub]}}
    if not any(t.name.endswith("lm_head.weight") for t in plan.tensors):  # the embedding is the output projection
        config.setdefault("tie_word_embeddings", True)
    if config:
        write_text("config.json", json.dumps(config, indent=2) + "\n")
    ref_dir = readers[plan.reference_model].path
    gen = ref_dir / "generation_config.json"
    if gen.exists():
        copy(gen)
    opts = opts or MergeOptions()
    named = recipe.tokenizer_source or (recipe.tokenizer.source if recipe.tokenizer else None)
    tokenizer_model = plan.tokenizer_model if opts.copy_tokenizer or named else None
    if plan.tokenizer_model and not tokenizer_model and recipe.chat_template:
        warnings.warn("chat_template is not written: --no-copy-tokenizer and the recipe names no tokenizer source",
                      stacklevel=3)
    built = plan.vocab is not None and plan.vocab.copy_from is None
    if built:  # a built tokenizer (union, added tokens): saved as mergekit saves it
        tok = plan.vocab.tokenizer
        if template:
            tok = vocab._clone(tok)
            tok.chat_template = template
        try:
            tok.save_pretrained(tmp)
        except OSError as e:
            raise FastmergeError(f"{final}: cannot write the tokenizer: {e.strerror or e}") from None
    elif tokenizer_model:
        for f in tokenizer_files(tokenizer_model):
            copy(f)
    if plan.frame is not None and (tokenizer_model or built):  # a VLM: its processor files with its tokenizer
        for f in vlm.PROCESSOR_FILES:
            if (plan.frame.path / f).is_file() and not (tmp / f).exists():
                copy(plan.frame.path / f)
    if recipe.chat_template and not built and (tokenizer_model or not plan.tokenizer_model):
        tok_cfg_path = Path(tokenizer_model or "") / "tokenizer_config.json"  # as copied above
        tok_cfg = read_json_object(tok_cfg_path, "tokenizer config") if tokenizer_model and tok_cfg_path.exists() else {}
        tok_cfg["chat_template"] = template
        write_text("tokenizer_config.json", json.dumps(tok_cfg, indent=2) + "\n")
        write_text("chat_template.jinja", template)
    if opts.write_model_card:
        write_text("README.md", model_card(shown or recipe, final.name))
        write_text("mergekit_config.yml", _recipe_source(shown or recipe, recipe_source))


def model_card(recipe: Recipe, name: str) -> str:
    """The model card: mergekit's YAML header (``base_model``: the recipe's models, base first;
    ``library_name``; the ``mergekit`` and ``merge`` tags, plus ``fastmerge``) and the recipe."""
    import yaml

    models = _source_models(recipe)
    header = yaml.safe_dump({"base_model": models, "library_name": "transformers",
                             "tags": ["mergekit", "merge", "fastmerge"]}, sort_keys=False)
    base = f" using {recipe.base_model} as a base" if recipe.base_model and recipe.merge_method != "slerp" else ""
    merged = "\n".join(f"* {m}" for m in models if m != recipe.base_model or not base)
    return (
        f"---\n{header}---\n# {name}\n\n"
        f"This model was merged with fastmerge (mergekit-compatible) using the `{recipe.merge_method}` method{base}.\n\n"
        f"## Models merged\n\n{merged}\n\n"
        "## Recipe\n\n```yaml\n" + dump_recipe(recipe) + "```\n"
    )


def tokenizer_files(directory: str | Path) -> list[Path]:
    """The tokenizer files a checkpoint directory holds (what a merged or exported model carries)."""
    return [Path(directory) / f for f in TOKENIZER_FILES if (Path(directory) / f).exists()]


def _source_models(recipe: Recipe) -> list[str]:
    """The model directories a recipe merges, base first, each once."""
    names = [recipe.base_model, *(m.model for m in recipe.models or [])]
    names += [s.model for sl in recipe.slices or [] for s in sl.sources]
    return list(dict.fromkeys(n for n in names if n))
