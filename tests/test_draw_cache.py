"""DARE's draw cache (``cpu.DrawCache``): a search's later merges decide u < rho from each draw's
stored bucket instead of drawing Philox again, and must write exactly the bytes a merge without it
writes.

Tolerance: none (bit for bit). The densities below lie inside a bucket of 1/256 (0.3, 0.55, ...), so
the elements whose draw shares rho's bucket are split between kept and dropped: a loop that decided
them by the byte alone would differ in ~1 of 512 elements per model. 0, 1 and exact bucket edges
(k / 256) are there for the clamps.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from fastmerge import cpu
from fastmerge.merger import Genome, Merger
from fastmerge.spec import FusedOptions

from .test_cpu_fallback import bits, c_loop  # noqa: F401  (fixture)
from .test_merger import recipe, state

N = 100_003  # odd: a tail in the last Philox vector and block
NAME = "model.layers.3.mlp.down_proj.weight"
DENSITIES = [(0.3, 0.55, 0.9, 0.05, 0.71, 0.42, 0.61, 0.18, 0.83), (0.999, 0.0, 1.0, 0.5, 128.5 / 256, 0.25, 1 / 256,
                                                                     0.77, 0.1)]


def tensors(k: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(N, generator=g).to(dtype)
    return base, [(base.float() + 0.05 * torch.randn(N, generator=g)).to(dtype) for _ in range(k)]


def merge(base, models, opts, draws=None, piece=None) -> torch.Tensor:
    return cpu.fused_merge(base, models, opts, NAME, base.dtype, threads=3, piece_elements=piece, draws=draws)


@pytest.mark.parametrize("k", [1, 2, 5, 9])  # 5: two Philox seed groups; 9: no keep bits (K > 8)
@pytest.mark.parametrize("rescale,consensus", [("l1", "sum"), ("inverse", "none"), ("none", "count")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_draws_give_the_same_bytes(c_loop, k, rescale, consensus, dtype):  # noqa: F811
    base, models = tensors(k, dtype)
    cache = cpu.DrawCache()
    for step, dens in enumerate(DENSITIES + DENSITIES[::-1]):  # the first merge fills, the rest read
        opts = FusedOptions(weights=tuple(0.3 + 0.1 * m for m in range(k)), densities=dens[:k], sparsify="random",
                            consensus=consensus, rescale=rescale, seed=11)
        piece = 4099 if step % 2 else None  # pieces start mid-block: the cache is indexed by element
        want = merge(base, models, opts, piece=piece)
        got = merge(base, models, opts, cache, piece=piece)
        assert torch.equal(bits(got), bits(want)), (step, dens[:k])
    assert cache.nbytes == k * N


def test_another_seed_or_model_count_refills_the_cache(c_loop):  # noqa: F811
    base, models = tensors(3, torch.float32)
    cache = cpu.DrawCache()
    for seed, k in [(1, 3), (1, 3), (2, 3), (2, 2), (1, 3)]:
        opts = FusedOptions(weights=(0.5,) * k, densities=(0.37, 0.62, 0.45)[:k], sparsify="random",
                            consensus="sum", rescale="l1", seed=seed)
        assert torch.equal(merge(base, models[:k], opts, cache), merge(base, models[:k], opts)), (seed, k)


def test_the_draws_are_the_ones_philox_draws(c_loop):  # noqa: F811
    """The stored bytes are floor(u * 256) of the uniforms the masks use (fastmerge.rng)."""
    from fastmerge import rng

    base, models = tensors(2, torch.float32)
    cache = cpu.DrawCache()
    opts = FusedOptions(weights=(1.0, 1.0), densities=(0.5, 0.5), sparsify="random", rescale="l1", seed=7)
    merge(base, models, opts, cache)
    stored, ready = cache.slot(NAME, opts, N)
    assert ready
    index = torch.arange(N, dtype=torch.int64)
    for m in range(2):
        u = rng.uniforms(opts.seed, rng.chunk_name(NAME, 0, N), m, index)
        want = torch.clamp(torch.floor(u * 256), max=255).to(torch.uint8)
        assert torch.equal(torch.as_tensor(stored[m]), want), m


def test_merger_with_and_without_the_cache(c_loop, families):  # noqa: F811
    base, ft0, ft1 = families("llama")
    cached, plain = Merger(recipe(base, ft0, ft1)), Merger(recipe(base, ft0, ft1), draw_cache=False)
    assert plain.draws is None
    sparsified = sum(t.numel() for n, t in cached.module.named_parameters() if n.endswith("proj.weight"))
    for g in [Genome(weights=[0.3, 1.2], densities=[0.4, 0.9]), Genome(weights=[1.0, 0.1], densities=[0.63, 0.2]),
              Genome(weights=[0.7, 0.7], densities=[1.0, 0.0])]:
        a, b = state(cached.merge(g)), state(plain.merge(g))
        assert all(torch.equal(a[n], b[n]) for n in a)
    assert cached.draws.nbytes >= 2 * sparsified  # every DARE'd tensor is cached, one byte per model


def test_numpy_path_ignores_the_cache(monkeypatch):
    """Without the C loop the draws are taken every time, and no cache memory is allocated."""
    monkeypatch.setenv(cpu.NO_C_ENV, "1")
    base, models = tensors(2, torch.float32)
    cache = cpu.DrawCache()
    opts = FusedOptions(weights=(1.0, 1.0), densities=(0.3, 0.6), sparsify="random", rescale="l1", seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merge(base, models, opts, cache)
    assert cache.nbytes == 0
