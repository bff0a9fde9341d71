"""pytest-benchmark suite for the fused CPU path (``fastmerge.cpu.fused_merge``), bf16.

Not collected by the project's ``pytest`` run (its testpaths is ``tests``). Run it with

    python -m pytest bench/test_fused_cpu.py --benchmark-only

Each case merges K bf16 sources onto a bf16 base into a preallocated bf16 output; the reported
bandwidth (``extra_info["gb_per_s"]``) counts (K + 1) inputs read and 1 output written, over the
median time. Methods: dare_ties (random / sum consensus / l1 rescale), ties (magnitude / sum,
normalized) and task_arithmetic (none / none).
"""

from __future__ import annotations

import pytest
import torch

from fastmerge import cpu
from fastmerge.spec import FusedOptions

KS = (2, 3, 4, 8)
SIZES = {"1M": 1 << 20, "16M": 1 << 24}
METHODS = {
    "dare_ties": dict(sparsify="random", consensus="sum", rescale="l1", normalize=False),
    "ties": dict(sparsify="magnitude", consensus="sum", rescale="none", normalize=True),
    "task_arithmetic": dict(sparsify="none", consensus="none", rescale="none", normalize=False),
}
_DATA: dict[tuple[int, int], tuple[torch.Tensor, list[torch.Tensor]]] = {}


def _data(k: int, n: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A bf16 base and K fine-tunes (base + small noise), made once per (K, n)."""
    key = (k, n)
    if key not in _DATA:
        _DATA.clear()  # keep one set in memory at a time (16M x 9 bf16 is ~300 MB)
        g = torch.Generator().manual_seed(1234 + k)
        base = torch.randn(n, generator=g) * 0.02
        models = [(base + torch.randn(n, generator=g) * 0.002).to(torch.bfloat16) for _ in range(k)]
        _DATA[key] = (base.to(torch.bfloat16), models)
    return _DATA[key]


@pytest.fixture(scope="module", autouse=True)
def _built() -> None:
    cpu.library()  # the one-off C build is not part of any measurement


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("k", KS)
def test_fused_merge(benchmark, method: str, size: str, k: int) -> None:
    n = SIZES[size]
    base, models = _data(k, n)
    opts = FusedOptions(
        weights=tuple(0.3 + 0.1 * i for i in range(k)),
        densities=tuple(0.5 + 0.05 * i for i in range(k)),
        seed=0,
        **METHODS[method],
    )
    out = torch.empty(n, dtype=torch.bfloat16)
    name = "model.layers.0.mlp.up_proj.weight"

    benchmark.group = f"{size} K={k}"
    benchmark(cpu.fused_merge, base, models, opts, name, torch.bfloat16, out=out)

    moved = (k + 2) * n * 2  # (K + 1) bf16 inputs read + 1 bf16 output written
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        {
            "method": method,
            "k": k,
            "elements": n,
            "bytes": moved,
            "threads": cpu.default_threads(),
            "isa": cpu.isa(),  # the C loop's vector path: avx512 / avx2 / generic
            "gb_per_s": round(moved / median / 1e9, 3),
            "ns_per_element": round(median / n * 1e9, 3),
        }
    )
    assert torch.isfinite(out.float()).all()
