"""In-memory merging, the evolve hot path: sources loaded once, every candidate written straight
into the parameters of one live ``nn.Module``, in place (DESIGN.md section 5).

A search tries thousands of candidates; writing each to disk (as mergekit-evolve does) costs more
than the merge. ``Merger`` reads the recipe's sources once (in their stored dtype), builds the
output module once, and on each ``merge(...)`` re-runs the fused op of every tensor with the
candidate's parameters into the existing parameter storage: no disk, no re-allocation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import cpu, vlm
from ._optional import require
from .engine import compute, on_device_runner, open_models
from .errors import FastmergeError
from .plan import Plan, TensorPlan, build_plan, layer_group
from .recipe import Recipe, load_recipe
from .spec import FusedOptions


def _rows(values) -> tuple[tuple[float, ...], ...]:
    """K values -> one row; G rows of K values -> G rows (lists, tuples, numpy arrays, tensors)."""
    values = values.tolist() if hasattr(values, "tolist") else [v.tolist() if hasattr(v, "tolist") else v for v in values]
    if values and isinstance(values[0], (list, tuple)):
        return tuple(tuple(float(x) for x in row) for row in values)
    return (tuple(float(x) for x in values),)


@dataclass(frozen=True)
class Genome:
    """Per-model weights and densities, for the whole model or per group of layers.

    ``weights``/``densities``: K values (one per non-base model, recipe order), or G rows of K
    values for layer groups of ceil(L / G) consecutive layers (``plan.layer_group``: the rule of
    ``PSSpace``, whose recipe writes one slice per group): the embeddings take the first group,
    the final norm and lm_head the last, as mergekit's first and last slices hold them.
    ``densities`` None keeps the recipe's.
    """

    weights: Sequence
    densities: Sequence | None = None

    def options(self, task: TensorPlan, num_layers: int) -> FusedOptions:
        weights = _rows(self.weights)
        densities = _rows(self.densities) if self.densities is not None else None
        group = layer_group(task.key, num_layers, math.ceil(max(num_layers, 1) / len(weights)))
        w = weights[min(group, len(weights) - 1)]
        d = task.fused.densities if densities is None else densities[min(group * len(densities) // len(weights),
                                                                          len(densities) - 1)]
        for what, v in (("weights", w), ("densities", d)):
            if len(v) != task.fused.k:
                raise FastmergeError(f"genome: {len(v)} {what} for {task.fused.k} models ({task.name})")
        return replace(task.fused, weights=w, densities=tuple(min(max(x, 0.0), 1.0) for x in d))


Candidate = Recipe | dict | str | Path | Genome | Callable[[TensorPlan], FusedOptions] | None


class Merger:
    """Load a recipe's sources once; merge candidates into ``self.module`` in place.

    ``backend``: "cpu" (the fused C loop, built on the first merge; where it cannot be built, or
    with ``FASTMERGE_NO_C=1``, its numpy twin with the same results: see ``fastmerge.cpu``) or
    "triton" (the fused kernel; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).
    ``device`` is where sources and the module live.

    A recipe whose frame is a vision-language model (``fastmerge.vlm``: a LLaVA among the models)
    builds that VLM (``AutoModelForImageTextToText``); its vision tower and projector are read once
    straight into the module (``TensorPlan.carried``, never held as sources) and every candidate is
    merged into its language model only.

    ``draw_cache`` (cpu backend): keep DARE's random draws between candidates (``cpu.DrawCache``:
    the same masks, without Philox after the first merge; one byte per element and fine-tuned model
    of every randomly sparsified tensor). False saves that memory.
    """

    def __init__(self, recipe: Recipe | dict | str | Path, device: str = "cpu", backend: str | None = None,
                 threads: int | None = None, allow_bin: bool = False, draw_cache: bool = True):
        self.recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
        if device == "cuda" and not torch.cuda.is_available():
            raise FastmergeError("device 'cuda' requested but no CUDA GPU is present")
        self.device = torch.device(device)
        self.backend = backend or ("cpu" if self.device.type == "cpu" else "triton")
        if self.backend not in ("cpu", "triton"):
            raise FastmergeError(f"backend: expected 'cpu' or 'triton', got {self.backend!r}")
        if self.backend == "cpu" and self.device.type != "cpu":
            raise FastmergeError("the cpu backend merges CPU tensors; use backend='triton' on a GPU")
        if self.backend == "triton":
            require("triton", "the Triton backend")  # before the sources are loaded
        self.threads = threads
        self.draws = cpu.DrawCache() if draw_cache and self.backend == "cpu" else None
        self._readers = open_models(self.recipe, allow_bin)
        self.plan = build_plan(self.recipe, self._readers)
        self._sources: dict[tuple[str, str], torch.Tensor] = {}
        for task in self.plan.tensors:
            for s in task.sources if not task.carried else []:
                if (s.model, s.name) not in self._sources:
                    self._sources[(s.model, s.name)] = self._readers[s.model].read(s.name).to(self.device)
        self.module = self._build_module(self.plan)
        self._params = self._bind(self.plan)
        with torch.no_grad():  # a VLM's vision side: written once, straight into the module, never again
            for task in self.plan.tensors:
                if task.carried:
                    s = task.inputs[0]
                    self._params[task.name].copy_(compute(task, [self._readers[s.model].read(s.name)], threads))
        for r in self._readers.values():
            r.close()
        self.merge()

    def _build_module(self, plan: Plan) -> torch.nn.Module:
        """The output architecture on the device, its weights allocated but not initialized (they
        are merged into next); buffers that checkpoints do not hold (rotary) are built normally."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

        from .hf_compat import no_init_weights

        cfg = dict(plan.config)
        model_type = cfg.pop("model_type", None)
        if model_type is None:
            raise FastmergeError(f"{plan.reference_model}: config.json has no model_type")
        cfg.pop("transformers_version", None)
        config = AutoConfig.for_model(model_type, **cfg)
        dtype = next((t.dtype for t in plan.tensors if t.dtype.is_floating_point), torch.float32)
        auto = AutoModelForImageTextToText if plan.frame is not None else AutoModelForCausalLM
        with no_init_weights(), self.device:
            module = auto.from_config(config, dtype=dtype)
        # no_init_weights also skips the tying that post_init does: an untied lm_head would stay
        # uninitialized memory when the checkpoint holds only the embeddings
        module.tie_weights()
        return module.eval()

    def _bind(self, plan: Plan) -> dict[str, torch.Tensor]:
        """name -> the module's own tensor that each planned output is merged into."""
        tensors = {**dict(self.module.named_buffers()), **dict(self.module.named_parameters())}
        out: dict[str, torch.Tensor] = {}
        for task in plan.tensors:
            # a VLM checkpoint's names (legacy or transformers 5's) as the module's (fastmerge.vlm)
            t = tensors.get(task.name if plan.frame is None else vlm.module_name(task.name, plan.frame.naming))
            if t is None:
                raise FastmergeError(f"the model class has no parameter {task.name} (from the checkpoint)")
            if tuple(t.shape) != task.shape or t.dtype != task.dtype:
                raise FastmergeError(f"{task.name}: the model class has {list(t.shape)} {t.dtype}, "
                                     f"the merge gives {list(task.shape)} {task.dtype}")
            out[task.name] = t.data
        return out

    def _options(self, candidate: Candidate) -> Callable[[TensorPlan], TensorPlan]:
        if candidate is None:
            return lambda task: task
        if isinstance(candidate, Genome):
            n = self.plan.num_layers
            return lambda task: replace(task, fused=candidate.options(task, n)) if task.fused else task
        if callable(candidate) and not isinstance(candidate, (Recipe, dict, str, Path)):
            return lambda task: replace(task, fused=candidate(task)) if task.fused else task
        recipe = candidate if isinstance(candidate, Recipe) else load_recipe(candidate)
        try:
            plan = build_plan(recipe, self._readers)
        except KeyError as e:
            raise FastmergeError(f"candidate recipe uses model {e.args[0]} that this Merger did not load") from None
        by_name = {t.name: t for t in plan.tensors}
        if set(by_name) != set(self._params):
            raise FastmergeError("candidate recipe produces a different set of tensors than the Merger's module")
        for t in plan.tensors:
            for s in t.sources:
                if (s.model, s.name) not in self._sources:
                    raise FastmergeError(f"candidate recipe reads {s.name} of {s.model}, which this Merger did not load")
        return lambda task: by_name[task.name]

    @torch.no_grad()
    def merge(self, candidate: Candidate = None) -> torch.nn.Module:
        """Write a candidate into ``self.module`` in place and return the module.

        ``candidate``: None (the recipe itself), a ``Genome`` (weights/densities per model or per
        layer group, method options from the recipe), a recipe over the same models (dict, path,
        YAML or ``Recipe``), or a function ``TensorPlan -> FusedOptions``.
        """
        task_for = self._options(candidate)
        # Triton launches on the current CUDA device: make it the module's (a worker on cuda:1)
        with torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext():
            self._merge(task_for)
        return self.module

    def _merge(self, task_for: Callable[[TensorPlan], TensorPlan]) -> None:
        grouped = []  # triton backend: all fused tensors go to one grouped launch per option group
        for base_task in self.plan.tensors:
            if base_task.carried:  # a VLM's vision side: the same for every candidate, written once
                continue
            task = task_for(base_task)
            out = self._params[task.name]
            tensors = [self._sources[(s.model, s.name)] for s in task.sources]
            fused = task.route == "fused" and task.whole
            if fused and self.backend == "cpu":  # the fused C loop, in place into the parameter
                base, models = task.split(tensors)
                cpu.fused_merge(base, models, task.fused, task.key, task.dtype, out=out, threads=self.threads,
                                draws=self.draws)
            elif on_device_runner(task):
                base, models = task.split(tensors)
                grouped.append((base, models, task.fused, task.key, out))
            else:  # copy and torch routes, vocabulary mismatches, fused beyond the kernels' limits (K > 8,
                # other output dtypes): the engine's executor on CPU tensors
                out.copy_(compute(task, [t.cpu() for t in tensors], self.threads))
        if grouped:
            from .kernels.fused_ta_grouped import grouped_fused_merge

            grouped_fused_merge(grouped)

    def bind(self, targets: Mapping[str, torch.Tensor]) -> None:
        """Merge into ``targets`` (module parameter names -> tensors of the same shape, dtype and
        device) from now on: an evaluation engine's own weights (``Backend.weight_targets``), so a
        candidate reaches the engine without a copy. The current merge is copied in, and the
        module's parameters become those tensors, so the module keeps showing the candidate."""
        if self.plan.frame is not None:
            raise FastmergeError("Merger.bind: not for vision-language models")
        params = dict(self.module.named_parameters())
        for name, t in targets.items():
            cur = self._params.get(name)
            if cur is None or name not in params:
                raise FastmergeError(f"Merger.bind: {name} is not a merged parameter of the module")
            if t.shape != cur.shape or t.dtype != cur.dtype or t.device != cur.device or not t.is_contiguous():
                raise FastmergeError(f"Merger.bind: {name}: the target is {list(t.shape)} {t.dtype} on {t.device}"
                                     f"{'' if t.is_contiguous() else ' (not contiguous)'}, the merge gives "
                                     f"{list(cur.shape)} {cur.dtype} on {cur.device}")
        with torch.no_grad():
            for name, t in targets.items():
                t.copy_(self._params[name])
                self._params[name] = t
                params[name].data = t

    def storage(self) -> dict[str, int]:
        """name -> data_ptr of every merged tensor (constant across candidates)."""
        return {name: t.data_ptr() for name, t in self._params.items()}
