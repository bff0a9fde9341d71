"""TIES cuts on the device (DESIGN.md section 3): a two-level 16-bit radix select, then the end of
the ties kept at the threshold, with no host synchronisation.

tau_k is the exact m-th largest |x_k - base| of a tensor (m = keep_count(rho_k, n); m = 0 keeps
nothing, tau = inf). |delta| >= 0, so its fp32 bit pattern is ordered like its value, and the
selection runs on the bit patterns exactly as ``fastmerge.cpu._radix_cuts``:

* pass 1 (``LEVEL=0``): per model, a 65536-bin histogram of the top 16 bits of the pattern;
* a cumulative sum from the top (torch ops on the device) picks the bin holding the m-th largest
  element and the rank left within it;
* pass 2 (``LEVEL=1``): per model, a 65536-bin histogram of the low 16 bits of the elements whose
  top 16 bits equal that bin; the same step picks the low half: tau, bit-equal to the CPU path's,
  and how many of the elements equal to tau are kept (``need``);
* pass 3 (``_tie_count_kernel``): per block, how many elements equal tau; a cumulative sum picks
  the block holding the need-th one and ``_tie_find_kernel`` its index (a prefix sum in that
  block): the index after it is the cut's ``end`` (n where every tie is kept).

A 65536-bin histogram does not fit one program's registers, so ``tl.histogram`` is not used: each
element adds 1 to a global int32 histogram with ``tl.atomic_add`` (works on a GPU and under
``TRITON_INTERPRET=1``). bf16 deltas take few distinct values, so many programs would add to the
same counters at once and serialise: program p adds to replica p % REPLICAS of the histogram, and
the replicas are summed afterwards. Offsets are int64, so tensors of 2**31 or more elements need
no chunking. Up to 8 models share a launch (the base is read once per block for all of them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmerge.cpu import Cut
from fastmerge.dtypes import fused_flat
from fastmerge.spec import keep_count

from ._host import to_device

NBINS = 65536
MAXK_LAUNCH = 8
#: histogram replicas (program p counts into replica p % REPLICAS): fewer programs per counter
REPLICAS = 16


@triton.jit
def _keys(x_ptr, offs, mask, b):
    """The fp32 bits of |x - b| (int32; non-negative, so ordered as the values)."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return tl.abs(x - b).to(tl.int32, bitcast=True)


@triton.jit
def _count(x_ptr, offs, mask, b, hist_ptr, prefix_ptr, k: tl.constexpr, LEVEL: tl.constexpr):
    """Add model k's elements of this block to its histogram row (pass LEVEL)."""
    bits = _keys(x_ptr, offs, mask, b)
    hi = bits >> 16
    row = hist_ptr + k * 65536
    if LEVEL == 0:
        tl.atomic_add(row + hi, 1, mask=mask, sem="relaxed")
    else:
        pre = tl.load(prefix_ptr + k).to(tl.int32)
        lo = bits & 0xFFFF
        tl.atomic_add(row + lo, 1, mask=mask & (hi == pre), sem="relaxed")


