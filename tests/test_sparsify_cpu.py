"""The sparsifying torch-route methods (della, della_linear, breadcrumbs, breadcrumbs_ties, sce) write
the same bits as before their C pre-passes (``fastmerge.sparsify_cpu``): every case is compared,
as raw fp32 bits, with the frozen pre-change functions of ``tests/methods_math_before.py``, with the
C loop and without it (``FASTMERGE_NO_C=1``: the torch fallback, whose Philox is now the numpy
twin's), on odd shapes, bf16 / fp16 / fp32, 1 to 5 models (5: the combine stays torch's), several
seeds, tied and exactly-zero deltas, a negative weight, NaN/Inf inputs (NaN compared as NaN, of any
sign or payload) and shrunken Philox chunks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastmerge import cpu, methods_math, rng, sparsify_cpu

from . import methods_math_before as before

SHAPES = [(37, 53), (1, 9), (300,), (5, 1), (64, 257), (3, 5, 4)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
WEIGHTS = [0.5, -0.3, 0.4, 1.0, 0.2]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=["c", "no_c"])
def route(request, monkeypatch):
    if request.param == "no_c":
        monkeypatch.setenv(cpu.NO_C_ENV, "1")
    elif not cpu.available():
        pytest.skip("the C loop is unavailable here")
    return request.param


def family(shape, k: int, dtype, seed: int, tied: bool = False):
    """A base and k fine-tunes; ``tied``: deltas of a few distinct magnitudes (many ties), some zero."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.02
    xs = []
    for _ in range(k):
        delta = torch.randn(shape, generator=g) * 0.003
        if tied:
            delta = torch.round(delta * 1000) / 1000
        xs.append((base + delta).to(dtype))
    base = base.to(dtype)
    if tied:  # an exactly unchanged element and a -0 in the base
        base.view(-1)[0] = -0.0
        for x in xs:
            x.view(-1)[0] = base.view(-1)[0]
    return base, xs


def cases(method: str, k: int):
    w, d = WEIGHTS[:k], [0.5, 0.6, 0.3, 1.0, 0.0][:k]
    if method.startswith("della"):
        dd = [0.5, 0.6, 0.3, 1.0, 0.2][:k]
        yield dict(weight=w, density=dd, epsilon=0.1, rescale=True)
        yield dict(weight=w, density=dd, epsilon=0.1, rescale=False, normalize=True, lambda_=0.7)
        yield dict(weight=w, density=0.3, epsilon=[0.05 * (i + 1) for i in range(k)])
        yield dict(weight=w, density=[0.0] + [0.7] * (k - 1), epsilon=0.2)
    elif method.startswith("breadcrumbs"):
        yield dict(weight=w, density=d, gamma=0.05)
        yield dict(weight=w, density=d, gamma=0.05, rescale=True, normalize=True, lambda_=1.3)
        yield dict(weight=w, density=0.4, gamma=0.0)
        yield dict(weight=w, density=0.9, gamma=0.3)
    else:
        for topk in (1.0, 0.5, 0.1, 0.0):
            yield dict(select_topk=topk)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """fp32 bits, every NaN as one: a NaN's sign and payload follow which operand the CPU's add or
    multiply returns of two NaNs, which the compiler may swap (torch's own vector and scalar
    loops differ there too); NaN stays NaN at the same elements."""
    return torch.where(torch.isnan(t), torch.full_like(t, float("nan")), t).view(torch.int32)


def assert_same_bits(method: str, base, xs, kw: dict, what: str) -> None:
    kw = dict(kw, name="model.layers.0.mlp.up_proj.weight", seed=kw.get("seed", 0))
    want = before.METHODS[method](base, xs, **kw)
    got = methods_math.METHODS[method](base, xs, **kw)
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape, what
    diff = int((_bits(got) != _bits(want)).sum())
    assert diff == 0, f"{what}: {diff} of {want.numel()} elements differ"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", ["della", "della_linear", "breadcrumbs", "breadcrumbs_ties", "sce"])
def test_same_bits_as_before(method, dtype, route):
    for shape in SHAPES:
        for k in (1, 3, 4, 5):
            for seed in (0, 7):
                tied = seed == 7
                base, xs = family(shape, k, dtype, seed, tied=tied)
                for kw in cases(method, k):
                    what = f"{method} {route} {shape} {dtype} k={k} seed={seed} {kw}"
                    assert_same_bits(method, base, xs, dict(kw, seed=seed), what)


