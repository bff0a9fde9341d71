"""End to end: recipes -> checkpoints on tiny Llama, Mistral and Qwen2 models, checked tensor by
tensor against the pure-torch reference, and loaded back into transformers to generate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import fastmerge
from fastmerge import reference
from fastmerge.spec import FusedOptions

from .conftest import TOLERANCES

ARCHS = ["llama", "mistral", "qwen2"]


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def run(recipe: dict, out: Path, **opts) -> fastmerge.MergeResult:
    return fastmerge.merge(recipe, out, fastmerge.MergeOptions(**opts))


def generate(path: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([[1, 5, 9, 2]])
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 8)
    return out


TA_METHODS = {
    # method: (sparsify, consensus, rescale, normalize) with mergekit's defaults
    "task_arithmetic": ("none", "none", "none", False),
    "ties": ("magnitude", "sum", "none", True),
    "dare_ties": ("random", "sum", "l1", False),
    "dare_linear": ("random", "none", "l1", False),
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", list(TA_METHODS))
def test_task_arithmetic_family_matches_reference(families, tmp_path, arch, method):
    base, ft0, ft1 = families(arch)
    recipe = {
        "merge_method": method,
        "base_model": str(base),
        "models": [
            {"model": str(ft0), "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": str(ft1), "parameters": {"weight": 0.8, "density": 0.7}},
        ],
        "parameters": {"lambda": 1.1},
        "random_seed": 4,
    }
    res = run(recipe, tmp_path / "out")
    got = load_dir(tmp_path / "out")
    b, m0, m1 = load_dir(base), load_dir(ft0), load_dir(ft1)
    assert set(got) == set(b)
    sp, cs, rs, norm = TA_METHODS[method]
    opts = FusedOptions(weights=(0.6, 0.8), densities=(0.5, 0.7), sparsify=sp, consensus=cs, rescale=rs,
                        normalize=norm, lambda_=1.1, seed=4)
    for name, t in got.items():
        want = reference.fused_merge(b[name], [m0[name], m1[name]], opts, name, b[name].dtype)
        torch.testing.assert_close(t, want, **TOLERANCES[t.dtype], msg=name)
    assert res.tensors == len(got)
    generate(tmp_path / "out")


@pytest.mark.parametrize("arch", ARCHS)
def test_linear_slerp_passthrough(families, tmp_path, arch):
    base, ft0, ft1 = families(arch)
    b, m0, m1 = load_dir(base), load_dir(ft0), load_dir(ft1)

    run({"merge_method": "linear", "models": [{"model": str(ft0), "parameters": {"weight": 1.0}},
                                              {"model": str(ft1), "parameters": {"weight": 3.0}}]}, tmp_path / "lin")
    for name, t in load_dir(tmp_path / "lin").items():
        torch.testing.assert_close(t, (m0[name] + 3 * m1[name]) / 4, rtol=1e-5, atol=1e-6)
    generate(tmp_path / "lin")

    run({"merge_method": "slerp", "base_model": str(base),
         "models": [{"model": str(base)}, {"model": str(ft0)}], "parameters": {"t": 0.3}}, tmp_path / "slerp")
    for name, t in load_dir(tmp_path / "slerp").items():
        torch.testing.assert_close(t, reference.slerp(0.3, b[name], m0[name], t.dtype), rtol=1e-6, atol=1e-7)
    generate(tmp_path / "slerp")

    # stack: base layers [0, 2) then ft1 layers [1, 2) -> 3 layers
    run({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(base), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(ft1), "layer_range": [1, 2], "parameters": {"scale": 0.5}}]},
    ]}, tmp_path / "stack")
    got = load_dir(tmp_path / "stack")
    cfg = json.loads((tmp_path / "stack" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3
    assert torch.equal(got["model.layers.1.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"])
    torch.testing.assert_close(got["model.layers.2.mlp.up_proj.weight"], 0.5 * m1["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(got["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    # post weights come from the last slice, with its parameters (as mergekit)
    torch.testing.assert_close(got["lm_head.weight"], 0.5 * m1["lm_head.weight"])
    generate(tmp_path / "stack")


@pytest.mark.parametrize("out_dtype", [None, "float32"])
def test_bf16_models(families, tmp_path, out_dtype):
    base, ft0, ft1 = families("llama", torch.bfloat16)
    recipe = {"merge_method": "dare_ties", "base_model": str(base),
              "models": [{"model": str(ft0), "parameters": {"weight": 0.5, "density": 0.4}},
                         {"model": str(ft1), "parameters": {"weight": 0.5, "density": 0.6}}]}
    if out_dtype:
        recipe["out_dtype"] = out_dtype
    run(recipe, tmp_path / "out")
    got = load_dir(tmp_path / "out")
    b, m0, m1 = load_dir(base), load_dir(ft0), load_dir(ft1)
    want_dtype = torch.float32 if out_dtype else torch.bfloat16
    opts = FusedOptions(weights=(0.5, 0.5), densities=(0.4, 0.6), sparsify="random", consensus="sum", rescale="l1")
    for name, t in got.items():
        assert t.dtype == want_dtype
        want = reference.fused_merge(b[name], [m0[name], m1[name]], opts, name, want_dtype)
        torch.testing.assert_close(t, want, **TOLERANCES[want_dtype], msg=name)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg.get("torch_dtype", cfg.get("dtype")) == str(want_dtype).split(".")[-1]
    generate(tmp_path / "out")


def test_seed_is_reproducible_and_cli_overrides(families, tmp_path):
    base, ft0, ft1 = families("llama")
    recipe = {"merge_method": "dare_linear", "base_model": str(base),
              "models": [{"model": str(ft0), "parameters": {"weight": 1.0, "density": 0.5}}]}
    run(recipe, tmp_path / "a")
    run(recipe, tmp_path / "b")
    run(recipe, tmp_path / "c", seed=123)
    a, b, c = load_dir(tmp_path / "a"), load_dir(tmp_path / "b"), load_dir(tmp_path / "c")
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(a[name], b[name])
    assert not torch.equal(a[name], c[name])


def test_tied_embeddings(families, tmp_path):
    base, ft0, ft1 = families("qwen2", tie_embeddings=True)
    assert "lm_head.weight" not in load_dir(base)
    run({"merge_method": "ties", "base_model": str(base),
         "models": [{"model": str(ft0), "parameters": {"weight": 1.0, "density": 0.5}},
                    {"model": str(ft1), "parameters": {"weight": 1.0, "density": 0.5}}]}, tmp_path / "out")
    got = load_dir(tmp_path / "out")
    assert "lm_head.weight" not in got
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True
    generate(tmp_path / "out")


def test_vocab_mismatch_merges_common_rows(families, tmp_path):
    base, ft0, ft1 = families("llama", vocab_overrides={0: 250})
    with pytest.warns(UserWarning, match="vocabulary sizes differ"):
        run({"merge_method": "task_arithmetic", "base_model": str(base),
             "models": [{"model": str(ft0), "parameters": {"weight": 1.0}},
                        {"model": str(ft1), "parameters": {"weight": 1.0}}]}, tmp_path / "out")
    got = load_dir(tmp_path / "out")
    b, m0, m1 = load_dir(base), load_dir(ft0), load_dir(ft1)
    name = "model.embed_tokens.weight"
    assert got[name].shape == b[name].shape == (256, 64)
    torch.testing.assert_close(got[name][:250], m0[name][:250] + m1[name][:250] - b[name][:250], rtol=1e-5, atol=1e-6)
    assert torch.equal(got[name][250:], b[name][250:])
    generate(tmp_path / "out")


def test_sharded_output_index_tokenizer_and_card(families, tmp_path):
    base, ft0, _ = families("mistral")
    (Path(base) / "tokenizer.json").write_text('{"version": "1.0"}')
    recipe_path = tmp_path / "r.yml"
    recipe_path.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(base),
                                           "models": [{"model": str(ft0), "parameters": {"weight": 0.5}}]}))
    run(str(recipe_path), tmp_path / "out", out_shard_size=60_000)
    out = tmp_path / "out"
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert set(index["weight_map"]) == set(load_dir(base))
    assert (out / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert (out / "generation_config.json").exists()
    card = (out / "README.md").read_text()
    assert "task_arithmetic" in card and str(ft0) in card
    assert not list(tmp_path.glob(".out.fastmerge-*"))
    generate(out)


def test_cli_merge_and_force(families, tmp_path, capsys):
    from fastmerge.cli import main

    base, ft0, _ = families("llama")
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear",
                                      "models": [{"model": str(base), "parameters": {"weight": 1.0}},
                                                 {"model": str(ft0), "parameters": {"weight": 1.0}}]}))
    out = tmp_path / "out"
    assert main(["merge", str(recipe), str(out), "--no-progress", "--threads", "1"]) == 0
    assert "merged" in capsys.readouterr().out
    before = load_dir(out)
    assert main(["merge", str(recipe), str(out), "--no-progress"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["merge", str(recipe), str(out), "--no-progress", "--force", "--seed", "3"]) == 0
    after = load_dir(out)
    assert before.keys() == after.keys()
    assert not list(tmp_path.glob(".out.fastmerge-*"))


def test_command_line_process_flushes_and_exits_with_the_status(families, tmp_path):
    """``python -m fastmerge`` leaves without interpreter teardown: the summary line (to a pipe, so
    block-buffered), the error line and the exit status must still come out."""
    import subprocess
    import sys

    base, ft0, _ = families("llama")
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(base),
                                      "models": [{"model": str(ft0), "parameters": {"weight": 0.5}}]}))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fastmerge", "merge", str(recipe), str(out), "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("merged ") and done.stdout.endswith("\n")
    ref = fastmerge.merge(yaml.safe_load(recipe.read_text()), tmp_path / "ref")
    assert ref.tensors > 0
    got = load_dir(out)
    for name, t in load_dir(tmp_path / "ref").items():
        assert torch.equal(got[name], t), name
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and again.stdout == ""
    assert again.stderr.startswith("fastmerge: error: ") and "--force" in again.stderr


@pytest.mark.parametrize("method", ["ties", "dare_ties", "linear"])
def test_cpu_merge_without_torch_equals_the_torch_path(families, tmp_path, monkeypatch, method):
    """A CPU merge of the fused family runs in a process that never imports torch (its import is
    ~1.5 s of start-up), and writes exactly what the torch-tensor path writes."""
    import subprocess
    import sys

    from fastmerge import engine

    base, ft0, ft1 = families("llama", dtype=torch.bfloat16)
    models = [{"model": str(m), "parameters": {"weight": w} | ({"density": d} if method != "linear" else {})}
              for m, w, d in ((ft0, 0.6, 0.4), (ft1, 0.5, 0.7))]
    recipe = {"merge_method": method, "models": models, "dtype": "bfloat16", "parameters": {"normalize": True}}
    if method != "linear":  # linear would average the base in, and it has no weight here
        recipe["base_model"] = str(base)
    code = ("import sys, yaml, fastmerge\n"
            f"r = fastmerge.merge(yaml.safe_load({yaml.safe_dump(recipe)!r}), {str(tmp_path / 'raw')!r})\n"
            "assert r.tensors > 0\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", "torch was imported: " + done.stdout[:200]

    monkeypatch.setattr(engine, "_raw_ok", lambda task, readers: False)  # every tensor through torch
    fastmerge.merge(recipe, tmp_path / "torch")
    raw, ref = load_dir(tmp_path / "raw"), load_dir(tmp_path / "torch")
    assert raw.keys() == ref.keys()
    for name, t in ref.items():
        assert raw[name].dtype == t.dtype and torch.equal(raw[name], t), name


@pytest.mark.parametrize("enabled", [True, False])
def test_import_restores_the_garbage_collector_state(enabled):
    """The package pauses the cyclic collector while it imports torch and its modules, and leaves
    it as it found it."""
    import subprocess
    import sys

    code = ("import gc\n" + ("" if enabled else "gc.disable()\n")
            + "import fastmerge\nfastmerge.Merger\nprint(gc.isenabled(), gc.get_threshold())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    import gc

    assert done.stdout.split(None, 1) == [str(enabled), f"{gc.get_threshold()}\n"]


def test_tokenizer_block_and_chat_template(families, tmp_path):
    base, ft0, _ = families("llama")
    other = tmp_path / "tok"
    other.mkdir()
    (other / "tokenizer.json").write_text('{"from": "other"}')
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    run({"merge_method": "task_arithmetic", "base_model": str(base),
         "models": [{"model": str(ft0), "parameters": {"weight": 0.5}}],
         "tokenizer": {"source": str(other)}, "chat_template": template}, tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"from": "other"}'
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"] == template
    with pytest.raises(fastmerge.FastmergeError, match="chat_template"):
        run({"merge_method": "linear", "models": [{"model": str(base), "parameters": {"weight": 1.0}}],
             "chat_template": "no {such"}, tmp_path / "out2")
    with pytest.raises(fastmerge.FastmergeError, match="modules"):
        run({"merge_method": "linear", "modules": {"text": {}}, "models": [{"model": str(base), "parameters": {"weight": 1.0}}]},
            tmp_path / "out2")


@pytest.mark.interpreter
@pytest.mark.parametrize("method,dtype", [("dare_ties", torch.float32), ("ties", torch.bfloat16)])
def test_triton_backend_streaming_equals_cpu_backend(families, tmp_path, method, dtype):
    """The accelerator path of the engine (DeviceRunner + kernel), run on CPU tensors under the
    Triton interpreter, writes what the fused C loop writes."""
    pytest.importorskip("triton")
    base, ft0, ft1 = families("llama", dtype, hidden=32)
    recipe = {"merge_method": method, "base_model": str(base),
              "models": [{"model": str(ft0), "parameters": {"weight": 0.7, "density": 0.4}},
                         {"model": str(ft1), "parameters": {"weight": 0.5, "density": 0.6}}]}
    run(recipe, tmp_path / "cpu")
    run(recipe, tmp_path / "triton", backend="triton")
    want, got = load_dir(tmp_path / "cpu"), load_dir(tmp_path / "triton")
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOLERANCES[dtype], msg=name)
    if dtype == torch.float32:  # same masks, same operation order: the same bits
        assert all(torch.equal(got[n], want[n]) for n in want)


def test_triton_backend_on_cpu_needs_the_interpreter(families, tmp_path, monkeypatch):
    base, ft0, _ = families("llama")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(fastmerge.FastmergeError, match="TRITON_INTERPRET=1"):
        run({"merge_method": "task_arithmetic", "base_model": str(base),
             "models": [{"model": str(ft0), "parameters": {"weight": 1.0}}]}, tmp_path / "out", backend="triton")
    assert not (tmp_path / "out").exists()
