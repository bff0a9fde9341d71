"""Triton functions of the fused task-arithmetic-family merge (DESIGN.md section 3).

One program merges BLOCK elements of one tensor (or one 2**31-element chunk of it): it loads the
base and K <= 8 models, upcasts each to fp32 once, and computes exactly what the fused CPU loop
(``fastmerge/csrc/fused.c``, ``fm_merge``) computes, operation by operation and in the same
accumulation order, then stores once in the output dtype. Per-model scalars come from a small fp32
tensor ``prm``: weights at [0, 8), densities at [8, 16), scales at [16, 24), TIES thresholds at
[24, 32), lambda at [32], and at [33, 41) the int32 bits of the last index (within the chunk; -1:
none) at which an element equal to the TIES threshold is kept. The models are separate pointer arguments x0..x7 (unused ones = any
valid pointer) and K is a constexpr, so the per-model code below is unrolled at compile time.
"""

from __future__ import annotations

import triton
import triton.language as tl

PRM_WEIGHT = 0
PRM_DENSITY = 8
PRM_SCALE = 16
PRM_TAU = 24
PRM_LAMBDA = 32
PRM_TIE_LAST = 33
PRM_SIZE = 41

SP_NONE = 0
SP_RANDOM = 1
SP_MAGNITUDE = 2
CS_NONE = 0
CS_SUM = 1
CS_COUNT = 2


@triton.jit
def _keep(d, rnd, prm_ptr, k: tl.constexpr, SPARSIFY: tl.constexpr):
    """keep_k: DARE (U < rho_k, U from Philox lane ``rnd``), magnitude (|d| > tau_k, or == tau_k at
    element indices ``rnd`` <= the last tie kept) or all."""
    if SPARSIFY == 1:
        rho = tl.load(prm_ptr + 8 + k)
        keep = tl.random.uint_to_uniform_float(rnd) < rho
    elif SPARSIFY == 2:
        tau = tl.load(prm_ptr + 24 + k)
        last = tl.load(prm_ptr + 33 + k).to(tl.int32, bitcast=True)
        a = tl.abs(d)
        keep = (a > tau) | ((a == tau) & (rnd <= last))
    else:
        keep = tl.full(d.shape, 1, tl.int1)  # all kept
    return keep


@triton.jit
def _model_v(x_ptr, offs, mask, b, rnd, prm_ptr, k: tl.constexpr, SPARSIFY: tl.constexpr):
    """v_k = keep_k ? (delta_k * scale_k) * w_k : 0, as fm_merge."""
    d = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - b
    scale = tl.load(prm_ptr + 16 + k)
    w = tl.load(prm_ptr + k)
    v = (d * scale) * w
    if SPARSIFY != 0:
        v = tl.where(_keep(d, rnd, prm_ptr, k, SPARSIFY), v, 0.0)
    return v


@triton.jit
def _vote(sgn, v, CONSENSUS: tl.constexpr):
    """The consensus accumulator: sum of v (``sum``) or of sign(v) (``count``)."""
    if CONSENSUS == 1:
        sgn = sgn + v
    elif CONSENSUS == 2:
        sgn = sgn + ((v > 0.0).to(tl.float32) - (v < 0.0).to(tl.float32))
    return sgn


@triton.jit
def _mix(mixed, div, v, sigma, prm_ptr, k: tl.constexpr, CONSENSUS: tl.constexpr):
    """Add model k to the weighted sum: every model (consensus none) or the agreeing ones."""
    w = tl.load(prm_ptr + k)
    if CONSENSUS == 0:
        mixed = mixed + v
        div = div + w
    else:
        agree = v * sigma > 0.0  # a dropped or zero v never agrees
        mixed = mixed + tl.where(agree, v, 0.0)
        div = div + tl.where(agree, w, 0.0)
    return mixed, div


