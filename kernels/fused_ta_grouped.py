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

from .fused_ta import _CONSENSUS, _SPARSIFY, MAXK, _launch, _prepare, chunk_prm
from .fused_ta_details._fused_ta import PRM_SIZE, _fused_ta_grouped_kernel

#: one item: (base or None, models, options, tensor name, out tensor or output dtype)
Item = tuple[torch.Tensor | None, Sequence[torch.Tensor], FusedOptions, str, "torch.Tensor | torch.dtype"]

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.int16: tl.int16}


def grouped_fused_merge(items: Sequence[Item], block: int = 1024, num_warps: int = 4) -> list[torch.Tensor]:
    """Merge every item as ``fused_ta.fused_merge(base, models, opts, name, dtype, out)`` would, with
    one launch per group of compatible items; returns the outputs in item order (``out`` itself
    when a tensor was given, else a new tensor of that dtype and the models' shape)."""
    outs: list[torch.Tensor] = []
    groups: dict[tuple, list] = {}
    for base, models, opts, name, out in items:
        out_dtype = out.dtype if isinstance(out, torch.Tensor) else out
        if not isinstance(out_dtype, torch.dtype):
            raise FastmergeError(f"{name}: out must be a tensor or a torch.dtype, got {out!r}")
        b, xs, out_t, store, prm, ends = _prepare(base, list(models), opts, name, out_dtype,
                                            out if isinstance(out, torch.Tensor) else None, block)
        outs.append(out_t)
        if store is None:  # empty tensor: nothing to do
            continue
        devices = {x.device for x in xs} | {store.device} | ({b.device} if b is not None else set())
        if len(devices) != 1:
            raise FastmergeError(f"{name}: the base, the models and out must be on one device")
        if len({x.dtype for x in xs}) != 1:  # mixed model dtypes: not groupable
            _launch(b, xs, store, prm, ends, opts, name, block, num_warps)
            continue
        lam = float(torch.tensor(opts.lambda_, dtype=torch.float32))
        key = (opts.k, b.dtype if b is not None else None, xs[0].dtype, store.dtype, store.device,
               opts.sparsify, opts.consensus, bool(opts.normalize))
        groups.setdefault(key, []).append((b, xs, store, prm, ends, opts, name, lam))
    for key, members in groups.items():
        _launch_group(key, members, block, num_warps)
    return outs


def _launch_group(key: tuple, members: list, block: int, num_warps: int) -> None:
    k, base_dtype, x_dtype, store_dtype, device, sparsify, consensus, normalize = key
    assert 1 <= k <= MAXK
    starts = [0]
    numels: list[int] = []
    ptrs: list[int] = []
    seeds: list[int] = []
    prms: list[torch.Tensor] = []
    for b, xs, store, prm, ends, opts, name, _ in members:
        n = xs[0].numel()
        for c, (s, e) in enumerate(rng.chunks(n)):
            cname = rng.chunk_name(name, c, n)
            numels.append(e - s)
            starts.append(starts[-1] + triton.cdiv(e - s, block))
            x0 = xs[0][s:e].data_ptr()
            ptrs += [store[s:e].data_ptr(), b[s:e].data_ptr() if b is not None else x0]
            ptrs += [x[s:e].data_ptr() for x in xs]
            if sparsify == "random":
                seeds += [rng.group_seed(opts.seed, cname, g) for g in range(2)]
            else:
                seeds += [0, 0]
            prms.append(chunk_prm(prm, ends, s))
    entries = len(numels)
    if starts[-1] >= 2**31:
        raise FastmergeError(f"a group of {starts[-1]} blocks is too large for one launch; use a larger block")
    as_dev = dict(dtype=torch.int64, device=device)
    starts_t = torch.tensor(starts, **as_dev)
    numel_t = torch.tensor(numels, **as_dev)
    ptrs_t = torch.tensor(ptrs, **as_dev)
    seeds_t = torch.tensor(seeds, **as_dev)
    prm_t = torch.stack(prms).reshape(-1)
    assert prm_t.numel() == PRM_SIZE * entries and ptrs_t.numel() == (k + 2) * entries
    _fused_ta_grouped_kernel[(starts[-1],)](
        starts_t, numel_t, ptrs_t, prm_t, seeds_t, entries, (entries - 1).bit_length(),
        K=k, HAS_BASE=base_dtype is not None, SPARSIFY=_SPARSIFY[sparsify], CONSENSUS=_CONSENSUS[consensus],
        NORMALIZE=normalize, APPLY_LAMBDA=any(m[-1] != 1.0 for m in members),  # x * 1.0 == x: exact
        OUT_BF16_BITS=store_dtype == torch.int16, BASE_DT=_TL[base_dtype or x_dtype], X_DT=_TL[x_dtype],
        OUT_DT=_TL[store_dtype], BLOCK=block, num_warps=num_warps, enable_fp_fusion=False,
    )
