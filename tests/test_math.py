"""The merge math: fused CPU path == pure-torch reference, and the DARE mask is a function of the
data (seed, tensor name, model, element index), not of the launch."""

from __future__ import annotations

import pytest
import torch

from fastmerge import cpu, reference, rng
from fastmerge.spec import FusedOptions, keep_count

from .conftest import TOLERANCES
from .conftest import tensor_family as _family

COMBOS = [
    # (sparsify, consensus, rescale, normalize)
    ("none", "none", "none", False),  # task_arithmetic
    ("none", "none", "none", True),  # linear-like
    ("magnitude", "sum", "none", True),  # ties
    ("magnitude", "count", "l1", False),
    ("random", "sum", "l1", False),  # dare_ties (mergekit's rescale)
    ("random", "none", "inverse", False),  # dare_linear (the paper's 1/p)
    ("random", "count", "none", True),
]
ODD = 4099  # not a multiple of any block size


def _opts(k: int, combo, seed: int = 1, lam: float = 1.0) -> FusedOptions:
    sp, cs, rs, norm = combo
    weights = tuple([0.7, -0.3, 1.2, 0.4, 0.9, 0.25, 0.6, 1.5][:k])
    dens = tuple([0.3, 0.55, 0.9, 0.05, 1.0, 0.7, 0.2, 0.45][:k])
    return FusedOptions(weights=weights, densities=dens, sparsify=sp, consensus=cs, rescale=rs,
                        normalize=norm, lambda_=lam, seed=seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("k", [1, 3, 5])
def test_fused_cpu_equals_reference(dtype, combo, k):
    base, models = _family(ODD, k, dtype, seed=k)
    opts = _opts(k, combo, lam=1.3)
    want = reference.fused_merge(base, models, opts, "model.layers.0.mlp.up_proj.weight", dtype)
    got = cpu.fused_merge(base, models, opts, "model.layers.0.mlp.up_proj.weight", dtype)
    assert got.dtype == dtype
    # Same operations in the same order: identical in practice; the table bounds any libm drift.
    torch.testing.assert_close(got, want, **TOLERANCES[dtype])
    assert (got != want).sum() <= 0.001 * ODD


def test_linear_without_base_is_weighted_mean():
    _, models = _family(1000, 3, torch.float32)
    opts = FusedOptions(weights=(1.0, 2.0, 3.0), normalize=True)
    got = cpu.fused_merge(None, models, opts, "w", torch.float32)
    want = (models[0] + 2 * models[1] + 3 * models[2]) / 6
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("density", [0.0, 1e-4, 0.1, 0.5, 0.999, 1.0])
@pytest.mark.parametrize("n", [ODD, 70001])  # selection in a copy / two-pass radix select
def test_magnitude_threshold_is_exact(dtype, density, n):
    base, (x,) = _family(n, 1, dtype)
    delta = x.float() - base.float()
    tau = cpu.magnitude_threshold(base, x, density)
    m = keep_count(density, n)
    if m == 0:
        assert tau == float("inf")
        return
    exact = torch.sort(delta.abs(), descending=True).values[m - 1].item()
    assert tau == exact
    assert n <= cpu.SMALL_SELECT or cpu.fused_thresholds(base, [x, x], (density, 0.3)) == [tau, cpu.magnitude_threshold(base, x, 0.3)]
    assert tau == reference.magnitude_threshold(delta, density)
    kept = int((delta.abs() >= tau).sum())
    assert kept >= m  # ties at the threshold are all kept
    assert int((delta.abs() > tau).sum()) < m


def _keep_mask(out: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    return out != base


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("piece", [None, 1, 255, 4097])
def test_dare_mask_independent_of_pieces_and_threads(threads, piece):
    base, models = _family(ODD * 3, 6, torch.float32)  # 6 models: two Philox groups
    opts = FusedOptions(weights=(1.0,) * 6, densities=(0.5,) * 6, sparsify="random", consensus="none", seed=9)
    want = cpu.fused_merge(base, models, opts, "t", torch.float32, threads=2)
    got = cpu.fused_merge(base, models, opts, "t", torch.float32, threads=threads, piece_elements=piece)
    assert torch.equal(got, want)


def test_dare_masks_match_the_spec_per_model():
    """keep_k(j) = U_k(j) < rho_k with U from Philox lane k%4 of group k//4 (DESIGN section 3)."""
    n, k = 2001, 6
    base = torch.zeros(n)
    models = [torch.full((n,), float(i + 1)) for i in range(k)]
    dens = (0.4,) * k
    for i in range(k):
        weights = tuple(1.0 if j == i else 0.0 for j in range(k))
        opts = FusedOptions(weights=weights, densities=dens, sparsify="random", consensus="none", seed=5)
        out = cpu.fused_merge(base, models, opts, "name", torch.float32)
        u = rng.uniforms(5, "name", i, torch.arange(n))
        assert torch.equal(out != 0, u < 0.4), f"model {i}"


def test_seed_and_name_change_the_mask():
    base, models = _family(5000, 1, torch.float32)
    mk = lambda seed, name: cpu.fused_merge(  # noqa: E731
        base, models, FusedOptions(weights=(1.0,), densities=(0.5,), sparsify="random", seed=seed), name, torch.float32
    ) != base
    a = mk(0, "a")
    assert torch.equal(a, mk(0, "a"))
    assert not torch.equal(a, mk(1, "a"))
    assert not torch.equal(a, mk(0, "b"))
    assert abs(a.float().mean().item() - 0.5) < 0.03


def test_group_seed_is_blake2b():
    import hashlib

    want = int.from_bytes(hashlib.blake2b(b"3:model.embed_tokens.weight:1", digest_size=8).digest(), "little")
    assert rng.group_seed(3, "model.embed_tokens.weight", 1) == want & (2**63 - 1)
    assert rng.chunk_name("w", 0, 10) == "w"
    assert rng.chunk_name("w", 2, 2**31) == "w#2"


@pytest.mark.interpreter
def test_philox_matches_triton_randint4x():
    """The torch Philox (used by the reference and mirrored in C) == tl.randint4x under the interpreter."""
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def lanes_kernel(out_ptr, seed, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        r0, r1, r2, r3 = tl.randint4x(seed, offs)
        tl.store(out_ptr + offs, tl.random.uint_to_uniform_float(r0), mask=mask)
        tl.store(out_ptr + n + offs, tl.random.uint_to_uniform_float(r1), mask=mask)
        tl.store(out_ptr + 2 * n + offs, tl.random.uint_to_uniform_float(r2), mask=mask)
        tl.store(out_ptr + 3 * n + offs, tl.random.uint_to_uniform_float(r3), mask=mask)

    n = 1000
    seed = rng.group_seed(7, "model.layers.0.mlp.up_proj.weight", 1)
    out = torch.empty(4 * n)
    lanes_kernel[(triton.cdiv(n, 128),)](out, seed, n, BLOCK=128)
    idx = torch.arange(n)
    for lane in range(4):
        want = rng.uint_to_uniform(rng.philox4x32(idx, seed)[lane])
        assert torch.equal(out[lane * n:(lane + 1) * n], want), f"lane {lane}"
    # and the C path draws the same uniforms (mask of model 4 + lane, group 1)
    base = torch.zeros(n)
    for lane in range(4):
        k = 4 + lane
        models = [torch.ones(n)] * (k + 1)
        weights = tuple(1.0 if j == k else 0.0 for j in range(k + 1))
        opts = FusedOptions(weights=weights, densities=(0.3,) * (k + 1), sparsify="random", seed=7)
        got = cpu.fused_merge(base, models, opts, "model.layers.0.mlp.up_proj.weight", torch.float32)
        assert torch.equal(got != 0, out[lane * n:(lane + 1) * n] < 0.3)


def test_count_nonfinite():
    t = torch.randn(1001)
    t[[3, 500, 1000]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        assert cpu.count_nonfinite(t.to(dt)) == 3
    assert cpu.count_nonfinite(torch.arange(5)) == 0


def test_slerp_endpoints_and_midpoint():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, generator=g), torch.randn(300, generator=g)
    torch.testing.assert_close(reference.slerp(0.0, a, b, torch.float32), a)
    torch.testing.assert_close(reference.slerp(1.0, a, b, torch.float32), b, rtol=1e-5, atol=1e-5)
    mid = reference.slerp(0.5, a, b, torch.float32)
    na, nb = a / a.norm(), b / b.norm()
    theta = torch.acos((na * nb).sum())
    want = (torch.sin(theta / 2) / torch.sin(theta)) * (a + b)
    torch.testing.assert_close(mid, want, rtol=1e-5, atol=1e-5)
    # nearly parallel: linear interpolation
    torch.testing.assert_close(reference.slerp(0.25, a, 2 * a, torch.float32), 1.25 * a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loop_counts_nonfinite_inputs(dtype):
    base, models = _family(ODD, 3, torch.float32)
    base[7] = float("nan")
    models[1][[0, 100, ODD - 1]] = float("inf")
    models[2][5] = -float("inf")
    counts: list[int] = []
    opts = _opts(3, ("random", "sum", "l1", False))
    cpu.fused_merge(base.to(dtype), [m.to(dtype) for m in models], opts, "w", dtype, nonfinite=counts)
    assert counts == [1, 0, 3, 1]


@pytest.mark.parametrize("density", [0.05, 0.3, 0.55, 0.8])
def test_radix_select_bin_with_exact_and_inexact_keys(density):
    """The second radix level counts keys whose low 16 bits are zero apart from the others (bf16
    deltas mostly are): a bin holding both, with the threshold inside it, must still select exactly."""
    n = 3 * cpu.SMALL_SELECT + 17
    g = torch.Generator().manual_seed(3)
    # |delta| values in the bin of 1.0 (top 16 bits 0x3F80): exactly 1.0 (low bits 0) and 1.0 + j * 2**-20
    vals = torch.where(torch.rand(n, generator=g) < 0.5, torch.ones(n),
                       1.0 + torch.randint(1, 100, (n,), generator=g).float() * 2.0**-20)
    vals[: n // 10] = torch.rand(n // 10, generator=g) * 0.5  # other bins, below
    vals[n // 10: n // 5] = 2.0 + torch.rand(n // 5 - n // 10, generator=g)  # and above
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    base = torch.randn(n, generator=g).round()  # integers: x - base is exact in fp32
    x = base + signs * vals
    delta = x - base
    m = keep_count(density, n)
    ordered = torch.sort(delta.abs(), descending=True).values
    exact = ordered[m - 1].item()
    assert cpu.magnitude_threshold(base, x, density) == exact
    # several models at once, where some thresholds end after the first pass (0.55: exactly 1.0) and
    # others need the second (0.3: inside 1.0's bin, low bits nonzero); the second pass reads only those
    both = cpu.fused_thresholds(base, [x, 2 * base - x, x], (0.55, density, 0.3))  # same |delta|
    assert both == [ordered[keep_count(d, n) - 1].item() for d in (0.55, density, 0.3)]
