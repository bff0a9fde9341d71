"""TIES magnitude trimming keeps exactly m = int(rho * n) elements, ties at the threshold broken by
the lowest flat index (DESIGN.md s.3), on every path: the pure-torch reference (a stable sort), the
fused C loop, its numpy twin, and the Triton kernels (per tensor and grouped, under the
interpreter on CPU tensors), whatever the piece size. The data are made to tie: deltas that are a
few multiples of one step, as bf16 fine-tunes a few ulps from their base are."""

from __future__ import annotations

import pytest
import torch

from fastmerge import cpu, reference
from fastmerge.spec import FusedOptions, keep_count

from .test_cpu_fallback import c_and_numpy

DENSITIES = (1e-3, 0.3, 0.5, 0.77)
#: small (selection among all keys), radix select with the threshold's low 16 bits zero (one pass),
#: and with them nonzero (two passes)
SIZES = (4099, 3 * cpu.SMALL_SELECT + 17)


def _tied(n: int, k: int, dtype: torch.dtype, seed: int, step: float = 0.25) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base of integers and k models whose deltas are +-{1, 2, 3, 4} * step (exact in every
    dtype), plus a few distinct larger deltas: a handful of distinct |delta| values, each tied
    thousands of times. step = 0.25 has zero low 16 bits in fp32; 0.3 does not."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-8, 8, (n,), generator=g).float()
    xs = []
    for _ in range(k):
        mult = torch.randint(1, 5, (n,), generator=g).float() * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        d = mult * step
        d[torch.randint(0, n, (n // 50,), generator=g)] = 3.0 + torch.rand(n // 50, generator=g)
        xs.append((base + d).to(dtype))
    return base.to(dtype), xs


def _mask(base: torch.Tensor, x: torch.Tensor, cut: cpu.Cut) -> torch.Tensor:
    a = (x.float() - base.float()).abs()
    return (a > cut.tau) | ((a == cut.tau) & (torch.arange(a.numel()) < cut.end))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("step", [0.25, 0.3])
@pytest.mark.parametrize("n", SIZES)
def test_cuts_keep_exactly_m_lowest_index_first(monkeypatch, dtype, step, n):
    base, xs = _tied(n, 3, dtype, seed=n, step=step)
    dens = (0.3, 0.5, 0.77)
    want, got_np = c_and_numpy(monkeypatch, lambda: cpu.fused_cuts(base, xs, dens, threads=2))
    assert got_np == want
    split = 0
    for x, rho, cut in zip(xs, dens, want):
        m = keep_count(rho, n)
        mask = _mask(base, x, cut)
        assert int(mask.sum()) == m
        assert torch.equal(mask, reference.magnitude_keep(x.float() - base.float(), rho))
        split += cut.end < n
    assert split  # the data do split ties at tau, so the tie break is exercised


def test_all_ties_kept_needs_no_end():
    """Distinct |delta| values (fp32 noise): the cut keeps every element at tau (end = n)."""
    g = torch.Generator().manual_seed(0)
    base, x = torch.randn(70001, generator=g), torch.randn(70001, generator=g)
    (cut,) = cpu.fused_cuts(base, [x], (0.3,))
    assert cut.end == 70001 and int(_mask(base, x, cut).sum()) == keep_count(0.3, 70001)


def test_zero_density_and_zero_deltas():
    base, xs = _tied(5000, 1, torch.float32, seed=1)
    assert cpu.fused_cuts(base, xs, (0.0,)) == [cpu.Cut(float("inf"), 0)]
    # all deltas zero: tau = 0 and the lowest m indices are kept
    (cut,) = cpu.fused_cuts(base, [base.clone()], (0.3,))
    assert cut == cpu.Cut(0.0, keep_count(0.3, 5000))


def _ties_opts(k: int, rescale: str = "none", consensus: str = "sum") -> FusedOptions:
    return FusedOptions(weights=tuple([0.7, -0.3, 1.2, 0.4][:k]), densities=tuple([0.3, 0.55, 0.9, 0.05][:k]),
                        sparsify="magnitude", consensus=consensus, rescale=rescale, normalize=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("opts", [_ties_opts(3), _ties_opts(4, "l1", "count")], ids=["ties", "l1-count"])
@pytest.mark.parametrize("n", SIZES)
def test_fused_merge_equals_reference_on_ties(monkeypatch, dtype, opts, n):
    base, xs = _tied(n, opts.k, dtype, seed=7, step=0.3)
    name = "model.layers.0.mlp.up_proj.weight"
    want = reference.fused_merge(base, xs, opts, name, dtype)
    c, np_ = c_and_numpy(monkeypatch, lambda: cpu.fused_merge(base, xs, opts, name, dtype, threads=2))
    assert torch.equal(c, want)
    assert torch.equal(np_, want)
    # the cut does not depend on how the merge pass is split into pieces
    assert torch.equal(cpu.fused_merge(base, xs, opts, name, dtype, piece_elements=1000), want)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_paths_equal_reference_on_ties(dtype, device):
    pytest.importorskip("triton")
    from fastmerge.kernels import fused_ta
    from fastmerge.kernels.fused_ta_details import _select
    from fastmerge.kernels.fused_ta_grouped import grouped_fused_merge

    n = 3 * cpu.SMALL_SELECT + 17
    base, xs = _tied(n, 3, dtype, seed=11, step=0.3)
    opts = _ties_opts(3)
    want = reference.fused_merge(base, xs, opts, "t0", dtype)
    on = [x.to(device) for x in xs]
    assert _select.device_cuts(base.to(device), on, opts.densities) == cpu.fused_cuts(base, xs, opts.densities)
    got = fused_ta.fused_merge(base.to(device), on, opts, "t0", dtype, block=512)
    assert torch.equal(got.cpu(), want)
    other = _tied(4099, 3, dtype, seed=12, step=0.25)
    outs = grouped_fused_merge([(base.to(device), on, opts, "t0", dtype),
                                (other[0].to(device), [x.to(device) for x in other[1]], opts, "t1", dtype)], block=512)
    assert torch.equal(outs[0].cpu(), want)
    assert torch.equal(outs[1].cpu(), reference.fused_merge(other[0], other[1], opts, "t1", dtype))


def test_chunk_prm_moves_the_tie_index():
    """A tensor of 2**31 or more elements is launched per chunk: the last kept tie's index is local
    to each chunk (-1: none in it; 2**31 - 1: all)."""
    pytest.importorskip("triton")
    from fastmerge.kernels import fused_ta
    from fastmerge.kernels.fused_ta_details._fused_ta import PRM_SIZE, PRM_TIE_LAST

    prm = torch.zeros(PRM_SIZE)
    ends = torch.tensor([5, 2**31 + 7, 3 * 2**31])
    assert fused_ta.chunk_prm(prm, ends, 0) is prm
    last = fused_ta.chunk_prm(prm, ends, 2**31)[PRM_TIE_LAST:PRM_TIE_LAST + 3].view(torch.int32).tolist()
    assert last == [-1, 6, 2**31 - 1]


@pytest.mark.parametrize("density", [0.3, 0.77])  # the ties' end searched from the start / from the end
def test_all_deltas_tied_keeps_the_first_m(monkeypatch, density):
    n = 3 * cpu.SMALL_SELECT + 17
    g = torch.Generator().manual_seed(2)
    base = torch.randint(-8, 8, (n,), generator=g).float()
    x = base + torch.where(torch.rand(n, generator=g) < 0.5, -0.25, 0.25)
    want, got_np = c_and_numpy(monkeypatch, lambda: cpu.fused_cuts(base, [x, x], (density, 0.5), threads=2))
    assert want == got_np == [cpu.Cut(0.25, keep_count(density, n)), cpu.Cut(0.25, keep_count(0.5, n))]