@triton.jit(do_not_specialize=["n"])
def _abs_hist_kernel(
    hist_ptr, prefix_ptr, base_ptr, x0, x1, x2, x3, x4, x5, x6, x7, n,
    K: tl.constexpr, HAS_BASE: tl.constexpr, LEVEL: tl.constexpr, BLOCK: tl.constexpr, REPLICAS: tl.constexpr,
):
    """One program counts BLOCK elements of K <= 8 models into its replica of hist[R, K, 65536]."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    hist_ptr += (pid % REPLICAS).to(tl.int64) * (K * 65536)
    if HAS_BASE:
        b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        b = tl.zeros([BLOCK], dtype=tl.float32)
    _count(x0, offs, mask, b, hist_ptr, prefix_ptr, 0, LEVEL)
    if K > 1:
        _count(x1, offs, mask, b, hist_ptr, prefix_ptr, 1, LEVEL)
    if K > 2:
        _count(x2, offs, mask, b, hist_ptr, prefix_ptr, 2, LEVEL)
    if K > 3:
        _count(x3, offs, mask, b, hist_ptr, prefix_ptr, 3, LEVEL)
    if K > 4:
        _count(x4, offs, mask, b, hist_ptr, prefix_ptr, 4, LEVEL)
    if K > 5:
        _count(x5, offs, mask, b, hist_ptr, prefix_ptr, 5, LEVEL)
    if K > 6:
        _count(x6, offs, mask, b, hist_ptr, prefix_ptr, 6, LEVEL)
    if K > 7:
        _count(x7, offs, mask, b, hist_ptr, prefix_ptr, 7, LEVEL)


@triton.jit
def _tie_count(x_ptr, offs, mask, b, key_ptr, counts_ptr, nblk, pid, k: tl.constexpr):
    key = tl.load(key_ptr + k)
    eq = (_keys(x_ptr, offs, mask, b) == key) & mask
    tl.store(counts_ptr + k * nblk + pid, tl.sum(eq.to(tl.int32), axis=0))


@triton.jit(do_not_specialize=["n", "nblk"])
def _tie_count_kernel(
    counts_ptr, key_ptr, base_ptr, x0, x1, x2, x3, x4, x5, x6, x7, n, nblk,
    K: tl.constexpr, HAS_BASE: tl.constexpr, BLOCK: tl.constexpr,
):
    """counts[k, pid]: how many of this block's elements have |x_k - base| bits == key[k]."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if HAS_BASE:
        b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        b = tl.zeros([BLOCK], dtype=tl.float32)
    _tie_count(x0, offs, mask, b, key_ptr, counts_ptr, nblk, pid, 0)
    if K > 1:
        _tie_count(x1, offs, mask, b, key_ptr, counts_ptr, nblk, pid, 1)
    if K > 2:
        _tie_count(x2, offs, mask, b, key_ptr, counts_ptr, nblk, pid, 2)
    if K > 3:
        _tie_count(x3, offs, mask, b, key_ptr, counts_ptr, nblk, pid, 3)
    if K > 4:
        _tie_count(x4, offs, mask, b, key_ptr, counts_ptr, nblk, pid, 4)
    if K > 5:
        _tie_count(x5, offs, mask, b, key_ptr, counts_ptr, nblk, pid, 5)
    if K > 6:
        _tie_count(x6, offs, mask, b, key_ptr, counts_ptr, nblk, pid, 6)
    if K > 7:
        _tie_count(x7, offs, mask, b, key_ptr, counts_ptr, nblk, pid, 7)


@triton.jit(do_not_specialize=["n", "k"])
def _tie_find_kernel(end_ptr, where_ptr, key_ptr, base_ptr, x_ptr, n, k, HAS_BASE: tl.constexpr, BLOCK: tl.constexpr):
    """end[k] = 1 + the index of the where[k, 1]-th element equal to key[k] in block where[k, 0]
    (found by a prefix sum over the block); left as it is when where[k, 1] is 0 (every tie kept)."""
    blk = tl.load(where_ptr + 2 * k)
    need = tl.load(where_ptr + 2 * k + 1)
    if need > 0:
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        if HAS_BASE:
            b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            b = tl.zeros([BLOCK], dtype=tl.float32)
        eq = (_keys(x_ptr, offs, mask, b) == tl.load(key_ptr + k)) & mask
        rank = tl.cumsum(eq.to(tl.int32), axis=0)
        hit = tl.where(eq & (rank == need), offs, n)
        tl.store(end_ptr + k, tl.min(hit, axis=0) + 1)


