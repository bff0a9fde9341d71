"""DFS executor: a path over loaded layers computes what the materialized model computes, shares
the sources' storage, caches per hop, exports and reloads; bad paths are clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, DynamicCache

from fastmerge.cli import main as cli_main
from fastmerge.dfs import DFSGenome, Hop, LayerPath, PathModel, export, materialize
from fastmerge.errors import FastmergeError
from fastmerge.hf_compat import output_cache
from fastmerge.synth import ModelSpec

# Path model vs materialized model: the same layers run on the same inputs in the same order, so
# fp32 agrees to float rounding of identical ops (measured: exactly 0); bf16 checkpoints reload in
# bf16 and agree to bf16 rounding of the logits.
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
VOCAB = 101


def _config(arch: str, layers: int = 3, hidden: int = 32):
    cfg = ModelSpec(arch=arch, hidden=hidden, layers=layers, heads=4, kv_heads=2, vocab=VOCAB).config()
    cfg.initializer_range = 0.3  # large random weights: logits that vary, greedy paths that differ
    if arch == "mistral":
        cfg.sliding_window = 5  # shorter than the test sequences: the sliding mask is exercised
    if arch == "qwen2":  # mixed full / sliding layers through layer_types
        d = {k: v for k, v in cfg.to_dict().items() if k != "layer_types"}
        d.update(use_sliding_window=True, sliding_window=5, max_window_layers=1)
        cfg = type(cfg)(**d)
    return cfg


def _models(arch: str, n: int = 2, layers: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    return [AutoModelForCausalLM.from_config(_config(arch, layers)).eval() for _ in range(n)]


PATH = LayerPath([(0, 0), (1, 1, 0.8), (0, 1, 1.25), (0, 1), (1, 2, 1.5), (1, 0), (0, 2)])


def _batch(seed: int = 1, lengths=(9, 6, 4)):
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), t), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):  # left padding
        mask[i, t - n:] = 1
        ids[i, : t - n] = 0
    return ids, mask


def _positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_path_logits_equal_materialized(arch):
    models = _models(arch)
    pm, ref = PathModel(models, PATH).eval(), materialize(models, PATH)
    ids, mask = _batch()
    with torch.no_grad():
        a = pm(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits
        b = ref(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits
    keep = mask.bool()
    assert b[keep].abs().max() > 0.5  # a meaningful comparison
    torch.testing.assert_close(a[keep], b[keep], atol=ATOL[torch.float32], rtol=0)


def test_scales_matter_and_head_model_chooses_embeddings():
    models = _models("llama")
    ids, _ = _batch(lengths=(7,))
    unit = LayerPath([Hop(h.model, h.layer, 1.0) for h in PATH])
    with torch.no_grad():
        a = PathModel(models, PATH)(ids).logits
        b = PathModel(models, unit)(ids).logits
        c = PathModel(models, PATH, head=1)(ids).logits
    assert (a - b).abs().max() > 1e-2
    assert (a - c).abs().max() > 1e-2
    with torch.no_grad():
        ref = materialize(models, PATH, head=1)(ids).logits
    torch.testing.assert_close(c, ref, atol=ATOL[torch.float32], rtol=0)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_greedy_generation_cache_nocache_materialized(arch):
    models = _models(arch)
    pm, ref = PathModel(models, PATH).eval(), materialize(models, PATH)
    ids, mask = _batch(seed=2)
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = pm.generate(ids, use_cache=True, **kw)
        uncached = pm.generate(ids, use_cache=False, **kw)
        plain = ref.generate(ids, **kw)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, plain)
    assert len({tuple(r[-10:].tolist()) for r in cached}) > 1  # rows actually differ


@pytest.mark.parametrize("cache_kw", ["cache", "past_key_values"])
def test_one_cache_slot_per_hop(cache_kw):
    # transformers >= 5.24 names the argument `cache`; callers written for older releases say
    # `past_key_values`: the path model takes either as the one cache
    models = _models("llama")
    pm = PathModel(models, PATH).eval()
    ids, mask = _batch(lengths=(6, 6))
    cache = DynamicCache()
    with torch.no_grad():
        out = pm(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_kw: cache})
    assert output_cache(out) is cache
    assert len(cache.layers) == len(PATH)  # layer 1 of model 0 used twice -> two slots
    assert cache.get_seq_length() == 6
    # incremental decoding with the cache == full recompute
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    mask2 = torch.cat([mask, torch.ones_like(nxt)], 1)
    with torch.no_grad():
        step = pm(input_ids=nxt, attention_mask=mask2, use_cache=True, **{cache_kw: cache}).logits[:, -1]
        full = pm(input_ids=torch.cat([ids, nxt], 1), attention_mask=mask2).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


def test_storage_shared_with_sources_and_set_path_allocates_nothing():
    models = _models("llama")
    src = {p.data_ptr() for m in models for p in m.parameters()}
    long = LayerPath([(i % 2, i % 3, 1.0) for i in range(24)])
    pm = PathModel(models, PATH)
    before = {p.data_ptr() for p in pm.parameters()}
    assert before <= src and len(before) == len(src)
    pm.set_path(long)
    assert {p.data_ptr() for p in pm.parameters()} == before
    assert sum(p.numel() for p in pm.parameters()) == sum(p.numel() for m in models for p in m.parameters())
    with torch.no_grad():
        a = pm(_batch(lengths=(5,))[0]).logits
        b = materialize(models, long)(_batch(lengths=(5,))[0]).logits
    torch.testing.assert_close(a, b, atol=ATOL[torch.float32], rtol=0)


def test_export_round_trip_only_unique_layers(tmp_path):
    models = _models("qwen2")
    out = export(models, PATH, tmp_path / "path")
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
        layer_ids = {k.split(".layers.")[1].split(".")[0] for k in f.keys() if ".layers." in k}
    assert len(layer_ids) == len(PATH.unique_layers()) == 6
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "fastmerge_path" and len(cfg["hops"]) == len(PATH)
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(loaded, PathModel)
    ids, mask = _batch()
    with torch.no_grad():
        a = PathModel(models, PATH)(input_ids=ids, attention_mask=mask).logits
        b = loaded(input_ids=ids, attention_mask=mask).logits
        g1 = PathModel(models, PATH).generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        g2 = loaded.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    keep = mask.bool()
    torch.testing.assert_close(a[keep], b[keep], atol=ATOL[torch.float32], rtol=0)
    assert torch.equal(g1, g2)


def test_export_bf16_reloads_in_bf16(tmp_path):
    for i, m in enumerate(_models("llama")):
        m.to(torch.bfloat16).save_pretrained(tmp_path / f"m{i}")
    models = [AutoModelForCausalLM.from_pretrained(tmp_path / f"m{i}").eval() for i in range(2)]
    assert models[0].dtype == torch.bfloat16
    out = export(models, PATH, tmp_path / "path")
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.dtype == torch.bfloat16
    ids, _ = _batch(lengths=(8,))
    with torch.no_grad():
        a, b = PathModel(models, PATH)(ids).logits, loaded(ids).logits
    torch.testing.assert_close(a.float(), b.float(), atol=0, rtol=0)


def test_export_plain_is_a_standard_model(tmp_path):
    models = _models("mistral")
    unit = LayerPath([Hop(h.model, h.layer, 1.0) for h in PATH])
    out = export(models, unit, tmp_path / "plain", plain=True)
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded).__name__ == "MistralForCausalLM" and loaded.config.num_hidden_layers == len(unit)
    ids, mask = _batch()
    with torch.no_grad():
        a = PathModel(models, unit)(input_ids=ids, attention_mask=mask).logits
        b = loaded(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], atol=ATOL[torch.float32], rtol=0)
    with pytest.raises(FastmergeError, match="hop 1 has scale 0.8"):
        export(models, PATH, tmp_path / "bad", plain=True)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(FastmergeError, match="exists"):
        export(models, unit, tmp_path / "plain", plain=True)


def test_cli_dfs_export(tmp_path, capsys):
    dirs = []
    for i, m in enumerate(_models("llama")):
        m.save_pretrained(tmp_path / f"m{i}")
        dirs.append(str(tmp_path / f"m{i}"))
    pfile = PATH.save(tmp_path / "best.path.json", models=dirs)
    assert LayerPath.load(pfile) == PATH
    assert cli_main(["dfs", "export", str(pfile), str(tmp_path / "out")]) == 0
    assert "7 hops over 2 models" in capsys.readouterr().out
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids, _ = _batch(lengths=(6,))
    with torch.no_grad():
        ref = PathModel([AutoModelForCausalLM.from_pretrained(d) for d in dirs], PATH)(ids).logits
        torch.testing.assert_close(loaded(ids).logits, ref, atol=ATOL[torch.float32], rtol=0)
    assert cli_main(["dfs", "export", str(pfile), str(tmp_path / "out")]) == 2
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize("hops,match", [
    ([], "empty"),
    ([(2, 0)], "model 2, but 2 models"),
    ([(0, 3)], "layer 3 of model 0, which has 3 layers"),
    ([(0, -1)], "layer -1"),
    ([(0, 0, float("nan"))], "non-finite"),
    ([(0,)], "bad hop"),
    (["x"], "bad hop"),
])
def test_bad_paths(hops, match):
    models = _models("llama")
    with pytest.raises(FastmergeError, match=match):
        PathModel(models, hops)


def test_incompatible_models():
    torch.manual_seed(0)
    llama = AutoModelForCausalLM.from_config(_config("llama"))
    with pytest.raises(FastmergeError, match="hidden sizes differ"):
        PathModel([llama, AutoModelForCausalLM.from_config(_config("llama", hidden=64))], [(0, 0)])
    with pytest.raises(FastmergeError, match="different families"):
        PathModel([llama, AutoModelForCausalLM.from_config(_config("mistral"))], [(0, 0)])
    with pytest.raises(FastmergeError, match="head 2"):
        PathModel([llama], [(0, 0)], head=2)


def test_bad_path_file(tmp_path):
    f = tmp_path / "p.json"
    f.write_text("{not json")
    with pytest.raises(FastmergeError, match="p.json: path file is not valid JSON"):
        LayerPath.load(f)
    f.write_text(json.dumps({"hops": [[0, "a"]]}))
    with pytest.raises(FastmergeError, match="p.json: layer path: bad hop"):
        LayerPath.load(f)
    with pytest.raises(FastmergeError, match="missing.json: path file not found"):
        LayerPath.load(tmp_path / "missing.json")


# --------------------------------------------------------------------------------------------- genome


def test_genome_layout_and_paper_init():
    g = DFSGenome([4, 3], repetitions=3)
    m = 7
    assert g.num_slots == m * 3 and g.size == m * 3 + m * m
    path = g.decode(g.x0())
    assert [(h.model, h.layer) for h in path] == [(0, 0), (0, 1), (0, 2), (0, 3)]  # A's layers, once
    assert path.scales == [1.0, 1.0, 1.0, 1.0]  # W at x0 decodes to scale 1
    g2 = DFSGenome([4, 3], head=1)
    assert [(h.model, h.layer) for h in g2.decode(g2.x0())] == [(1, 0), (1, 1), (1, 2)]


def test_genome_decode_indicator_scales_and_ends():
    g = DFSGenome([3, 3], repetitions=2, scale_range=(0.5, 1.5))
    x = np.zeros(g.size)
    m = 6
    x[4] = 0.9  # slot 4 -> model 1 layer 1, repetition 0
    x[m + 1] = 0.9  # slot 7 -> model 0 layer 1, repetition 1
    x[m + 0] = 0.9  # model 0 layer 0: fixed at the start, so its slot is ignored
    w = x[g.num_slots:].reshape(m, m)
    w[0, 4] = 1.0  # A0 -> B1: scale 1.5
    w[4, 1] = 0.25  # B1 -> A1: scale 0.75
    w[1, 2] = 0.5  # A1 -> A2 (fixed end): scale 1.0
    path = g.decode(x)
    assert [(h.model, h.layer, h.scale) for h in path] == [(0, 0, 1.0), (1, 1, 1.5), (0, 1, 0.75), (0, 2, 1.0)]
    free = DFSGenome([3, 3], repetitions=2, fix_ends=False)
    assert [(h.model, h.layer) for h in free.decode(x)] == [(1, 1), (0, 0), (0, 1)]
    assert [(h.model, h.layer) for h in free.decode(np.zeros(free.size))] == [(0, 0)]  # never empty


def test_genome_random_genomes_decode_to_runnable_paths():
    models = _models("llama", layers=3)
    g = DFSGenome([3, 3], repetitions=3)
    rng = np.random.default_rng(0)
    pm = PathModel(models, g.decode(g.x0()))
    ids, _ = _batch(lengths=(5,))
    for _ in range(5):
        path = g.decode(rng.uniform(size=g.size))
        assert path[0] == Hop(0, 0, 1.0) and (path[-1].model, path[-1].layer) == (0, 2)
        assert all(0.0 <= h.scale <= 2.0 for h in path)
        pm.set_path(path)
        with torch.no_grad():
            assert torch.isfinite(pm(ids).logits).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(layers=[3, 0]), "at least one layer"),
    (dict(layers=[3, 3], head=2), "head 2"),
    (dict(layers=[3], repetitions=0), "repetitions"),
    (dict(layers=[3], scale_range=(1.0, 1.0)), "scale_range"),
    (dict(layers=[3], init="zeros"), "init"),
])
def test_genome_bad_options(kwargs, match):
    with pytest.raises(FastmergeError, match=match):
        DFSGenome(**kwargs)
    with pytest.raises(FastmergeError, match="expected 12 genes"):
        DFSGenome([3], repetitions=1).decode(np.zeros(5))
