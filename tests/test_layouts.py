"""Layer indices on layouts other than ``model.layers.N``: GPT-2's ``transformer.h.N`` (config key
``n_layer``), for gradients (t = i/(L-1), as mergekit) and for passthrough stacking; the layer
prefix derived from the tensor names and the config's layer count for the other families."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fastmerge
from fastmerge.io import CheckpointReader
from fastmerge.plan import build_plan, config_num_layers, is_pre, layer_count_key, layer_group, layer_prefix, num_layers
from fastmerge.recipe import load_recipe

L = 4
EXACT = dict(rtol=0, atol=0)
TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="session")
def gpt2(families):
    """base, ft0, ft1: tiny GPT-2 (n_layer 4, n_embd 32, n_head 4, vocab 64), fp32, sharded."""
    return [str(p) for p in families("gpt2", layers=L, hidden=32, heads=4, vocab=64)]


def _state(path: Path | str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _merge_both(recipe: dict, tmp_path: Path):
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    mk_out, fm_out = tmp_path / "mergekit", tmp_path / "fastmerge"
    run_merge(MergeConfiguration.model_validate(copy.deepcopy(recipe)), str(mk_out),
              MergeOptions(device="cpu", quiet=True, copy_tokenizer=False, write_model_card=False))
    fastmerge.merge(copy.deepcopy(recipe), fm_out)
    cfgs = [json.loads((d / "config.json").read_text()) for d in (mk_out, fm_out)]
    return _state(mk_out), _state(fm_out), cfgs[0], cfgs[1]


def _assert_same(mk: dict, fm: dict) -> None:
    assert sorted(fm) == sorted(mk)
    for name, want in mk.items():
        assert fm[name].dtype == want.dtype, name
        torch.testing.assert_close(fm[name], want, **TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_gpt2_layout_read_from_names_and_config(gpt2):
    reader = CheckpointReader(gpt2[0])
    assert "num_hidden_layers" not in reader.config and reader.config["n_layer"] == L
    assert config_num_layers(reader.config) == num_layers(reader) == L
    assert layer_count_key(reader.config) == "n_layer"
    assert layer_prefix(reader.tensors, L) == "transformer.h"
    assert is_pre("transformer.wte.weight") and is_pre("transformer.wpe.weight")
    assert not is_pre("transformer.ln_f.weight") and not is_pre("lm_head.weight")
    assert layer_group("transformer.h.3.attn.c_attn.weight", L, 2) == 1
    assert layer_group("transformer.wpe.weight", L, 2) == 0
    assert layer_group("transformer.ln_f.bias", L, 2) == 1


def test_gpt2_gradient_positions(gpt2):
    base, ft0, _ = gpt2
    recipe = load_recipe(dict(merge_method="slerp", base_model=base, models=[dict(model=base), dict(model=ft0)],
                               parameters=dict(t=[0, 1])))
    plan = build_plan(recipe, {m: CheckpointReader(m) for m in (base, ft0)})
    ts = {}
    for task in plan.tensors:
        if task.name.startswith("transformer.h."):
            ts.setdefault(int(task.name.split(".")[2]), set()).add(task.t)
        elif task.route != "copy":
            assert task.t == 0.0, task.name  # embeddings, final norm: t = 0
    assert ts == {i: {i / (L - 1)} for i in range(L)}
    assert plan.num_layers == L and plan.config["n_layer"] == L


@pytest.mark.mergekit
@pytest.mark.parametrize("kind", ["slerp", "linear"])
def test_gpt2_gradient_matches_mergekit(kind, gpt2, tmp_path):
    base, ft0, ft1 = gpt2
    if kind == "slerp":
        recipe = dict(merge_method="slerp", base_model=base, models=[dict(model=base), dict(model=ft0)],
                      parameters=dict(t=[0, 1]))
    else:
        recipe = dict(merge_method="linear", models=[dict(model=base, parameters=dict(weight=[1.0, 0.0])),
                                                     dict(model=ft0, parameters=dict(weight=[0.0, 1.0])),
                                                     dict(model=ft1, parameters=dict(weight=0.5))],
                      parameters=dict(normalize=False))
    mk, fm, mk_cfg, fm_cfg = _merge_both(recipe | {"dtype": "float32"}, tmp_path)
    _assert_same(mk, fm)
    assert fm_cfg["n_layer"] == mk_cfg["n_layer"] == L and "num_hidden_layers" not in fm_cfg
    # the layers really take t = i/(L-1): the ends are the sources, the middle layers neither
    b, f0, f1 = _state(base), _state(ft0), _state(ft1)
    name = "transformer.h.{}.mlp.c_fc.weight"
    if kind == "slerp":
        torch.testing.assert_close(fm[name.format(0)], b[name.format(0)], **TOL)
        torch.testing.assert_close(fm[name.format(L - 1)], f0[name.format(L - 1)], **TOL)
        torch.testing.assert_close(fm["transformer.wte.weight"], b["transformer.wte.weight"], **TOL)
    else:
        for i in range(L):
            t = i / (L - 1)
            want = (1 - t) * b[name.format(i)] + t * f0[name.format(i)] + 0.5 * f1[name.format(i)]
            torch.testing.assert_close(fm[name.format(i)], want, **TOL)
    for i in (1, 2):
        n = name.format(i)
        assert not torch.allclose(fm[n], b[n], atol=1e-6) and not torch.allclose(fm[n], f0[n], atol=1e-6)


def _stack_recipe(base, ft0, ft1):
    return dict(merge_method="passthrough", dtype="float32",
                slices=[dict(sources=[dict(model=base, layer_range=[0, 3])]),
                        dict(sources=[dict(model=ft0, layer_range=[1, 4])]),
                        dict(sources=[dict(model=ft1, layer_range=[3, 4])])])


def test_gpt2_passthrough_stacking(gpt2, tmp_path):
    from transformers import AutoModelForCausalLM

    base, ft0, ft1 = gpt2
    out = tmp_path / "out"
    fastmerge.merge(_stack_recipe(base, ft0, ft1), out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["n_layer"] == 7 and "num_hidden_layers" not in cfg
    got = _state(out)
    srcs = [(base, 0), (base, 1), (base, 2), (ft0, 1), (ft0, 2), (ft0, 3), (ft1, 3)]
    states = {m: _state(m) for m in (base, ft0, ft1)}
    layer_names = [n[len("transformer.h.0."):] for n in states[base] if n.startswith("transformer.h.0.")]
    assert len(layer_names) == 12
    for i, (m, j) in enumerate(srcs):
        for rest in layer_names:
            torch.testing.assert_close(got[f"transformer.h.{i}.{rest}"], states[m][f"transformer.h.{j}.{rest}"], **EXACT)
    for n in ("transformer.wte.weight", "transformer.wpe.weight"):
        torch.testing.assert_close(got[n], states[base][n], **EXACT)
    for n in ("transformer.ln_f.weight", "transformer.ln_f.bias"):
        torch.testing.assert_close(got[n], states[ft1][n], **EXACT)
    assert len(got) == 7 * 12 + 4

    model = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    assert type(model).__name__ == "GPT2LMHeadModel" and len(model.transformer.h) == 7
    torch.testing.assert_close(model.transformer.h[4].mlp.c_fc.weight.detach(),
                               states[ft0]["transformer.h.2.mlp.c_fc.weight"], **EXACT)
    ids = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert ids.shape == (1, 7)


@pytest.mark.mergekit
def test_gpt2_passthrough_stacking_matches_mergekit(gpt2, tmp_path):
    mk, fm, mk_cfg, fm_cfg = _merge_both(_stack_recipe(*gpt2), tmp_path)
    _assert_same(mk, fm)
    assert mk_cfg["n_layer"] == fm_cfg["n_layer"] == 7


@pytest.mark.parametrize("names, count, want", [
    (["gpt_neox.embed_in.weight", *[f"gpt_neox.layers.{i}.attention.dense.weight" for i in range(3)],
      "gpt_neox.final_layer_norm.weight", "embed_out.weight"], 3, "gpt_neox.layers"),
    (["model.decoder.embed_tokens.weight", "model.decoder.embed_positions.weight",
      *[f"model.decoder.layers.{i}.fc1.weight" for i in range(2)]], 2, "model.decoder.layers"),
    ([*[f"transformer.blocks.{i}.ffn.up_proj.weight" for i in range(2)], "transformer.wte.weight"], 2,
     "transformer.blocks"),
    # a vision tower's blocks lose to the language model's layers, by the config's count
    ([*[f"visual.blocks.{i}.mlp.fc1.weight" for i in range(8)], *[f"model.layers.{i}.mlp.up.weight" for i in range(2)]],
     2, "model.layers"),
    # MoE experts: the first number is the layer
    ([f"model.layers.{i}.mlp.experts.{e}.w1.weight" for i in range(2) for e in range(4)], 2, "model.layers"),
    (["lm_head.weight", "model.norm.weight"], 0, None),
])
def test_layer_prefix_other_layouts(names, count, want):
    assert layer_prefix(names, count) == want
    assert layer_prefix(names) == want


def test_layer_count_keys():
    assert config_num_layers({"num_hidden_layers": 3, "n_layer": 9}) == 3
    assert config_num_layers({"n_layer": 5}) == 5 and layer_count_key({"n_layer": 5}) == "n_layer"
    assert config_num_layers({"num_layers": 6}) == 6 and config_num_layers({"n_layers": 7}) == 7
    assert config_num_layers({}) is None and layer_count_key({}) == "num_hidden_layers"
    assert is_pre("model.decoder.embed_positions.weight") and is_pre("transformer.word_embeddings.weight")


def test_gpt2_ps_groups_and_recipe_rebuild_the_merger(gpt2, tmp_path):
    """The PS search reads GPT-2's ``n_layer``; its per-group recipe (slices) rebuilds what the
    Merger scored, group by group over ``transformer.h.N``."""
    import numpy as np
    import yaml

    from fastmerge.evolve import EvolveConfig, ps_space
    from fastmerge.merger import Merger

    base, ft0, ft1 = gpt2
    cfg = {"models": [ft0, ft1], "base_model": base, "merge_method": "ties",
           "evaluator": {"name": "tests.evolve_fitness:distance_to", "target": "unset"}, "metric": "neg_distance",
           "budget": {"generations": 2}, "out": str(tmp_path / "out"), "cma": {"seed": 3},
           "ps": {"group_size": 2, "weight": [0.0, 2.0]}}
    space = ps_space(EvolveConfig.from_yaml(cfg))
    assert space.num_layers == L and space.groups == 2
    assert space.group_of("transformer.h.1.attn.c_attn.weight") == 0
    assert space.group_of("transformer.h.2.attn.c_attn.weight") == 1
    assert space.group_of("transformer.wpe.weight") == 0 and space.group_of("transformer.ln_f.weight") == 1
    x = np.random.default_rng(0).uniform(size=space.size)
    merger = Merger(space.base_recipe())
    merger.merge(space.candidate(space.decode(x)))
    file = tmp_path / "best.yml"
    file.write_text(yaml.safe_dump(space.recipe(space.decode(x)), sort_keys=False))
    fastmerge.merge(file, tmp_path / "merged")
    disk, mem = _state(tmp_path / "merged"), merger.module.state_dict()
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["n_layer"] == L
    assert set(disk) <= set(mem) and len(disk) == L * 12 + 4
    for name, t in disk.items():
        assert torch.equal(mem[name], t), name
    assert not torch.equal(disk["transformer.h.0.mlp.c_fc.weight"], _state(base)["transformer.h.0.mlp.c_fc.weight"])
