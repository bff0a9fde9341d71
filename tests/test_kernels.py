"""The fused Triton kernel (``fastmerge.kernels.fused_ta``) == the pure-torch reference, with DARE
masks bit-identical to the fused CPU path. Runs under TRITON_INTERPRET=1 on a machine without a GPU
(set in conftest), on the GPU otherwise; sizes are small because the interpreter is slow."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastmerge import cpu, reference, rng
from fastmerge.errors import FastmergeError
from fastmerge.spec import FusedOptions, l1_scale

from .conftest import TOLERANCES
from .conftest import tensor_family as _family

pytest.importorskip("triton")
from fastmerge.kernels import fused_ta  # noqa: E402

pytestmark = pytest.mark.interpreter

NAME = "model.layers.0.mlp.up_proj.weight"
ODD = 4099  # not a multiple of any block size
WEIGHTS = (0.7, -0.3, 1.2, 0.4, 0.9, 0.25, 0.6, 1.5)
DENSITIES = (0.3, 0.55, 0.9, 0.05, 1.0, 0.7, 0.2, 0.45)

ALL_COMBOS = [
    (sp, cs, rs, norm)
    for sp in ("none", "random", "magnitude")
    for cs in ("none", "sum", "count")
    for rs in (("none",) if sp == "none" else ("none", "l1", "inverse"))  # rescale needs sparsify
    for norm in (False, True)
]
METHODS = [  # the methods of the family, for the dtype x K grid
    ("random", "sum", "l1", False),  # dare_ties (mergekit's rescale)
    ("magnitude", "sum", "none", True),  # ties
    ("random", "none", "inverse", False),  # dare_linear (the paper's 1/p)
]


def _opts(k: int, combo, seed: int = 1, lam: float = 1.0) -> FusedOptions:
    sp, cs, rs, norm = combo
    return FusedOptions(weights=WEIGHTS[:k], densities=DENSITIES[:k], sparsify=sp, consensus=cs, rescale=rs,
                        normalize=norm, lambda_=lam, seed=seed)


def _kernel(base, models, opts, dtype, device, name=NAME, **kw):
    on = (lambda t: t.to(device)) if device != "cpu" else (lambda t: t)
    got = fused_ta.fused_merge(on(base) if base is not None else None, [on(m) for m in models], opts, name, dtype, **kw)
    assert got.dtype == dtype and got.device.type == device
    return got.cpu()


def _check(got, want, dtype):
    torch.testing.assert_close(got, want, **TOLERANCES[dtype])
    # same operations in the same order: identical in practice; the table bounds any drift
    assert (got != want).sum() <= 0.001 * want.numel()


@pytest.mark.parametrize("combo", ALL_COMBOS, ids=lambda c: "-".join(map(str, c)))
def test_every_option_combination(combo, device):
    base, models = _family(1000, 3, torch.float32, seed=3)
    opts = _opts(3, combo, lam=1.3)
    got = _kernel(base, models, opts, torch.float32, device)
    _check(got, reference.fused_merge(base, models, opts, NAME, torch.float32), torch.float32)
    if device == "cpu":  # the interpreter and the C loop: the same fp32 operations, bit for bit
        assert torch.equal(got, cpu.fused_merge(base, models, opts, NAME, torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("combo", METHODS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 8])
def test_dtypes_and_model_counts(dtype, combo, k, device):
    base, models = _family(ODD, k, dtype, seed=k)
    opts = _opts(k, combo, lam=1.3 if k % 2 else 1.0)
    got = _kernel(base, models, opts, dtype, device)
    _check(got, reference.fused_merge(base, models, opts, NAME, dtype), dtype)


@pytest.mark.parametrize("shape", [(1,), (1000,), (37, 111)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_odd_sizes_and_shapes(shape, dtype, device):
    base, models = _family(shape, 4, dtype, seed=len(shape))
    for combo in METHODS:
        opts = _opts(4, combo)
        got = _kernel(base, models, opts, dtype, device)
        assert got.shape == base.shape
        _check(got, reference.fused_merge(base, models, opts, NAME, dtype), dtype)


@pytest.mark.parametrize("combo", [("random", "sum", "l1", True), ("magnitude", "count", "none", False)],
                         ids=lambda c: "-".join(map(str, c)))
def test_block_size_does_not_change_the_result(combo, device):
    base, models = _family(ODD, 6, torch.bfloat16, seed=6)  # 6 models: two Philox groups
    opts = _opts(6, combo, seed=4)
    a = _kernel(base, models, opts, torch.bfloat16, device, block=128)
    b = _kernel(base, models, opts, torch.bfloat16, device, block=1024)
    c = _kernel(base, models, opts, torch.bfloat16, device, block=2048)
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    assert torch.equal(a.view(torch.int16), c.view(torch.int16))


def test_dare_masks_match_the_cpu_path_and_the_spec(device):
    """keep_k(j) = U_k(j) < rho_k, Philox lane k%4 of group k//4: recovered per model by one-hot
    weights, identical to the fused CPU path's masks and to ``rng.uniforms``."""
    n, k = 2001, 8
    base = torch.zeros(n)
    models = [torch.full((n,), float(i + 1)) for i in range(k)]
    for i in range(k):
        weights = tuple(1.0 if j == i else 0.0 for j in range(k))
        opts = FusedOptions(weights=weights, densities=DENSITIES, sparsify="random", consensus="none", seed=5)
        got = _kernel(base, models, opts, torch.float32, device, name="name")
        want = cpu.fused_merge(base, models, opts, "name", torch.float32)
        assert torch.equal(got != 0, want != 0), f"model {i}"
        assert torch.equal(got != 0, rng.uniforms(5, "name", i, torch.arange(n)) < DENSITIES[i]), f"model {i}"
    # and whole DARE merges equal the CPU path exactly in fp32
    base, models = _family(ODD, k, torch.float32, seed=8)
    opts = _opts(k, ("random", "count", "l1", True), seed=11)
    got = _kernel(base, models, opts, torch.float32, device)
    assert torch.equal(got, cpu.fused_merge(base, models, opts, NAME, torch.float32))


