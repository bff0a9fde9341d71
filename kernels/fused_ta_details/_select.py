"""TIES thresholds on the device (DESIGN.md section 3): a two-level 16-bit radix select.

tau_k is the exact m-th largest |x_k - base| of a tensor (m = keep_count(rho_k, n); m = 0 keeps
nothing, tau = inf). |delta| >= 0, so its fp32 bit pattern is ordered like its value, and the
selection runs on the bit patterns exactly as ``fastmerge.cpu._radix_thresholds``:

* pass 1 (``LEVEL=0``): per model, a 65536-bin histogram of the top 16 bits of the pattern;
* the host step (torch ops on the device, no synchronisation): a cumulative sum from the top
  picks the bin holding the m-th largest element and the rank left within it;
* pass 2 (``LEVEL=1``): per model, a 65536-bin histogram of the low 16 bits of the elements whose
  top 16 bits equal that bin; the same step picks the low half. The result is a float bit-equal to
  the CPU path's; where only some of the elements equal to tau may be kept, the index after the
  last kept one is searched by pieces (``_tie_end``), as ``fastmerge.cpu.fm_tie_ends`` does.

A 65536-bin histogram does not fit one program's registers, so ``tl.histogram`` is not used: each
element adds 1 to a global int64 histogram with ``tl.atomic_add`` (works on a GPU and under
``TRITON_INTERPRET=1``). Offsets are int64, so tensors of 2**31 or more elements need no chunking.
Up to 8 models share a launch (the base is read once per block for all of them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmerge.cpu import Cut, key_value
from fastmerge.dtypes import fused_flat
from fastmerge.spec import keep_count

NBINS = 65536
MAXK_LAUNCH = 8


@triton.jit
def _count(x_ptr, offs, mask, b, hist_ptr, prefix_ptr, k: tl.constexpr, LEVEL: tl.constexpr):
    """Add model k's elements of this block to its histogram row (pass LEVEL)."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    bits = tl.abs(x - b).to(tl.uint32, bitcast=True)
    hi = (bits >> 16).to(tl.int64)
    row = hist_ptr + k * 65536
    if LEVEL == 0:
        tl.atomic_add(row + hi, 1, mask=mask, sem="relaxed")
    else:
        pre = tl.load(prefix_ptr + k)
        lo = (bits & 0xFFFF).to(tl.int64)
        tl.atomic_add(row + lo, 1, mask=mask & (hi == pre), sem="relaxed")


@triton.jit
def _abs_hist_kernel(
    hist_ptr, prefix_ptr, base_ptr, x0, x1, x2, x3, x4, x5, x6, x7, n,
    K: tl.constexpr, HAS_BASE: tl.constexpr, LEVEL: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program counts BLOCK elements of K <= 8 models into hist[K, 65536] (int64)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
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


def _select_rows(hist: torch.Tensor, ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (bin, rank within the bin) of the rank-th largest element (1-based), as
    ``fastmerge.cpu._select`` but batched and without leaving the device."""
    above = torch.flip(hist, [1]).cumsum(1)  # above[:, i]: elements in the top i+1 bins
    i = torch.searchsorted(above, ranks[:, None]).clamp(max=NBINS - 1)  # (K, 1)
    before = torch.where(i > 0, above.gather(1, (i - 1).clamp(min=0)), torch.zeros_like(i))
    return (NBINS - 1 - i)[:, 0], (ranks[:, None] - before)[:, 0]




def device_thresholds(base: torch.Tensor | None, models: list[torch.Tensor], densities: tuple[float, ...],
                      block: int = 1024, num_warps: int = 4) -> list[float]:
    """The taus of ``device_cuts``."""
    return [c.tau for c in device_cuts(base, models, densities, block, num_warps)]


#: elements per piece when the ties' end is searched (one count per piece, then one piece read again)
TIE_PIECE = 1 << 22


def _tie_end(b: torch.Tensor | None, x: torch.Tensor, key: int, need: int) -> int:
    """The index e such that [0, e) holds ``need`` elements whose |x - b| has the fp32 bits ``key``,
    the last of them at e - 1 (torch on the device: one count per piece, two synchronisations)."""
    n = x.numel()

    def keys(s: int, e: int) -> torch.Tensor:
        d = x[s:e].float() - b[s:e].float() if b is not None else x[s:e].float()
        return d.abs().view(torch.int32) == key

    starts = list(range(0, n, TIE_PIECE))
    counts = torch.stack([keys(s, min(n, s + TIE_PIECE)).sum() for s in starts]).cumsum(0)
    piece = int(torch.searchsorted(counts, torch.tensor([need], device=counts.device)).item())
    before = int(counts[piece - 1].item()) if piece else 0
    s = starts[piece]
    at = torch.nonzero(keys(s, min(n, s + TIE_PIECE))).flatten()
    return s + int(at[need - before - 1].item()) + 1


def device_cuts(base: torch.Tensor | None, models: list[torch.Tensor], densities: tuple[float, ...],
                block: int = 1024, num_warps: int = 4) -> list[Cut]:
    """TIES cuts (the exact m-th largest |x_k - base|, inf where m = 0, and the end of the ties kept
    at it) by the Triton radix select; equal to ``fastmerge.cpu.fused_cuts``. Runs on the models'
    device (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``); one host synchronisation, and two
    more per model whose ties at tau are split."""
    xs = [fused_flat(m) for m in models]
    b = fused_flat(base) if base is not None else None
    n = xs[0].numel() if xs else 0
    if any(x.numel() != n for x in xs) or (b is not None and b.numel() != n):
        raise ValueError("the base and the models must have the same number of elements")
    ms = [keep_count(d, n) for d in densities]
    cuts = [Cut(float("inf"), 0)] * len(xs)
    active = [i for i, m in enumerate(ms) if m]
    if not active:
        return cuts
    device = xs[0].device
    grid = (triton.cdiv(n, block),)
    results = []
    for g in range(0, len(active), MAXK_LAUNCH):
        idx = active[g:g + MAXK_LAUNCH]
        k = len(idx)
        ptrs = [xs[i] for i in idx] + [xs[idx[0]]] * (MAXK_LAUNCH - k)
        ranks = torch.tensor([ms[i] for i in idx], dtype=torch.int64, device=device)
        hist = torch.zeros((k, NBINS), dtype=torch.int64, device=device)
        prefix = torch.zeros(k, dtype=torch.int64, device=device)
        pb = b if b is not None else ptrs[0]
        _abs_hist_kernel[grid](hist, prefix, pb, *ptrs, n, K=k, HAS_BASE=b is not None, LEVEL=0,
                               BLOCK=block, num_warps=num_warps)
        prefix, rank = _select_rows(hist, ranks)
        hist.zero_()
        _abs_hist_kernel[grid](hist, prefix.contiguous(), pb, *ptrs, n, K=k, HAS_BASE=b is not None, LEVEL=1,
                               BLOCK=block, num_warps=num_warps)
        low, within = _select_rows(hist, rank.contiguous())
        equal = hist.gather(1, low[:, None])[:, 0]
        results.append((idx, torch.stack([(prefix << 16) | low, within, equal], 1)))
    for idx, rows in results:  # the only synchronisation when no ties are split
        for i, (key, need, equal) in zip(idx, rows.tolist()):
            cuts[i] = Cut(key_value(key), n if need == equal else _tie_end(b, xs[i], key, need))
    return cuts