def _select_rows(hist: torch.Tensor, ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (bin, rank within the bin) of the rank-th largest element (1-based), as
    ``fastmerge.cpu._select`` but batched and without leaving the device."""
    above = torch.flip(hist, [1]).cumsum(1)  # above[:, i]: elements in the top i+1 bins
    i = torch.searchsorted(above, ranks[:, None]).clamp(max=NBINS - 1)  # (K, 1)
    before = torch.where(i > 0, above.gather(1, (i - 1).clamp(min=0)), torch.zeros_like(i))
    return (NBINS - 1 - i)[:, 0], (ranks[:, None] - before)[:, 0]


def cut_tensors(base: torch.Tensor | None, models: list[torch.Tensor], densities: tuple[float, ...],
                block: int = 1024, num_warps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES cuts of K models as two tensors on their device, computed with no host
    synchronisation: tau (fp32 [K]; inf where m = 0) and end (int64 [K]: elements equal to tau are
    kept at flat indices < end), equal to ``fastmerge.cpu.fused_cuts``. CUDA tensors, or CPU
    tensors under ``TRITON_INTERPRET=1``."""
    xs = [fused_flat(m) for m in models]
    b = fused_flat(base) if base is not None else None
    n = xs[0].numel() if xs else 0
    if any(x.numel() != n for x in xs) or (b is not None and b.numel() != n):
        raise ValueError("the base and the models must have the same number of elements")
    device = xs[0].device if xs else torch.device("cpu")
    ms = [keep_count(d, n) for d in densities]
    taus = torch.full((len(xs),), float("inf"), dtype=torch.float32, device=device)
    ends = torch.zeros(len(xs), dtype=torch.int64, device=device)
    active = [i for i, m in enumerate(ms) if m]
    if not active:
        return taus, ends
    nblk = triton.cdiv(n, block)
    replicas = min(REPLICAS, nblk)
    pb_kw = dict(HAS_BASE=b is not None, BLOCK=block, num_warps=num_warps)
    for g in range(0, len(active), MAXK_LAUNCH):
        idx = active[g:g + MAXK_LAUNCH]
        k = len(idx)
        ptrs = [xs[i] for i in idx] + [xs[idx[0]]] * (MAXK_LAUNCH - k)
        pb = b if b is not None else ptrs[0]
        ranks = to_device([ms[i] for i in idx], torch.int64, device)
        hist = torch.zeros((replicas, k, NBINS), dtype=torch.int32, device=device)
        prefix = torch.zeros(k, dtype=torch.int64, device=device)
        _abs_hist_kernel[(nblk,)](hist, prefix, pb, *ptrs, n, K=k, LEVEL=0, REPLICAS=replicas, **pb_kw)
        prefix, rank = _select_rows(hist.sum(0, dtype=torch.int64), ranks)
        hist.zero_()
        _abs_hist_kernel[(nblk,)](hist, prefix.contiguous(), pb, *ptrs, n, K=k, LEVEL=1, REPLICAS=replicas, **pb_kw)
        summed = hist.sum(0, dtype=torch.int64)
        low, need = _select_rows(summed, rank.contiguous())
        equal = summed.gather(1, low[:, None])[:, 0]
        key = ((prefix << 16) | low).to(torch.int32).contiguous()
        # pass 3: where the need-th tie lies (a block, the rank within it); need 0 = every tie kept
        counts = torch.empty((k, nblk), dtype=torch.int32, device=device)
        _tie_count_kernel[(nblk,)](counts, key, pb, *ptrs, n, nblk, K=k, **pb_kw)
        cum = counts.cumsum(1, dtype=torch.int64)
        blk = torch.searchsorted(cum, need[:, None]).clamp(max=nblk - 1)[:, 0]
        before = torch.where(blk > 0, cum.gather(1, (blk - 1).clamp(min=0)[:, None])[:, 0], torch.zeros_like(blk))
        split = need < equal
        where = torch.stack([blk, torch.where(split, need - before, torch.zeros_like(need))], 1).contiguous()
        found = torch.full((k,), n, dtype=torch.int64, device=device)
        for j in range(k):
            _tie_find_kernel[(1,)](found, where, key, pb, ptrs[j], n, j, **pb_kw)
        pos = to_device(idx, torch.int64, device)
        taus.index_copy_(0, pos, key.view(torch.float32))
        ends.index_copy_(0, pos, found)
    return taus, ends


def device_cuts(base: torch.Tensor | None, models: list[torch.Tensor], densities: tuple[float, ...],
                block: int = 1024, num_warps: int = 4) -> list[Cut]:
    """``cut_tensors`` as a list of ``Cut`` (one host synchronisation)."""
    taus, ends = cut_tensors(base, models, densities, block, num_warps)
    return [Cut(t, e) for t, e in zip(taus.tolist(), ends.tolist())]


def device_thresholds(base: torch.Tensor | None, models: list[torch.Tensor], densities: tuple[float, ...],
                      block: int = 1024, num_warps: int = 4) -> list[float]:
    """The taus of ``device_cuts``."""
    return [c.tau for c in device_cuts(base, models, densities, block, num_warps)]