def test_chunks_restart_the_stream(monkeypatch, device):
    """Tensors of 2**31+ elements draw per chunk (``name#c``, j from 0): shrunk to 1000 here."""
    monkeypatch.setattr(rng, "CHUNK_ELEMENTS", 1000)
    base, models = _family(ODD, 5, torch.float32, seed=9)
    for combo in [("random", "sum", "l1", False), ("magnitude", "sum", "none", True)]:
        opts = _opts(5, combo, seed=2)
        got = _kernel(base, models, opts, torch.float32, device)
        want = reference.fused_merge(base, models, opts, NAME, torch.float32)
        _check(got, want, torch.float32)
        if device == "cpu":
            assert torch.equal(got, cpu.fused_merge(base, models, opts, NAME, torch.float32))
    # the chunked masks really differ from one unchunked stream
    opts = FusedOptions(weights=(1.0,), densities=(0.5,), sparsify="random", seed=2)
    chunked = _kernel(torch.zeros(ODD), [torch.ones(ODD)], opts, torch.float32, device)
    assert torch.equal(chunked[1000:2000] != 0, rng.uniforms(2, NAME + "#1", 0, torch.arange(1000)) < 0.5)


def test_linear_without_base(device):
    _, models = _family(1000, 3, torch.float32)
    opts = FusedOptions(weights=(1.0, 2.0, 3.0), normalize=True)
    got = _kernel(None, models, opts, torch.float32, device)
    torch.testing.assert_close(got, (models[0] + 2 * models[1] + 3 * models[2]) / 6, rtol=1e-6, atol=1e-6)
    _check(got, reference.fused_merge(None, models, opts, NAME, torch.float32), torch.float32)
    opts = _opts(3, ("random", "sum", "l1", False))
    _check(_kernel(None, models, opts, torch.float32, device),
           reference.fused_merge(None, models, opts, NAME, torch.float32), torch.float32)


def test_bf16_store_rounds_like_torch(device):
    """One cast on store, to nearest even (ties, overflow to inf), as torch's .to(bfloat16); NaN
    stays NaN (stored as 0x7FC0, as the C loop; torch may keep the sign bit)."""
    x = torch.randn(ODD)
    x[:8] = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 3.4e38, -3.4e38,
                          float("nan"), float("inf"), -float("inf")])
    opts = FusedOptions(weights=(1.0,))
    got = _kernel(None, [x], opts, torch.bfloat16, device)
    want = reference.fused_merge(None, [x], opts, NAME, torch.bfloat16)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got.view(torch.int16)[~nan], want.view(torch.int16)[~nan])
    assert torch.equal(got.view(torch.int16), cpu.fused_merge(None, [x], opts, NAME, torch.bfloat16).view(torch.int16))


