"""The grouped fused kernel (``fastmerge.kernels.fused_ta_grouped``, one launch for many tensors) ==
the per-tensor kernel bit for bit, and == the fused CPU path in fp32. Runs under TRITON_INTERPRET=1
without a GPU (set in conftest), on the GPU otherwise; sizes are small because the interpreter is
slow."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastmerge import cpu, rng
from fastmerge.errors import FastmergeError
from fastmerge.spec import FusedOptions

from .conftest import tensor_family

pytest.importorskip("triton")
from fastmerge.kernels import fused_ta, fused_ta_grouped  # noqa: E402
from fastmerge.kernels.fused_ta_details import _fused_ta  # noqa: E402

pytestmark = pytest.mark.interpreter

SHAPES = [(1,), (7,), (1000,), (4099,), (37, 111)]
WEIGHTS = (0.7, -0.3, 1.2, 0.4, 0.9, 0.25, 0.6, 1.5)
DENSITIES = (0.3, 0.55, 0.9, 0.05, 1.0, 0.7, 0.2, 0.45)
METHODS = {  # (sparsify, consensus, rescale, normalize)
    "dare_ties": ("random", "sum", "l1", False),
    "ties": ("magnitude", "sum", "none", True),
    "task_arithmetic": ("none", "none", "none", False),
}


def _opts(k: int, method, i: int) -> FusedOptions:
    """Per-tensor values differ from tensor to tensor (rotated weights, densities, seed, lambda)."""
    sp, cs, rs, norm = METHODS[method] if isinstance(method, str) else method
    w = WEIGHTS[i % 8:] + WEIGHTS[:i % 8]
    d = DENSITIES[i % 8:] + DENSITIES[:i % 8]
    return FusedOptions(weights=w[:k], densities=d[:k], sparsify=sp, consensus=cs, rescale=rs, normalize=norm,
                        lambda_=(1.0, 1.3, 0.6)[i % 3], seed=i % 2)


def _tensors(shape, k: int, dtype: torch.dtype, seed: int, device: str, base: bool = True):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(shape, generator=g)
    models = [(b + 0.05 * torch.randn(shape, generator=g)).to(dtype).to(device) for _ in range(k)]
    return (b.to(dtype).to(device) if base else None), models


def _items(k: int, method, dtypes, device: str, shapes=SHAPES):
    items = []
    for dtype in dtypes:
        for i, shape in enumerate(shapes):
            base, models = _tensors(shape, k, dtype, seed=100 * k + i, device=device)
            items.append((base, models, _opts(k, method, i), f"model.layers.{i}.{dtype}.weight", dtype))
    return items


def _per_tensor(items, **kw):
    return [fused_ta.fused_merge(b, ms, o, n, d if isinstance(d, torch.dtype) else d.dtype, **kw)
            for b, ms, o, n, d in items]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.float32:
        return torch.equal(a.view(torch.int32), b.view(torch.int32))
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("method", list(METHODS))
def test_grouped_equals_per_tensor(method, k, device, monkeypatch):
    """Odd sizes, bf16 and fp32 in one call (two groups); bit-identical to one launch per tensor,
    and to the fused CPU path in fp32. One launch per group."""
    items = _items(k, method, (torch.bfloat16, torch.float32), device)
    launches = []
    kernel = fused_ta_grouped._fused_ta_grouped_kernel
    monkeypatch.setattr(fused_ta_grouped, "_fused_ta_grouped_kernel",
                        type("Spy", (), {"__getitem__": lambda self, grid: launches.append(grid) or kernel[grid]})())
    got = fused_ta_grouped.grouped_fused_merge(items)
    assert len(launches) == 2
    want = _per_tensor(items)
    for (b, ms, o, n, d), g, w in zip(items, got, want):
        assert g.shape == ms[0].shape and g.device.type == device
        assert _same(g, w), n
        if d == torch.float32 and device == "cpu":
            assert _same(g, cpu.fused_merge(b, ms, o, n, d)), n


def test_mixed_items_group_themselves(device):
    """Different options, K, bases, out tensors, mixed model dtypes and empty tensors in one call:
    each lands in its own group (or the per-tensor kernel) and equals the per-tensor launch."""
    items = []
    for i, (method, k, dtype) in enumerate([
        ("dare_ties", 6, torch.bfloat16), (("random", "count", "inverse", True), 2, torch.float16),
        ("ties", 8, torch.float32), (("magnitude", "none", "l1", False), 4, torch.bfloat16),
        ("dare_ties", 6, torch.bfloat16), ("task_arithmetic", 2, torch.float32),
    ]):
        base, models = _tensors((257 * (i + 1),), k, dtype, seed=i, device=device, base=i != 5)
        items.append((base, models, _opts(k, method, i), f"t{i}", dtype))
    base, models = _tensors((300,), 3, torch.float32, seed=9, device=device)
    models[1] = models[1].to(torch.bfloat16)  # mixed model dtypes: the per-tensor kernel
    items.append((base, models, _opts(3, "dare_ties", 3), "mixed", torch.float32))
    out = torch.empty((33, 3), dtype=torch.float16, device=device)
    base, models = _tensors((33, 3), 2, torch.float32, seed=10, device=device)
    items.append((base, models, _opts(2, "ties", 4), "into_out", out))
    base, models = _tensors((0,), 2, torch.float32, seed=11, device=device)
    items.append((base, models, _opts(2, "dare_ties", 5), "empty", torch.float32))
    got = fused_ta_grouped.grouped_fused_merge(items, block=128)
    assert got[-2] is out and got[-1].shape == (0,)
    for g, w in zip(got, _per_tensor(items)):
        assert _same(g, w)


def test_chunks_restart_the_stream(monkeypatch, device):
    """2**31-element chunks (shrunk to 1000 here) are separate work-table entries with their own
    seeds and local indices, as in the per-tensor launcher."""
    monkeypatch.setattr(rng, "CHUNK_ELEMENTS", 1000)
    items = _items(5, "dare_ties", (torch.float32,), device, shapes=[(4099,), (7,), (2000,)])
    items += _items(3, "ties", (torch.float32,), device, shapes=[(2500,)])
    for g, w in zip(fused_ta_grouped.grouped_fused_merge(items), _per_tensor(items)):
        assert _same(g, w)


def test_block_size_does_not_change_the_result(device):
    items = _items(5, "dare_ties", (torch.bfloat16,), device, shapes=[(1,), (4099,), (37, 11)])
    a = fused_ta_grouped.grouped_fused_merge(items, block=512)
    b = fused_ta_grouped.grouped_fused_merge(items, block=2048)
    assert all(_same(x, y) for x, y in zip(a, b))


def test_rejects_what_it_cannot_merge(device):
    base, models = _tensors((10,), 9, torch.float32, seed=0, device=device)
    good = (base, models[:2], FusedOptions(weights=(1.0, 1.0)), "good", torch.float32)
    with pytest.raises(FastmergeError, match="1..8 models"):
        fused_ta_grouped.grouped_fused_merge([good, (base, models, FusedOptions(weights=(1.0,) * 9), "nine",
                                                     torch.float32)])
    with pytest.raises(FastmergeError, match="not supported"):
        fused_ta_grouped.grouped_fused_merge([(base, models[:2], FusedOptions(weights=(1.0, 1.0)), "f64",
                                               torch.float64)])
    with pytest.raises(FastmergeError, match="same number of elements"):
        fused_ta_grouped.grouped_fused_merge([(base, [models[0], models[1][:5]], FusedOptions(weights=(1.0, 1.0)),
                                               "short", torch.float32)])
    with pytest.raises(FastmergeError, match="contiguous"):
        out = torch.empty((10, 2), device=device).t()[0]
        fused_ta_grouped.grouped_fused_merge([(base, models[:2], FusedOptions(weights=(1.0, 1.0)), "strided", out)])
    with pytest.raises(FastmergeError, match="tensor or a torch.dtype"):
        fused_ta_grouped.grouped_fused_merge([(base, models[:2], FusedOptions(weights=(1.0, 1.0)), "bad", "fp32")])
    assert fused_ta_grouped.grouped_fused_merge([]) == []


_COMPILE = textwrap.dedent("""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastmerge.kernels.fused_ta_details._fused_ta import _fused_ta_grouped_kernel
    for k, sp, cs, bf16 in [(3, 2, 1, True), (6, 1, 0, False)]:
        const = dict(K=k, HAS_BASE=True, SPARSIFY=sp, CONSENSUS=cs, NORMALIZE=True, APPLY_LAMBDA=True,
                     OUT_BF16_BITS=bf16, OUT_ALIGN=8 if bf16 else 4, BASE_ALIGN=8, X_ALIGN=8, BLOCK=1024)
        sig = {"block_entry_ptr": "*i32", "starts_ptr": "*i64", "numel_ptr": "*i64", "ptrs_ptr": "*i64",
               "prm_ptr": "*fp32", "seeds_ptr": "*i64", "out_anchor": "*i16" if bf16 else "*fp32",
               "base_anchor": "*bf16", "x_anchor": "*fp16"}
        sig.update({c: "constexpr" for c in const})
        ptx = triton.compile(ASTSource(_fused_ta_grouped_kernel, sig, const), target=GPUTarget("cuda", 90, 32),
                             options=dict(enable_fp_fusion=False, num_warps=4)).asm["ptx"]
        assert "fma.rn.f32" not in ptx, "FMA contraction would break agreement with the reference"
        assert "div.rn.f32" in ptx, "normalize must be an IEEE division"
    print("ok")