@triton.jit
def _store(out_ptr, offs, mask, y, OUT_BF16_BITS: tl.constexpr):
    """One store in the output dtype. bf16 is rounded here to nearest even (NaN -> 0x7FC0, as
    torch and fused.c) and stored through an int16 view: the interpreter's own fp32 -> bf16 cast
    truncates, and this way the interpreter and a GPU round the same."""
    if OUT_BF16_BITS:
        u = y.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r)
        tl.store(out_ptr + offs, r.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _merge_block(
    out_ptr, base_ptr, x0, x1, x2, x3, x4, x5, x6, x7, prm_ptr, seed0, seed1, offs, mask,
    K: tl.constexpr, HAS_BASE: tl.constexpr, SPARSIFY: tl.constexpr, CONSENSUS: tl.constexpr,
    NORMALIZE: tl.constexpr, APPLY_LAMBDA: tl.constexpr, OUT_BF16_BITS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Merge the elements ``offs`` (int64, local to the tensor or chunk; ``mask`` = in range) of one
    tensor: the body shared by the per-tensor and the grouped kernel."""
    j = offs.to(tl.int32)  # the element's index within its chunk: the Philox counter
    zero = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_BASE:
        b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        b = zero
    if SPARSIFY == 1:  # one Philox evaluation serves four models
        r0, r1, r2, r3 = tl.randint4x(seed0, j)
        if K > 4:
            r4, r5, r6, r7 = tl.randint4x(seed1, j)
        else:
            r4, r5, r6, r7 = r0, r1, r2, r3
    else:
        r0, r1, r2, r3, r4, r5, r6, r7 = j, j, j, j, j, j, j, j

    # v_k and the consensus vote, k = 0, 1, ... in order (fm_merge's first loop)
    v0 = _model_v(x0, offs, mask, b, r0, prm_ptr, 0, SPARSIFY)
    sgn = _vote(zero, v0, CONSENSUS)
    if K > 1:
        v1 = _model_v(x1, offs, mask, b, r1, prm_ptr, 1, SPARSIFY)
        sgn = _vote(sgn, v1, CONSENSUS)
    if K > 2:
        v2 = _model_v(x2, offs, mask, b, r2, prm_ptr, 2, SPARSIFY)
        sgn = _vote(sgn, v2, CONSENSUS)
    if K > 3:
        v3 = _model_v(x3, offs, mask, b, r3, prm_ptr, 3, SPARSIFY)
        sgn = _vote(sgn, v3, CONSENSUS)
    if K > 4:
        v4 = _model_v(x4, offs, mask, b, r4, prm_ptr, 4, SPARSIFY)
        sgn = _vote(sgn, v4, CONSENSUS)
    if K > 5:
        v5 = _model_v(x5, offs, mask, b, r5, prm_ptr, 5, SPARSIFY)
        sgn = _vote(sgn, v5, CONSENSUS)
    if K > 6:
        v6 = _model_v(x6, offs, mask, b, r6, prm_ptr, 6, SPARSIFY)
        sgn = _vote(sgn, v6, CONSENSUS)
    if K > 7:
        v7 = _model_v(x7, offs, mask, b, r7, prm_ptr, 7, SPARSIFY)
        sgn = _vote(sgn, v7, CONSENSUS)

    # the weighted sum over the agreeing models, in the same order
    sigma = tl.where(sgn >= 0.0, 1.0, -1.0)
    mixed, div = _mix(zero, zero, v0, sigma, prm_ptr, 0, CONSENSUS)
    if K > 1:
        mixed, div = _mix(mixed, div, v1, sigma, prm_ptr, 1, CONSENSUS)
    if K > 2:
        mixed, div = _mix(mixed, div, v2, sigma, prm_ptr, 2, CONSENSUS)
    if K > 3:
        mixed, div = _mix(mixed, div, v3, sigma, prm_ptr, 3, CONSENSUS)
    if K > 4:
        mixed, div = _mix(mixed, div, v4, sigma, prm_ptr, 4, CONSENSUS)
    if K > 5:
        mixed, div = _mix(mixed, div, v5, sigma, prm_ptr, 5, CONSENSUS)
    if K > 6:
        mixed, div = _mix(mixed, div, v6, sigma, prm_ptr, 6, CONSENSUS)
    if K > 7:
        mixed, div = _mix(mixed, div, v7, sigma, prm_ptr, 7, CONSENSUS)

    if NORMALIZE:
        if CONSENSUS == 0:
            div = tl.where(tl.abs(div) < 1e-8, 1.0, div)
        else:
            div = tl.where(div == 0.0, 1.0, div)
        mixed = tl.math.div_rn(mixed, div)  # IEEE division, as the C loop and torch
    if APPLY_LAMBDA:
        mixed = mixed * tl.load(prm_ptr + 32)
    _store(out_ptr, offs, mask, b + mixed, OUT_BF16_BITS)




@triton.jit(do_not_specialize=["seed0", "seed1", "n"])  # a new seed or size must not recompile
def _fused_ta_kernel(
    out_ptr, base_ptr, x0, x1, x2, x3, x4, x5, x6, x7, prm_ptr, seed0, seed1, n,
    K: tl.constexpr, HAS_BASE: tl.constexpr, SPARSIFY: tl.constexpr, CONSENSUS: tl.constexpr,
    NORMALIZE: tl.constexpr, APPLY_LAMBDA: tl.constexpr, OUT_BF16_BITS: tl.constexpr, BLOCK: tl.constexpr,
):
    first = tl.program_id(0).to(tl.int64) * BLOCK
    offs = first + tl.arange(0, BLOCK)  # int64 addressing
    if first + BLOCK <= n:  # a full block: no mask, so 16-byte vector loads whatever n is
        _merge_block(out_ptr, base_ptr, x0, x1, x2, x3, x4, x5, x6, x7, prm_ptr, seed0, seed1, offs,
                     tl.full([BLOCK], 1, tl.int1), K, HAS_BASE, SPARSIFY, CONSENSUS, NORMALIZE, APPLY_LAMBDA,
                     OUT_BF16_BITS, BLOCK)
    else:
        _merge_block(out_ptr, base_ptr, x0, x1, x2, x3, x4, x5, x6, x7, prm_ptr, seed0, seed1, offs, offs < n,
                     K, HAS_BASE, SPARSIFY, CONSENSUS, NORMALIZE, APPLY_LAMBDA, OUT_BF16_BITS, BLOCK)


@triton.jit
def _table_ptr(anchor, row, i: tl.constexpr, ALIGN: tl.constexpr):
    """Entry ``i`` of a pointer-table row: an int64 offset in elements from ``anchor`` (a pointer
    argument, 16-byte aligned). The host puts only 16-byte aligned tensors in the table, so every
    offset is a multiple of ALIGN = 16 / element size, and says so here: a pointer cast from a
    loaded int64 address carries no alignment, and every load through it was a scalar load."""
    return anchor + tl.multiple_of(tl.load(row + i), ALIGN)


@triton.jit
def _fused_ta_grouped_kernel(
    block_entry_ptr, starts_ptr, numel_ptr, ptrs_ptr, prm_ptr, seeds_ptr, out_anchor, base_anchor, x_anchor,
    K: tl.constexpr, HAS_BASE: tl.constexpr, SPARSIFY: tl.constexpr, CONSENSUS: tl.constexpr,
    NORMALIZE: tl.constexpr, APPLY_LAMBDA: tl.constexpr, OUT_BF16_BITS: tl.constexpr,
    OUT_ALIGN: tl.constexpr, BASE_ALIGN: tl.constexpr, X_ALIGN: tl.constexpr, BLOCK: tl.constexpr,
):
    """Many tensors (or 2**31-element chunks) in one launch. Program ``pid`` merges block ``pid``
    of the concatenated work: its entry t = ``block_entry[pid]`` (int32, built on the device), whose
    first program is ``starts[t]``; entry t's element count is ``numel[t]``, its pointer row
    ``ptrs[t, :]`` = (out, base, x0 .. x{K-1}) as int64 element offsets from the anchors (the
    first entry's tensors), its parameters ``prm[t, :]`` (the per-tensor layout, PRM_SIZE = 41
    floats) and its two Philox seeds ``seeds[t, :]``. The block's element indices are local to the
    entry: exactly what the per-tensor kernel computes for that block. A full block (all but the
    last block of each entry) is merged without a mask, so its loads and stores are 16-byte vectors."""
    pid = tl.program_id(0)
    t = tl.load(block_entry_ptr + pid).to(tl.int64)
    first = (pid - tl.load(starts_ptr + t)).to(tl.int64) * BLOCK  # int64, local to the entry
    offs = first + tl.arange(0, BLOCK)
    numel = tl.load(numel_ptr + t)
    row = ptrs_ptr + t * (K + 2)
    out_ptr = _table_ptr(out_anchor, row, 0, OUT_ALIGN)
    x0 = _table_ptr(x_anchor, row, 2, X_ALIGN)
    # models past K are never read (the per-model code is unrolled up to the constexpr K)
    x1 = _table_ptr(x_anchor, row, 3 if K > 1 else 2, X_ALIGN)
    x2 = _table_ptr(x_anchor, row, 4 if K > 2 else 2, X_ALIGN)
    x3 = _table_ptr(x_anchor, row, 5 if K > 3 else 2, X_ALIGN)
    x4 = _table_ptr(x_anchor, row, 6 if K > 4 else 2, X_ALIGN)
    x5 = _table_ptr(x_anchor, row, 7 if K > 5 else 2, X_ALIGN)
    x6 = _table_ptr(x_anchor, row, 8 if K > 6 else 2, X_ALIGN)
    x7 = _table_ptr(x_anchor, row, 9 if K > 7 else 2, X_ALIGN)
    if HAS_BASE:
        base_ptr = _table_ptr(base_anchor, row, 1, BASE_ALIGN)
    else:
        base_ptr = x0
    seed0 = tl.load(seeds_ptr + 2 * t)
    seed1 = tl.load(seeds_ptr + 2 * t + 1)
    prm = prm_ptr + t * 41
    if first + BLOCK <= numel:
        _merge_block(out_ptr, base_ptr, x0, x1, x2, x3, x4, x5, x6, x7, prm, seed0, seed1, offs,
                     tl.full([BLOCK], 1, tl.int1), K, HAS_BASE, SPARSIFY, CONSENSUS, NORMALIZE, APPLY_LAMBDA,
                     OUT_BF16_BITS, BLOCK)
    else:
        _merge_block(out_ptr, base_ptr, x0, x1, x2, x3, x4, x5, x6, x7, prm, seed0, seed1, offs, offs < numel,
                     K, HAS_BASE, SPARSIFY, CONSENSUS, NORMALIZE, APPLY_LAMBDA, OUT_BF16_BITS, BLOCK)


@triton.jit
def _l1_step(x_ptr, offs, mask, b, rnd, prm_ptr, acc_total, acc_kept, k: tl.constexpr, SPARSIFY: tl.constexpr):
    """Add model k's |delta| and |keep * delta| of one block to its fp64 accumulators."""
    d = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - b
    a = tl.where(mask, tl.abs(d), 0.0).to(tl.float64)
    return acc_total + a, acc_kept + tl.where(_keep(d, rnd, prm_ptr, k, SPARSIFY), a, 0.0)


@triton.jit
def _l1_store(sums_ptr, pid, acc_total, acc_kept, k: tl.constexpr, K: tl.constexpr):
    tl.store(sums_ptr + (pid * K + k) * 2, tl.sum(acc_total, axis=0))
    tl.store(sums_ptr + (pid * K + k) * 2 + 1, tl.sum(acc_kept, axis=0))


@triton.jit
def _l1_block(
    base_ptr, x0, x1, x2, x3, x4, x5, x6, x7, prm_ptr, seed0, seed1, offs, mask,
    t0, k0, t1, k1, t2, k2, t3, k3, t4, k4, t5, k5, t6, k6, t7, k7,
    K: tl.constexpr, HAS_BASE: tl.constexpr, SPARSIFY: tl.constexpr, BLOCK: tl.constexpr,
):
    """One block's |delta| and |keep * delta| added to the K models' accumulators (t_k, k_k)."""
    j = offs.to(tl.int32)
    if HAS_BASE:
        b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        b = tl.zeros([BLOCK], dtype=tl.float32)
    if SPARSIFY == 1:
        r0, r1, r2, r3 = tl.randint4x(seed0, j)
        if K > 4:
            r4, r5, r6, r7 = tl.randint4x(seed1, j)
        else:
            r4, r5, r6, r7 = r0, r1, r2, r3
    else:
        r0, r1, r2, r3, r4, r5, r6, r7 = j, j, j, j, j, j, j, j
    t0, k0 = _l1_step(x0, offs, mask, b, r0, prm_ptr, t0, k0, 0, SPARSIFY)
    if K > 1:
        t1, k1 = _l1_step(x1, offs, mask, b, r1, prm_ptr, t1, k1, 1, SPARSIFY)
    if K > 2:
        t2, k2 = _l1_step(x2, offs, mask, b, r2, prm_ptr, t2, k2, 2, SPARSIFY)
    if K > 3:
        t3, k3 = _l1_step(x3, offs, mask, b, r3, prm_ptr, t3, k3, 3, SPARSIFY)
    if K > 4:
        t4, k4 = _l1_step(x4, offs, mask, b, r4, prm_ptr, t4, k4, 4, SPARSIFY)
    if K > 5:
        t5, k5 = _l1_step(x5, offs, mask, b, r5, prm_ptr, t5, k5, 5, SPARSIFY)
    if K > 6:
        t6, k6 = _l1_step(x6, offs, mask, b, r6, prm_ptr, t6, k6, 6, SPARSIFY)
    if K > 7:
        t7, k7 = _l1_step(x7, offs, mask, b, r7, prm_ptr, t7, k7, 7, SPARSIFY)
    return t0, k0, t1, k1, t2, k2, t3, k3, t4, k4, t5, k5, t6, k6, t7, k7


@triton.jit(do_not_specialize=["seed0", "seed1", "n", "iters"])
def _l1_sums_kernel(
    sums_ptr, base_ptr, x0, x1, x2, x3, x4, x5, x6, x7, prm_ptr, seed0, seed1, n, iters,
    K: tl.constexpr, HAS_BASE: tl.constexpr, SPARSIFY: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per-program partial sum|delta_k| and sum|keep_k * delta_k| in fp64 (the l1 rescale) over
    ``iters`` consecutive blocks, for all K models in one launch (the base is read once):
    sums[pid, k, 0] and sums[pid, k, 1]. The keep masks are the merge kernel's (``_keep``). Full
    blocks come first and go without a mask (vector loads); the tail block, if any, after: each
    accumulator still adds the blocks in order."""
    pid = tl.program_id(0)
    zero = tl.zeros([BLOCK], dtype=tl.float64)
    t0, k0, t1, k1, t2, k2, t3, k3 = zero, zero, zero, zero, zero, zero, zero, zero
    t4, k4, t5, k5, t6, k6, t7, k7 = zero, zero, zero, zero, zero, zero, zero, zero
    first = pid.to(tl.int64) * iters
    full = tl.minimum(tl.maximum(n // BLOCK - first, 0), iters).to(tl.int32)
    for it in range(0, full):
        offs = (first + it) * BLOCK + tl.arange(0, BLOCK)
        t0, k0, t1, k1, t2, k2, t3, k3, t4, k4, t5, k5, t6, k6, t7, k7 = _l1_block(
            base_ptr, x0, x1, x2, x3, x4, x5, x6, x7, prm_ptr, seed0, seed1, offs, tl.full([BLOCK], 1, tl.int1),
            t0, k0, t1, k1, t2, k2, t3, k3, t4, k4, t5, k5, t6, k6, t7, k7, K, HAS_BASE, SPARSIFY, BLOCK)
    for it in range(full, iters):
        offs = (first + it) * BLOCK + tl.arange(0, BLOCK)
        t0, k0, t1, k1, t2, k2, t3, k3, t4, k4, t5, k5, t6, k6, t7, k7 = _l1_block(
            base_ptr, x0, x1, x2, x3, x4, x5, x6, x7, prm_ptr, seed0, seed1, offs, offs < n,
            t0, k0, t1, k1, t2, k2, t3, k3, t4, k4, t5, k5, t6, k6, t7, k7, K, HAS_BASE, SPARSIFY, BLOCK)
    _l1_store(sums_ptr, pid, t0, k0, 0, K)
    if K > 1:
        _l1_store(sums_ptr, pid, t1, k1, 1, K)
    if K > 2:
        _l1_store(sums_ptr, pid, t2, k2, 2, K)
    if K > 3:
        _l1_store(sums_ptr, pid, t3, k3, 3, K)
    if K > 4:
        _l1_store(sums_ptr, pid, t4, k4, 4, K)
    if K > 5:
        _l1_store(sums_ptr, pid, t5, k5, 5, K)
    if K > 6:
        _l1_store(sums_ptr, pid, t6, k6, 6, K)
    if K > 7:
        _l1_store(sums_ptr, pid, t7, k7, 7, K)
