"""The in-memory Merger: candidates written into one live module, equal to the disk merge."""

from __future__ import annotations

import pytest
import torch

import fastmerge
from fastmerge import cpu
from fastmerge.merger import Genome, Merger
from fastmerge.spec import FusedOptions

from .test_merge import load_dir


def recipe(base, ft0, ft1, method="dare_ties", w=(0.6, 0.8), d=(0.5, 0.7)) -> dict:
    return {"merge_method": method, "base_model": str(base), "random_seed": 2,
            "models": [{"model": str(ft0), "parameters": {"weight": w[0], "density": d[0]}},
                       {"model": str(ft1), "parameters": {"weight": w[1], "density": d[1]}}]}


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("arch,method,dtype,tied", [
    ("llama", "dare_ties", torch.float32, False), ("mistral", "ties", torch.bfloat16, False),
    ("qwen2", "task_arithmetic", torch.float32, False),
    ("llama", "task_arithmetic", torch.float32, True),  # lm_head is the embeddings: not in the checkpoint
])
def test_in_place_merge_equals_disk_merge(families, tmp_path, arch, method, dtype, tied):
    base, ft0, ft1 = families(arch, dtype, tie_embeddings=tied) if tied else families(arch, dtype)
    r = recipe(base, ft0, ft1, method)
    merger = Merger(r)
    fastmerge.merge(r, tmp_path / "out")
    disk = load_dir(tmp_path / "out")
    mem = merger.module.state_dict()
    for name, t in disk.items():
        assert torch.equal(mem[name], t), name  # same fused loop, same bits
    # and the module computes what the saved checkpoint computes
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", torch_dtype=dtype).eval()
    ids = torch.tensor([[3, 14, 15, 92, 6]])
    with torch.no_grad():
        torch.testing.assert_close(merger.module(ids).logits, loaded(ids).logits, rtol=0, atol=0)


def test_candidates_reuse_storage_and_are_deterministic(families):
    base, ft0, ft1 = families("llama")
    merger = Merger(recipe(base, ft0, ft1))
    ptrs = merger.storage()
    a = state(merger.merge(Genome(weights=[0.3, 1.2], densities=[0.4, 0.9])))
    b = state(merger.merge(Genome(weights=[1.0, 0.1])))
    a2 = state(merger.merge(Genome(weights=[0.3, 1.2], densities=[0.4, 0.9])))
    assert merger.storage() == ptrs  # no new parameter storage between candidates
    assert all(torch.equal(a[k], a2[k]) for k in a)  # bit-identical for the same parameters
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # the parameters really are the module's: its forward changes with the candidate
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        out_a = merger.merge(Genome(weights=[0.3, 1.2], densities=[0.4, 0.9]))(ids).logits
        out_b = merger.merge(Genome(weights=[1.0, 0.1]))(ids).logits
    assert not torch.equal(out_a, out_b)


@pytest.mark.parametrize("tied", [False, True])
def test_bound_merger_writes_into_the_given_tensors(families, tied):
    """Merger.bind: candidates land in the caller's tensors (an engine's; here row ranges of one fused
    buffer, as vLLM's qkv is), bit-identical to an unbound Merger's, and the module shows them."""
    base, ft0, ft1 = families("llama", tie_embeddings=True) if tied else families("llama")
    ref, merger = Merger(recipe(base, ft0, ft1)), Merger(recipe(base, ft0, ft1))
    params = dict(merger.module.named_parameters())
    fused = torch.empty(sum(t.numel() for t in params.values()) + 5)  # odd offsets: views of one buffer
    targets, at = {}, 3
    for name, t in params.items():
        targets[name] = fused[at:at + t.numel()].view(t.shape)
        at += t.numel()
    merger.bind(targets)
    assert all(torch.equal(targets[n], t) for n, t in state(ref.module).items() if n in targets)  # copied in
    ids = torch.tensor([[1, 2, 3]])
    for g in (Genome(weights=[0.3, 1.2], densities=[0.4, 0.9]), Genome(weights=[1.0, 0.1])):
        want = state(ref.merge(g))
        merger.merge(g)
        for name, t in targets.items():
            assert torch.equal(t, want[name]), name
        assert {p.data_ptr() for p in merger.module.parameters()} == {t.data_ptr() for t in targets.values()}
        with torch.no_grad():
            assert torch.equal(merger.module(ids).logits, ref.module(ids).logits)


