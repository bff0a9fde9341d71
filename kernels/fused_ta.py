"""Launcher of the fused task-arithmetic-family Triton kernel (DESIGN.md section 3).

``fused_merge`` merges one tensor: base + K <= 8 models in, one output out, with the same
results as ``fastmerge.cpu.fused_merge`` (bit-identical DARE masks; values to the ulp). The jit
functions live in ``fused_ta_details/_fused_ta.py``. Works on CUDA tensors, and on CPU tensors
under ``TRITON_INTERPRET=1``. Nothing here queries a device at import time.
"""

from __future__ import annotations

import torch
import triton

from fastmerge import rng
from fastmerge.cpu import Cut
from fastmerge.dtypes import fused_flat
from fastmerge.errors import FastmergeError
from fastmerge.spec import L1_EPS, FusedOptions, inverse_scale

from .fused_ta_details._fused_ta import (
    PRM_DENSITY,
    PRM_LAMBDA,
    PRM_SCALE,
    PRM_SIZE,
    PRM_TAU,
    PRM_TIE_LAST,
    PRM_WEIGHT,
    _fused_ta_kernel,
    _l1_sums_kernel,
)
from .fused_ta_details._host import device_guard
from .fused_ta_details._select import cut_tensors as device_cut_tensors

MAXK = 8
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SPARSIFY = {"none": 0, "random": 1, "magnitude": 2}
_CONSENSUS = {"none": 0, "sum": 1, "count": 2}
#: at most this many partial sums per model in the l1 pass (each program loops over blocks)
_SUM_PROGRAMS = 1024
#: the width of one vector load: the grouped kernel takes only tensors aligned to it
ALIGN_BYTES = 16
#: registers per thread the merge kernels may take (ptxas's ``maxnreg``): 4 warps of 128 threads
#: per 64 K registers, 25% occupancy at worst; fp16 at K = 8 would take ~155 without the cap
MAX_REGISTERS = 128