def test_mixed_input_dtypes_and_out(device):
    base, models = _family(ODD, 3, torch.float32, seed=12)
    models = [models[0].to(torch.bfloat16), models[1].to(torch.float16), models[2]]
    opts = _opts(3, ("magnitude", "sum", "l1", True), lam=0.8)
    out = torch.empty(ODD, dtype=torch.float16, device=device)
    got = fused_ta.fused_merge(base.to(device), [m.to(device) for m in models], opts, NAME, torch.float16, out=out)
    assert got is out
    _check(out.cpu(), reference.fused_merge(base, models, opts, NAME, torch.float16), torch.float16)


def test_rejects_what_it_cannot_merge():
    base, models = _family(10, 9, torch.float32)
    with pytest.raises(FastmergeError):
        fused_ta.fused_merge(base, models, FusedOptions(weights=(1.0,) * 9), NAME, torch.float32)
    with pytest.raises(FastmergeError):
        fused_ta.fused_merge(base, models[:2], FusedOptions(weights=(1.0,) * 2), NAME, torch.float64)


_COMPILE = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastmerge.kernels.fused_ta_details._fused_ta import _fused_ta_kernel
    for k, sp, cs, bf16 in [(1, 0, 0, False), (3, 2, 1, True), (8, 1, 2, True), (6, 1, 0, False)]:
        const = dict(K=k, HAS_BASE=k != 1, SPARSIFY=sp, CONSENSUS=cs, NORMALIZE=True, APPLY_LAMBDA=True,
                     OUT_BF16_BITS=bf16, BLOCK=1024)
        sig = {"out_ptr": "*i16" if bf16 else "*fp32", "base_ptr": "*bf16", "prm_ptr": "*fp32",
               "seed0": "i64", "seed1": "i64", "n": "i32"}
        sig.update({f"x{i}": "*fp16" if i % 2 else "*bf16" for i in range(8)})
        sig.update({c: "constexpr" for c in const})
        ptx = triton.compile(ASTSource(_fused_ta_kernel, sig, const), target=GPUTarget("cuda", 90, 32),
                             options=dict(enable_fp_fusion=False, num_warps=4)).asm["ptx"]
        assert "fma.rn.f32" not in ptx, "FMA contraction would break agreement with the reference"
        assert "div.rn.f32" in ptx, "normalize must be an IEEE division"
    print("ok")
""")


def test_compiles_for_a_gpu_without_fma_contraction():
    """The real (not interpreted) compiler accepts the kernel for sm_90 with no device present, and
    emits no fused multiply-add and an IEEE division: what keeps a GPU bit-close to the reference."""
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("triton has no nvidia backend here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize("programs", [3, 1024])
@pytest.mark.parametrize("k, dtype", [(2, torch.float32), (6, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("sparsify", ["random", "magnitude"])
def test_l1_scales_equal_a_torch_sum(device, monkeypatch, programs, k, dtype, sparsify):
    """The l1 pass's rescale factors against fp64 sums in torch. With 3 programs each one loops over
    several blocks: full blocks (no mask), then the tail block (ODD is no multiple of any block),
    then blocks past the end; a tail counted as full, or dropped, moves a factor by ~1e-3."""
    monkeypatch.setattr(fused_ta, "_SUM_PROGRAMS", programs)
    base, models = _family(ODD, k, dtype, seed=5)
    opts = _opts(k, (sparsify, "sum", "l1", False))
    on = (lambda t: t.to(device)) if device != "cpu" else (lambda t: t)
    prm = fused_ta._prepare(on(base), [on(m) for m in models], opts, NAME, dtype, None)[4]
    got = prm[fused_ta.PRM_SCALE:fused_ta.PRM_SCALE + k].cpu()
    b = base.reshape(-1).float()
    deltas = [m.reshape(-1).float() - b for m in models]
    if sparsify == "magnitude":
        keep = [reference.magnitude_keep(d, r) for d, r in zip(deltas, opts.densities)]
    else:
        keep = reference._keep_masks(deltas, opts, rng.chunk_name(NAME, 0, ODD))
    want = [l1_scale(d.abs().double().sum().item(), d.abs().double()[kp].sum().item()) for d, kp in zip(deltas, keep)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), rtol=1e-6, atol=0)