def test_bind_refuses_a_target_it_cannot_merge_into(families):
    base, ft0, ft1 = families("llama")
    merger = Merger(recipe(base, ft0, ft1))
    name, t = next(iter(merger.module.named_parameters()))
    before = state(merger.module)
    for bad, why in ((torch.empty(t.shape[0] + 1, *t.shape[1:]), f"{name}: the target is"),
                     (torch.empty(t.shape, dtype=torch.float64), "float64"),
                     (torch.empty(t.shape[::-1]).t(), "not contiguous")):
        with pytest.raises(fastmerge.FastmergeError, match=why):
            merger.bind({name: bad})
    with pytest.raises(fastmerge.FastmergeError, match="model.nope.weight is not a merged parameter"):
        merger.bind({"model.nope.weight": t})
    assert all(torch.equal(v, before[k]) for k, v in state(merger.module).items())  # nothing was bound


def test_layer_group_genome(families):
    base, ft0, ft1 = families("llama", layers=4)
    merger = Merger(recipe(base, ft0, ft1, method="ties"))
    weights = [[1.0, 0.0], [0.0, 1.0]]  # layers 0-1 from ft0's delta, layers 2-3 from ft1's
    merger.merge(Genome(weights=weights, densities=[0.5, 0.5]))
    mem = merger.module.state_dict()
    src = {p: load_dir(p) for p in (base, ft0, ft1)}
    for layer, w in ((0, (1.0, 0.0)), (3, (0.0, 1.0))):
        name = f"model.layers.{layer}.mlp.up_proj.weight"
        opts = FusedOptions(weights=w, densities=(0.5, 0.5), sparsify="magnitude", consensus="sum",
                            normalize=True, seed=2)
        want = cpu.fused_merge(src[base][name], [src[ft0][name], src[ft1][name]], opts, name, torch.float32)
        assert torch.equal(mem[name], want), name
    # embeddings take group 0
    name = "model.embed_tokens.weight"
    opts = FusedOptions(weights=(1.0, 0.0), densities=(0.5, 0.5), sparsify="magnitude", consensus="sum",
                        normalize=True, seed=2)
    want = cpu.fused_merge(src[base][name], [src[ft0][name], src[ft1][name]], opts, name, torch.float32)
    assert torch.equal(mem[name], want)


def test_recipe_candidates_and_errors(families, tmp_path):
    base, ft0, ft1 = families("llama")
    merger = Merger(recipe(base, ft0, ft1))
    r2 = recipe(base, ft0, ft1, w=(0.2, 0.9), d=(0.9, 0.3))
    merger.merge(r2)
    fastmerge.merge(r2, tmp_path / "out")
    disk = load_dir(tmp_path / "out")
    mem = merger.module.state_dict()
    assert all(torch.equal(mem[k], v) for k, v in disk.items())
    other = families("llama", finetunes=3)[3]
    with pytest.raises(fastmerge.FastmergeError, match="did not load"):
        merger.merge(recipe(base, ft0, other))
    with pytest.raises(fastmerge.FastmergeError, match="3 weights for 2 models"):
        merger.merge(Genome(weights=[1.0, 1.0, 1.0]))


@pytest.mark.interpreter
def test_triton_backend_equals_cpu_backend(families):
    pytest.importorskip("triton")
    base, ft0, ft1 = families("llama", hidden=32, layers=2)
    r = recipe(base, ft0, ft1)
    want = state(Merger(r).module)
    got = state(Merger(r, backend="triton").module)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=k)


@pytest.mark.interpreter
def test_triton_backend_beyond_the_kernels_limits(families):
    """Nine models (the kernels take 1..8): the Triton Merger gives those tensors to the engine's CPU
    executor instead of failing in the grouped launch, and equals the CPU Merger bit for bit."""
    pytest.importorskip("triton")
    base, *fts = families("llama", finetunes=9, hidden=16, layers=1)
    r = {"merge_method": "ties", "base_model": str(base), "dtype": "float32",
         "parameters": {"normalize": True},
         "models": [{"model": str(f), "parameters": {"weight": 0.1 * (i + 1), "density": 0.5}} for i, f in enumerate(fts)]}
    want = state(Merger(r).module)
    got = state(Merger(r, backend="triton").module)
    assert want and set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
