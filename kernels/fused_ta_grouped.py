"""Grouped launcher of the fused task-arithmetic-family kernel (DESIGN.md section 5).

``grouped_fused_merge`` merges many tensors with one kernel launch per group of compatible tensors
instead of one launch per tensor: a work table on the device lists, per tensor (or 2**31-element
chunk), its element count, its first program id, a row of int64 addresses (out, base, x0..x{K-1})
cast to pointers in the kernel, its parameters (the per-tensor ``prm`` layout) and its two Philox
seeds. Each program finds its tensor by a binary search over the first-program ids and merges one
block with element indices local to the tensor, so the results are bit-identical to calling
``fused_ta.fused_merge`` on each tensor (same jit body, same DARE counters and seeds).

Tensors group together when they share K, whether there is a base, the base / model / output
dtypes, the device and the kernel's compile-time options (sparsify, consensus, normalize); the
per-tensor values (weights, densities, rescale, lambda, seed) may differ. The per-tensor
preliminaries (TIES thresholds, l1 sums) are those of ``fused_ta`` and still run per tensor; a
tensor whose models have mixed dtypes is merged by the per-tensor kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from fastmerge import rng
from fastmerge.errors import FastmergeError
from fastmerge.spec import FusedOptions

from .fused_ta import (
    _CONSENSUS,
    _DTYPES,
    _SPARSIFY,
    ALIGN_BYTES,
    MAX_REGISTERS,
    MAXK,
    _launch,
    _prepare,
    chunk_prm,
    launch_config,
)
from .fused_ta_details._fused_ta import PRM_SIZE, _fused_ta_grouped_kernel
from .fused_ta_details._host import device_guard, to_device

#: one item: (base or None, models, options, tensor name, out tensor or output dtype)
Item = tuple[torch.Tensor | None, Sequence[torch.Tensor], FusedOptions, str, "torch.Tensor | torch.dtype"]

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.int16: tl.int16}


def grouped_fused_merge(items: Sequence[Item], block: int | None = None, num_warps: int | None = None) -> list[torch.Tensor]:
    """Merge every item as ``fused_ta.fused_merge(base, models, opts, name, dtype, out)`` would, with
    one launch per group of compatible items; returns the outputs in item order (``out`` itself
    when a tensor was given, else a new tensor of that dtype and the models' shape). ``block`` and
    ``num_warps`` default to ``fused_ta.launch_config`` and do not change the result."""
    with device_guard(m for item in items[:1] for m in item[1]):
        return _grouped_fused_merge(items, block, num_warps)


def _grouped_fused_merge(items: Sequence[Item], block: int | None, num_warps: int | None) -> list[torch.Tensor]:
    outs: list[torch.Tensor] = []
    groups: dict[tuple, list] = {}
    for base, models, opts, name, out in items:
        out_dtype = out.dtype if isinstance(out, torch.Tensor) else out
        if not isinstance(out_dtype, torch.dtype):
            raise FastmergeError(f"{name}: out must be a tensor or a torch.dtype, got {out!r}")
        x_dtype = models[0].dtype if models and models[0].dtype in _DTYPES else torch.float32
        cfg = launch_config(opts.k, x_dtype) if 1 <= opts.k <= MAXK else (1024, 4)
        b, xs, out_t, store, prm, ends = _prepare(base, list(models), opts, name, out_dtype,
                                                  out if isinstance(out, torch.Tensor) else None)
        outs.append(out_t)
        if store is None:  # empty tensor: nothing to do
            continue
        devices = {x.device for x in xs} | {store.device} | ({b.device} if b is not None else set())
        if len(devices) != 1:
            raise FastmergeError(f"{name}: the base, the models and out must be on one device")
        if len({x.dtype for x in xs}) != 1:  # mixed model dtypes: not groupable
            _launch(b, xs, store, prm, ends, opts, name, block or cfg[0], num_warps or cfg[1])
            continue
        lam = float(torch.tensor(opts.lambda_, dtype=torch.float32))
        key = (opts.k, b.dtype if b is not None else None, xs[0].dtype, store.dtype, store.device,
               opts.sparsify, opts.consensus, bool(opts.normalize))
        groups.setdefault(key, []).append((b, xs, store, prm, ends, opts, name, lam))
    for key, members in groups.items():
        _launch_group(key, members, block, num_warps)
    return outs


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % ALIGN_BYTES == 0


def _launch_group(key: tuple, members: list, block: int | None, num_warps: int | None) -> None:
    k, base_dtype, x_dtype, store_dtype, device, sparsify, consensus, normalize = key
    assert 1 <= k <= MAXK
    cfg_block, cfg_warps = launch_config(k, x_dtype)
    block, num_warps = block or cfg_block, num_warps or cfg_warps
    starts = [0]
    numels: list[int] = []
    rows: list[list[torch.Tensor]] = []
    seeds: list[int] = []
    prms: list[torch.Tensor] = []
    for b, xs, store, prm, ends, opts, name, _ in members:
        if not all(_aligned(t) for t in [store, xs[0] if b is None else b, *xs]):
            _launch(b, xs, store, prm, ends, opts, name, block, num_warps)  # rare (odd views): its own launch
            continue
        n = xs[0].numel()
        for c, (s, e) in enumerate(rng.chunks(n)):  # chunks start at multiples of 2**31: aligned too
            cname = rng.chunk_name(name, c, n)
            row = [store[s:e], b[s:e] if b is not None else xs[0][s:e], *(x[s:e] for x in xs)]
            numels.append(e - s)
            starts.append(starts[-1] + triton.cdiv(e - s, block))
            rows.append(row)
            seeds += [rng.group_seed(opts.seed, cname, g) for g in range(2)] if sparsify == "random" else [0, 0]
            prms.append(chunk_prm(prm, ends, s))
    entries = len(numels)
    if not entries:
        return
    total = starts[-1]
    if total >= 2**31:
        raise FastmergeError(f"a group of {total} blocks is too large for one launch; use a larger block")
    # addresses as element offsets from the first entry's tensors (the anchors), which the kernel
    # knows to be 16-byte aligned: its loads through them are vectors
    anchors = rows[0][0], rows[0][1], rows[0][2]
    offsets = []
    for row in rows:
        for i, t in enumerate(row):
            a = anchors[min(i, 2)]
            offsets.append((t.data_ptr() - a.data_ptr()) // t.element_size())
    counts = to_device([starts[i + 1] - starts[i] for i in range(entries)], torch.int64, device)
    block_entry = torch.repeat_interleave(torch.arange(entries, dtype=torch.int32, device=device), counts,
                                          output_size=total)  # no host synchronisation
    starts_t = to_device(starts, torch.int64, device)
    numel_t = to_device(numels, torch.int64, device)
    ptrs_t = to_device(offsets, torch.int64, device)
    seeds_t = to_device(seeds, torch.int64, device)
    prm_t = torch.stack(prms).reshape(-1)
    assert prm_t.numel() == PRM_SIZE * entries and ptrs_t.numel() == (k + 2) * entries
    _fused_ta_grouped_kernel[(total,)](
        block_entry, starts_t, numel_t, ptrs_t, prm_t, seeds_t, *anchors,
        K=k, HAS_BASE=base_dtype is not None, SPARSIFY=_SPARSIFY[sparsify], CONSENSUS=_CONSENSUS[consensus],
        NORMALIZE=normalize, APPLY_LAMBDA=any(m[-1] != 1.0 for m in members),  # x * 1.0 == x: exact
        OUT_BF16_BITS=store_dtype == torch.int16, OUT_ALIGN=ALIGN_BYTES // anchors[0].element_size(),
        BASE_ALIGN=ALIGN_BYTES // anchors[1].element_size(), X_ALIGN=ALIGN_BYTES // anchors[2].element_size(),
        BLOCK=block, num_warps=num_warps, maxnreg=MAX_REGISTERS, enable_fp_fusion=False,
    )