""")


def test_compiles_for_a_gpu_without_fma_contraction():
    """The real compiler accepts the int64 -> pointer casts of the work table for sm_90."""
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("triton has no nvidia backend here")
    # the grouped kernel's row stride of prm is a literal: it must be PRM_SIZE
    assert f"prm = prm_ptr + t * {_fused_ta.PRM_SIZE}\n" in Path(_fused_ta.__file__).read_text()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation is a GPU matter")
@pytest.mark.parametrize("sparsify, rescale", [("magnitude", "none"), ("random", "l1"), ("magnitude", "l1")])
def test_no_host_synchronisation_in_a_launch(sparsify, rescale):
    """The TIES cuts, the l1 sums and the launch tables stay on the device: a merge never waits
    for the GPU (torch raises on any synchronising call in this mode)."""
    base, models = tensor_family(70001, 3, torch.bfloat16, seed=5)
    base, models = base.cuda(), [m.cuda() for m in models]
    opts = FusedOptions(weights=(0.5, 0.3, 0.8), densities=(0.3, 0.5, 0.7), sparsify=sparsify, consensus="sum",
                        rescale=rescale, seed=3)
    want = fused_ta.fused_merge(base, models, opts, "w", torch.bfloat16)  # compiles, warms the allocators
    fused_ta_grouped.grouped_fused_merge([(base, models, opts, "w", torch.bfloat16)])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = fused_ta.fused_merge(base, models, opts, "w", torch.bfloat16)
        (grouped,) = fused_ta_grouped.grouped_fused_merge([(base, models, opts, "w", torch.bfloat16)])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got, want) and torch.equal(grouped, want)
