"""The Triton TIES-threshold select (``fused_ta_details/_select.py``) == the fused CPU path's radix
select (bit-equal floats) == the m-th largest of a full sort. Runs under TRITON_INTERPRET=1 on CPU
tensors without a GPU (set in conftest), on the GPU otherwise."""

from __future__ import annotations

import math

import pytest
import torch

from fastmerge import cpu
from fastmerge.spec import keep_count

pytest.importorskip("triton")
from fastmerge.kernels import fused_ta  # noqa: E402
from fastmerge.kernels.fused_ta_details import _select  # noqa: E402

pytestmark = pytest.mark.interpreter

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DENSITIES = (0.0, 1e-4, 0.3, 0.5, 0.999, 1.0)
SIZES = (1, 1000, 4099, 70001)


def _truth(base, x, rho) -> float:
    """m-th largest |x - base| by a full sort (inf where m = 0)."""
    a = x.reshape(-1).float()
    if base is not None:
        a = a - base.reshape(-1).float()
    n = a.numel()
    m = keep_count(rho, n)
    if m == 0:
        return math.inf
    return float(torch.sort(a.abs(), descending=True).values[m - 1])


def _check(base, xs, dens, **kw) -> list[float]:
    """The device cuts equal the CPU path's (tau and the end of the ties kept), and tau the sort's."""
    cuts = _select.device_cuts(base, xs, dens, **kw)
    cpu_b = base.cpu() if base is not None else None
    ref = cpu.fused_cuts(cpu_b, [x.cpu() for x in xs], dens)
    assert cuts == ref, (cuts, ref)
    got = [c.tau for c in cuts]
    truth = [_truth(cpu_b, x.cpu(), r) for x, r in zip(xs, dens)]
    assert got == truth, (got, truth)
    return got


def _family(n: int, k: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    # deltas over many binades (different top-16-bit bins), rounded to the dtype: ties in bf16/fp16
    scale = 10.0 ** torch.randint(-6, 1, (k, n), generator=g).float()
    xs = [(base + scale[i] * torch.randn(n, generator=g)).to(dtype).to(device) for i in range(k)]
    return base.to(dtype).to(device), xs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("k", (1, 3, 5))
def test_thresholds_match_cpu_and_sort(dtype, n, k, device):
    base, xs = _family(n, k, dtype, device, seed=n + k)
    # every density reaches every position at least once, in ceil(6 / k) calls
    for c in range(-(-len(DENSITIES) // k)):
        dens = tuple(DENSITIES[(c * k + i) % len(DENSITIES)] for i in range(k))
        _check(base, xs, dens)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_many_duplicates_and_zeros(dtype, device):
    """Deltas with heavy ties: 70% exact zeros (x == base, including -0.0 deltas), the rest on a
    coarse grid; the m-th largest lands in a tie, and inside the zeros at high densities."""
    n = 70001
    g = torch.Generator().manual_seed(1)
    base = torch.randn(n, generator=g).to(dtype)
    xs = []
    for i in range(3):
        step = torch.randint(-4, 5, (n,), generator=g).float() * 2.0 ** (-3 - i)
        x = (base.float() + step).to(dtype)
        x = torch.where(torch.rand(n, generator=g) < 0.7, base, x)
        xs.append(x.to(device))
    neg0 = torch.zeros(n, dtype=dtype)
    neg0[::2] = -0.0
    xs.append((-neg0).to(device))  # |(-0.0) - 0.0| = 0
    for dens in ((0.3, 0.5, 0.999, 0.5), (1e-4, 0.2, 1.0, 1.0), (0.05, 0.29, 0.31, 0.0)):
        got = _check(neg0.to(device), xs, dens)
        assert got[3] in (0.0, math.inf)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_base(dtype, device):
    """base None: delta = x."""
    _, xs = _family(4099, 3, dtype, device, seed=7)
    _check(None, xs, (0.3, 0.5, 1e-3))


def test_mixed_dtypes_strides_blocks_and_many_models(device):
    """Base and models of different dtypes, a non-contiguous model, another block size, and more
    models than one launch takes (groups of 8), with some m = 0 among them."""
    n = 4099
    g = torch.Generator().manual_seed(3)
    base = torch.randn(n, generator=g)
    xs = [(base + 0.1 * torch.randn(n, generator=g)).to(DTYPES[i % 3]).to(device) for i in range(10)]
    xs[1] = torch.randn(2 * n, generator=g).to(device)[::2]
    base = base.to(device)
    dens = (0.3, 0.0, 0.5, 1e-4, 1.0, 0.999, 0.0, 0.25, 0.75, 0.1)
    got = _check(base, xs, dens)
    assert _select.device_thresholds(base, xs, dens, block=128) == got
    assert _select.device_thresholds(base, xs, dens, block=4096) == got
    assert got[1] == got[6] == math.inf


def test_shapes_and_empty(device):
    x = torch.randn(33, 65, device=device)
    b = torch.randn(33, 65, device=device)
    _check(b, [x], (0.5,))
    e = torch.empty(0, device=device)
    assert _select.device_thresholds(e, [e, e], (0.5, 1.0)) == [math.inf, math.inf]
    with pytest.raises(ValueError):
        _select.device_thresholds(b, [x[:3]], (0.5,))


def test_thresholds_dispatch(monkeypatch):
    """``fused_ta.cut_tensors``: non-CPU tensors take the device select, CPU tensors the CPU path."""
    calls = []

    def spy(base, models, densities):
        calls.append(models[0].device.type)
        return torch.full((len(models),), 1.5), torch.full((len(models),), 10)

    monkeypatch.setattr(fused_ta, "device_cut_tensors", spy)
    meta = torch.empty(10, device="meta")
    assert fused_ta.thresholds(meta, [meta, meta], (0.5, 0.5)) == [1.5, 1.5]
    assert calls == ["meta"]
    x = torch.randn(100)
    assert fused_ta.cuts(None, [x], (0.5,)) == cpu.fused_cuts(None, [x], (0.5,))
    assert calls == ["meta"]