@pytest.mark.parametrize("method", ["della", "della_linear", "breadcrumbs", "breadcrumbs_ties", "sce"])
def test_same_bits_with_nonfinite_inputs(method, route):
    base, xs = family((16, 33), 3, torch.float32, 3)
    xs[0].view(-1)[5] = float("nan")
    xs[1].view(-1)[7] = float("inf")
    xs[2].view(-1)[9] = float("-inf")
    xs[2].view(-1)[40] = float("nan")
    for kw in cases(method, 3):
        assert_same_bits(method, base, xs, kw, f"{method} {route} nonfinite {kw}")


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_same_bits_across_philox_chunks(method, route, monkeypatch):
    """Tensors of 2**31+ elements draw per chunk under the name ``name#c``: shrink the chunk."""
    monkeypatch.setattr(rng, "CHUNK_ELEMENTS", 1000)
    for shape in [(37, 53), (2900,), (5, 999)]:
        base, xs = family(shape, 3, torch.bfloat16, 1)
        for kw in cases(method, 3):
            assert_same_bits(method, base, xs, kw, f"{method} {route} chunked {shape} {kw}")


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, 5, 9])
def test_uniforms_same_bits_as_rng(k, route):
    for numel in (1, 17, 255, 256, 257, 4099):
        got = methods_math.uniforms(11, "t.w", k, numel)
        want = methods_math.uniforms_reference(11, "t.w", k, numel)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (k, numel)


def test_uniforms_offset_and_lane():
    """``sparsify_cpu.uniforms_into`` at an offset j0 is the tail of the draw from 0."""
    if not cpu.available():
        pytest.skip("the C loop is unavailable here")
    whole = methods_math.uniforms_reference(5, "x", 6, 1000).numpy()
    part = np.empty(700, dtype=np.float32)
    assert sparsify_cpu.uniforms_into(part, 5, "x", 6, 300)
    assert np.array_equal(part.view(np.int32), whole[300:].view(np.int32))


def test_top_mask_is_stable_descending_argsort():
    if not cpu.available():
        pytest.skip("the C loop is unavailable here")
    g = torch.Generator().manual_seed(0)
    v = torch.round(torch.randn(5000, generator=g) * 4) / 4  # many ties
    v[3] = float("nan")
    v[10] = float("inf")
    v[11] = -0.0
    for m in (0, 1, 2, 17, 2500, 4999, 5000):
        want = torch.zeros(v.numel(), dtype=torch.bool)
        want[torch.argsort(v.abs(), descending=True, stable=True)[:m]] = True
        assert torch.equal(sparsify_cpu.top_mask(v, m), want), m


@pytest.mark.parametrize("threads", [1, 2])
def test_var_models_is_torch_var(threads):
    """sce's variance over models: torch.var(dim=0, unbiased=False), bit for bit (NaN as NaN)."""
    if not cpu.available():
        pytest.skip("the C loop is unavailable here")
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(2)
    for k in (1, 2, 3, 4, 5, 7):
        for shape in [(1000,), (33, 17), (3, 5, 4)]:
            tv = torch.randn((k, *shape), generator=g) * torch.logspace(-4, 2, k).reshape(-1, *[1] * len(shape))
            tv.view(-1)[3] = float("inf")
            tv.view(-1)[-2] = float("nan")
            tv.view(-1)[5] = 0.0
            want = torch.var(tv, dim=0, unbiased=False)
            got = sparsify_cpu.var_models(tv, threads)
            assert torch.equal(_bits(got), _bits(want)), (k, shape)


def test_same_bits_where_the_c_path_steps_aside(monkeypatch):
    """More than 8 models (keep bits are one byte) and della rows longer than MAX_ROW take the torch
    functions: the same bits."""
    base, xs = family((7, 11), 9, torch.bfloat16, 4)
    w = [0.1 * (i + 1) for i in range(9)]
    assert_same_bits("della", base, xs, dict(weight=w, density=0.5, epsilon=0.1), "della k=9")
    assert_same_bits("breadcrumbs_ties", base, xs, dict(weight=w, density=0.5, gamma=0.1), "breadcrumbs k=9")
    monkeypatch.setattr(sparsify_cpu, "MAX_ROW", 50)
    base, xs = family((300,), 3, torch.float32, 5)
    assert_same_bits("della", base, xs, dict(weight=[1, 2, 3], density=0.5, epsilon=0.1), "della long row")