def launch_config(k: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK, num_warps) for K models of ``dtype``: one 16-byte vector load per input and thread
    (8 bf16 / fp16 or 4 fp32 elements each), 4 warps; 8 warps from K = 6, where a block holds more
    of the K + 2 streams in flight per program. Compiled for sm_90 this keeps every variant at or
    under 128 registers (tests/test_kernels_ptx.py); ``bench/gpu_check.sh`` measures the
    alternatives on a GPU. The result never depends on it."""
    per_thread = ALIGN_BYTES // (torch.finfo(dtype).bits // 8)
    warps = 8 if k >= 6 else 4
    return warps * 32 * per_thread, warps


def l1_launch_config(k: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK, num_warps) of the l1 sums pass. Each thread keeps 2 K fp64 accumulators per element it
    holds (2 registers each), so the merge kernel's block (8 bf16 per thread, up to 16 at 4 warps)
    would need 256-512 registers at K = 8 and spill; here a thread holds at most 20 // K elements
    (a power of two, at most one 16-byte vector), which keeps every variant under 128 registers
    (tests/test_kernels_ptx.py). Loads stay coalesced across a warp. The sums' values do not depend on
    it beyond fp64 rounding order."""
    vector = ALIGN_BYTES // (torch.finfo(dtype).bits // 8)
    per_thread = min(vector, 1 << max(0, (20 // k).bit_length() - 1))
    warps = 4
    return warps * 32 * per_thread, warps




def thresholds(base: torch.Tensor | None, models: list[torch.Tensor], densities: tuple[float, ...]) -> list[float]:
    """TIES thresholds tau_k: the exact m-th largest |x_k - base| over the whole tensor (inf where
    m = 0); the taus of ``cuts``."""
    return [c.tau for c in cuts(base, models, densities)]


def cuts(base: torch.Tensor | None, models: list[torch.Tensor], densities: tuple[float, ...]) -> list:
    """TIES cuts (``fastmerge.cpu.Cut``: tau_k and the end of the ties kept at it), as a list."""
    taus, ends = cut_tensors(base, models, densities)
    return [Cut(t, e) for t, e in zip(taus.tolist(), ends.tolist())]


def cut_tensors(base: torch.Tensor | None, models: list[torch.Tensor],
                densities: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES cuts as (tau fp32 [K], end int64 [K]) tensors on the models' device. CPU tensors use the
    fused CPU path's radix select; others the Triton select of ``fused_ta_details/_select.py``
    on their device, with no host synchronisation (equal results)."""
    if all(m.device.type == "cpu" for m in models) and (base is None or base.device.type == "cpu"):
        from fastmerge import cpu

        found = cpu.fused_cuts(base, models, densities)
        return (torch.tensor([c.tau for c in found], dtype=torch.float32),
                torch.tensor([c.end for c in found], dtype=torch.int64))
    return device_cut_tensors(base, models, densities)


def _tie_lasts(ends: torch.Tensor, start: int) -> torch.Tensor:
    """The int32 bits (as fp32, for ``prm``) of the last index, local to the chunk at ``start``, at
    which a tie at tau is kept: -1 for none, 2**31 - 1 for all (torch ops on ends' device)."""
    return (ends - 1 - start).clamp(-1, 2**31 - 1).to(torch.int32).view(torch.float32)


def chunk_prm(prm: torch.Tensor, ends: torch.Tensor | None, start: int) -> torch.Tensor:
    """``prm`` for the chunk starting at element ``start``: the same tensor for the first chunk (its
    tie indices are written by ``_prepare``), a copy with its own tie indices for later ones."""
    if ends is None or start == 0:
        return prm
    own = prm.clone()
    own[PRM_TIE_LAST:PRM_TIE_LAST + ends.numel()] = _tie_lasts(ends, start)
    return own


def _l1_scales(b, xs, prm, ends, opts: FusedOptions, name: str) -> torch.Tensor:
    """The l1 rescale factors (fp32 [K] on the device, no host synchronisation): per model
    sum|delta_k| / sum|keep_k * delta_k| in fp64, 1 where either sum is below ``L1_EPS``, as
    ``spec.l1_scale``. One launch per 2**31-element chunk for all models."""
    n, k = xs[0].numel(), opts.k
    block, warps = l1_launch_config(k, xs[0].dtype)
    total = torch.zeros(k, dtype=torch.float64, device=xs[0].device)
    kept = torch.zeros_like(total)
    for c, (s, e) in enumerate(rng.chunks(n)):
        cn = e - s
        if cn == 0:
            continue
        cname = rng.chunk_name(name, c, n)
        blocks = triton.cdiv(cn, block)
        iters = triton.cdiv(blocks, _SUM_PROGRAMS)
        grid = triton.cdiv(blocks, iters)
        sums = torch.empty((grid, k, 2), dtype=torch.float64, device=xs[0].device)
        seeds = [rng.group_seed(opts.seed, cname, g) for g in range(2)] if opts.sparsify == "random" else [0, 0]
        pb = b[s:e] if b is not None else xs[0][s:e]
        ptrs = [x[s:e] for x in xs] + [pb] * (MAXK - k)
        _l1_sums_kernel[(grid,)](
            sums, pb, *ptrs, chunk_prm(prm, ends, s), seeds[0], seeds[1], cn, iters,
            K=k, HAS_BASE=b is not None, SPARSIFY=_SPARSIFY[opts.sparsify], BLOCK=block, num_warps=warps,
            maxnreg=MAX_REGISTERS, enable_fp_fusion=False,
        )
        part = sums.sum(0)
        total += part[:, 0]
        kept += part[:, 1]
    small = (total < L1_EPS) | (kept < L1_EPS)
    return torch.where(small, torch.ones_like(total), total / kept).to(torch.float32)


def _prepare(
    base: torch.Tensor | None, models: list[torch.Tensor], opts: FusedOptions, name: str, out_dtype: torch.dtype,
    out: torch.Tensor | None,
) -> tuple[torch.Tensor | None, list[torch.Tensor], torch.Tensor, torch.Tensor | None, torch.Tensor | None,
           torch.Tensor | None]:
    """Checks one tensor's inputs; returns the flat base and models, ``out`` (allocated if None), the
    flat store view of out (int16 for bf16), the per-tensor parameters ``prm`` on the device
    (weights, densities, scales: inverse or l1, TIES thresholds and the first chunk's tie indices,
    lambda) and the TIES cuts' ends (None unless magnitude; see ``chunk_prm``). store and prm are
    None for an empty tensor."""
    if opts.k == 0 or opts.k > MAXK:
        raise FastmergeError(f"{name}: the fused Triton kernel merges 1..{MAXK} models, got {opts.k}")
    if out_dtype not in _DTYPES:
        raise FastmergeError(f"{name}: output dtype {out_dtype} is not supported by the fused kernel")
    if len(models) != opts.k:
        raise FastmergeError(f"{name}: {len(models)} models but {opts.k} weights")
    xs = [fused_flat(m) for m in models]
    b = fused_flat(base) if base is not None else None
    n = xs[0].numel()
    device = xs[0].device
    if any(x.numel() != n for x in xs) or (b is not None and b.numel() != n):
        raise FastmergeError(f"{name}: the base and the models must have the same number of elements")
    if out is None:
        out = torch.empty(models[0].shape, dtype=out_dtype, device=device)
    if out.dtype != out_dtype or out.numel() != n or not out.is_contiguous():
        raise FastmergeError(f"{name}: out must be a contiguous {out_dtype} tensor of {n} elements")
    flat_out = out.view(-1)
    if n == 0:
        return b, xs, out, None, None, None
    store = flat_out.view(torch.int16) if out_dtype == torch.bfloat16 else flat_out

    # the host's part in pinned memory, copied without waiting; the rest is computed on the device
    pin = device.type == "cuda"
    host = torch.zeros(PRM_SIZE, dtype=torch.float32, pin_memory=pin)
    for k in range(opts.k):
        host[PRM_WEIGHT + k] = opts.weights[k]
        host[PRM_DENSITY + k] = opts.densities[k]
        host[PRM_SCALE + k] = inverse_scale(opts.densities[k]) if opts.sparsify != "none" and opts.rescale == "inverse" else 1.0
    host[PRM_LAMBDA] = opts.lambda_
    prm = host.to(device, non_blocking=pin)
    ends = None
    if opts.sparsify == "magnitude":
        taus, ends = cut_tensors(b, xs, opts.densities)
        prm[PRM_TAU:PRM_TAU + opts.k] = taus
        prm[PRM_TIE_LAST:PRM_TIE_LAST + opts.k] = _tie_lasts(ends, 0)
    if opts.sparsify != "none" and opts.rescale == "l1":
        prm[PRM_SCALE:PRM_SCALE + opts.k] = _l1_scales(b, xs, prm, ends, opts, name)
    return b, xs, out, store, prm, ends


def fused_merge(
    base: torch.Tensor | None,
    models: list[torch.Tensor],
    opts: FusedOptions,
    name: str,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
    block: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Fused task-arithmetic-family merge of one tensor (linear when ``base`` is None) into
    ``out`` (allocated if None), as ``fastmerge.cpu.fused_merge``; ``block`` (a power of two) and
    ``num_warps`` default to ``launch_config`` and do not change the result."""
    cfg = launch_config(opts.k, models[0].dtype if models and models[0].dtype in _DTYPES else torch.float32)
    block, num_warps = block or cfg[0], num_warps or cfg[1]
    with device_guard(models):
        b, xs, out, store, prm, ends = _prepare(base, models, opts, name, out_dtype, out)
        if store is not None:
            _launch(b, xs, store, prm, ends, opts, name, block, num_warps)
    return out


def _launch(b, xs, store, prm, ends, opts: FusedOptions, name: str, block: int, num_warps: int) -> None:
    """One per-tensor kernel launch per 2**31-element chunk (after ``_prepare``)."""
    out_dtype = torch.bfloat16 if store.dtype == torch.int16 else store.dtype
    n = xs[0].numel()
    lam = float(torch.tensor(opts.lambda_, dtype=torch.float32))
    for c, (s, e) in enumerate(rng.chunks(n)):
        cname = rng.chunk_name(name, c, n)
        seeds = [0, 0]
        if opts.sparsify == "random":
            seeds = [rng.group_seed(opts.seed, cname, g) for g in range(2)]
        pb = b[s:e] if b is not None else xs[0][s:e]
        ptrs = [x[s:e] for x in xs] + [pb] * (MAXK - opts.k)
        _fused_ta_kernel[(triton.cdiv(e - s, block),)](
            store[s:e], pb, *ptrs, chunk_prm(prm, ends, s), seeds[0], seeds[1], e - s,
            K=opts.k, HAS_BASE=b is not None, SPARSIFY=_SPARSIFY[opts.sparsify],
            CONSENSUS=_CONSENSUS[opts.consensus], NORMALIZE=bool(opts.normalize), APPLY_LAMBDA=lam != 1.0,
            OUT_BF16_BITS=out_dtype == torch.bfloat16, BLOCK=block,
            num_warps=num_warps, maxnreg=MAX_REGISTERS,
            enable_fp_fusion=False,  # no FMA contraction: the reference has none
        )
