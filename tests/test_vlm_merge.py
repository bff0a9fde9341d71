"""Merging the language model inside a LLaVA-style VLM with text LLMs (fastmerge.vlm), on disk and
in memory, for both on-disk namings: the merged VLM's language model equals the text-only merge of
the same tensors bit for bit (same DARE masks), its vision side equals the source's, and it loads
and generates from an image."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import fastmerge
from fastmerge.cli import main
from fastmerge.merger import Genome, Merger
from fastmerge.synth_vlm import make_vlm_family

from .test_merge import load_dir

#: on-disk prefix of the language model -> the text model's, per naming (written out here, apart
#: from fastmerge.vlm's table, so the test checks the mapping rather than repeating it)
LM_PREFIXES = {"legacy": (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")),
               "v5": (("model.language_model.", "model."), ("lm_head.", "lm_head.")),
               "mixed": (("model.language_model.model.", "model."), ("language_model.lm_head.", "lm_head."))}


def split_vlm(state: dict, naming: str) -> tuple[dict, dict]:
    """(language model under text names, everything else) of a VLM checkpoint's tensors."""
    lm, rest = {}, {}
    for k, v in state.items():
        for disk, text in LM_PREFIXES[naming]:
            if k.startswith(disk):
                lm[text + k[len(disk):]] = v
                break
        else:
            rest[k] = v
    return lm, rest


@pytest.fixture(scope="module", params=["legacy", "v5", "mixed"])
def fam(request, tmp_path_factory):
    """A tiny LLaVA (naming per param), the text base, a text fine-tune, and ``lm``: the VLM's
    language model extracted as a text checkpoint (the base's config and tokenizer)."""
    root = tmp_path_factory.mktemp(f"vlm-{request.param}")
    out = make_vlm_family(root, naming=request.param)
    lm_dir = root / "lm"
    lm_dir.mkdir()
    lm, _ = split_vlm(load_dir(out["vlm"]), request.param)
    save_file(lm, lm_dir / "model.safetensors", metadata={"format": "pt"})
    for f in out["base"].iterdir():
        if not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, lm_dir / f.name)
    return {"naming": request.param, "base": out["base"], "vlm": out["vlm"], "text": out["text"][0], "lm": lm_dir}


def copy_with_tensors(src: Path, dst: Path, state: dict) -> Path:
    """A copy of checkpoint ``src`` (config, processor, tokenizer) whose tensors are ``state``, in one file."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "model.safetensors.index.json"))
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def recipes(fam, method: str, vlm_key: str = "vlm") -> dict:
    """A recipe of ``method`` over the VLM (or, with ``vlm_key="lm"``, its extracted language model)
    and the text fine-tune, over the text base where the method takes one."""
    v, t, b = str(fam[vlm_key]), str(fam["text"]), str(fam["base"])
    if method == "linear":
        return {"merge_method": "linear", "models": [{"model": v, "parameters": {"weight": 0.6}},
                                                      {"model": t, "parameters": {"weight": 0.4}}]}
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": v, "models": [{"model": v}, {"model": t}],
                "parameters": {"t": [0.2, 0.7]}}
    params = {"ties": ({"weight": 0.7, "density": 0.6}, {"weight": 0.5, "density": 0.8}),
              "dare_ties": ({"weight": 0.7, "density": 0.5}, {"weight": 0.5, "density": 0.6}),
              "della": ({"weight": 0.7, "density": 0.6, "epsilon": 0.1}, {"weight": 0.5, "density": 0.7,
                                                                          "epsilon": 0.1})}[method]
    return {"merge_method": method, "base_model": b, "random_seed": 5,
            "models": [{"model": v, "parameters": params[0]}, {"model": t, "parameters": params[1]}]}


@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties", "slerp", "della"])
def test_language_model_equals_the_text_merge(fam, tmp_path, method):
    fastmerge.merge(recipes(fam, method), tmp_path / "vlm_out")
    fastmerge.merge(recipes(fam, method, "lm"), tmp_path / "text_out")
    merged = load_dir(tmp_path / "vlm_out")
    text = load_dir(tmp_path / "text_out")
    source = load_dir(fam["vlm"])
    assert set(merged) == set(source)  # the VLM's own naming, every tensor
    lm, rest = split_vlm(merged, fam["naming"])
    assert set(lm) == set(text)
    for name, t in text.items():
        assert torch.equal(lm[name], t), name  # bit-exact, the same DARE / DELLA masks
    _, src_rest = split_vlm(source, fam["naming"])
    assert rest and set(rest) == set(src_rest)
    for name, t in src_rest.items():  # vision tower and projector carried unchanged
        assert torch.equal(rest[name], t), name
    # the language model did change (not a copy of the VLM's)
    src_lm, _ = split_vlm(source, fam["naming"])
    assert any(not torch.equal(lm[k], src_lm[k]) for k in lm)


def test_output_is_the_vlm_and_generates_from_an_image(fam, tmp_path):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = tmp_path / "out"
    fastmerge.merge(recipes(fam, "dare_ties"), out)
    cfg = json.loads((out / "config.json").read_text())
    src = json.loads((fam["vlm"] / "config.json").read_text())
    assert cfg["model_type"] == "llava" and cfg["vision_config"] == src["vision_config"]
    assert cfg["text_config"]["num_hidden_layers"] == src["text_config"]["num_hidden_layers"]
    for f in ("processor_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (out / f).exists(), f
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    processor = AutoProcessor.from_pretrained(out)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "w1 w2"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert ids.shape[1] == inputs["input_ids"].shape[1] + 4
    processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:])
    # what it loaded is what was written (legacy names converted by transformers)
    written = load_dir(out)
    lm, _ = split_vlm(written, fam["naming"])
    state = model.state_dict()
    assert torch.equal(state["model.language_model.layers.1.mlp.up_proj.weight"], lm["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(state["lm_head.weight"], lm["lm_head.weight"])


def test_in_place_merger_equals_the_disk_merge(fam, tmp_path):
    from transformers import AutoModelForImageTextToText

    r = recipes(fam, "dare_ties")
    merger = Merger(r)
    assert type(merger.module).__name__ == "LlavaForConditionalGeneration"
    # the vision side is loaded once, into the module: not kept as a source beside it
    assert all(name.startswith(("model.", "lm_head.")) for _, name in merger._sources)
    assert not any("vision" in name or "projector" in name for _, name in merger._sources)
    fastmerge.merge(r, tmp_path / "out")
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    mem, disk = merger.module.state_dict(), loaded.state_dict()
    assert set(mem) == set(disk)
    for name, t in disk.items():
        assert torch.equal(mem[name], t), name
    pixels = torch.randn(1, 3, 32, 32)
    ids = torch.tensor([[1, 4] + [4] * 15 + [9, 10, 2]])  # USER: <image> x16 w.. ASSISTANT:
    with torch.no_grad():
        torch.testing.assert_close(merger.module(input_ids=ids, pixel_values=pixels).logits,
                                   loaded(input_ids=ids, pixel_values=pixels).logits, rtol=0, atol=0)
    # candidates: in place, the vision side untouched, the language model changed
    vision = {k: v.clone() for k, v in mem.items() if "vision_tower" in k or "projector" in k}
    ptrs = merger.storage()
    before = mem["model.language_model.layers.0.mlp.up_proj.weight"].clone()
    merger.merge(Genome(weights=[0.2, 1.1], densities=[0.9, 0.3]))
    after = merger.module.state_dict()
    assert merger.storage() == ptrs
    assert all(torch.equal(after[k], v) for k, v in vision.items())
    assert not torch.equal(after["model.language_model.layers.0.mlp.up_proj.weight"], before)


def test_text_frame_writes_the_text_merge(fam, tmp_path):
    """``frame_model`` names the output's checkpoint: a text model's gives the text merge alone."""
    r = recipes(fam, "dare_ties")
    fastmerge.merge({**r, "frame_model": str(fam["base"])}, tmp_path / "text_frame")
    fastmerge.merge(recipes(fam, "dare_ties", "lm"), tmp_path / "text_out")
    got, want = load_dir(tmp_path / "text_frame"), load_dir(tmp_path / "text_out")
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads((tmp_path / "text_frame" / "config.json").read_text())["model_type"] == "mistral"
    mem = Merger({**r, "frame_model": str(fam["base"])}).module  # in memory: the text model's class
    assert type(mem).__name__ == "MistralForCausalLM"
    assert all(torch.equal(mem.state_dict()[k], want[k]) for k in want)
    # and the VLM named explicitly is the default
    fastmerge.merge({**r, "frame_model": str(fam["vlm"])}, tmp_path / "explicit")
    fastmerge.merge(r, tmp_path / "default")
    a, b = load_dir(tmp_path / "explicit"), load_dir(tmp_path / "default")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------- errors


def cli_error(recipe: dict, tmp_path: Path, capsys) -> str:
    path = tmp_path / "recipe.yml"
    path.write_text(json.dumps(recipe))
    capsys.readouterr()  # what building the models printed
    assert main(["merge", str(path), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
    return err


def test_hidden_size_mismatch_is_one_line(fam, tmp_path, capsys):
    from fastmerge.synth import ModelSpec, make_family

    small = make_family(tmp_path / "small", ModelSpec(arch="mistral", hidden=32, vocab=49), finetunes=0)[0]
    r = {"merge_method": "linear", "models": [{"model": str(fam["vlm"]), "parameters": {"weight": 0.5}},
                                              {"model": str(small), "parameters": {"weight": 0.5}}]}
    err = cli_error(r, tmp_path, capsys)
    assert "hidden sizes differ" in err and str(fam["vlm"]) in err and str(small) in err, err


def test_frame_model_must_be_a_source(fam, tmp_path, capsys):
    r = {**recipes(fam, "ties"), "frame_model": str(fam["lm"])}
    err = cli_error(r, tmp_path, capsys)
    assert "frame_model" in err and str(fam["lm"]) in err, err


def test_vlm_without_language_model_tensors(fam, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    state = {"foo." + k: v for k, v in load_dir(fam["vlm"]).items()}
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(fam["vlm"] / "config.json", broken / "config.json")
    r = {"merge_method": "linear", "models": [{"model": str(broken), "parameters": {"weight": 0.5}},
                                              {"model": str(fam["text"]), "parameters": {"weight": 0.5}}]}
    err = cli_error(r, tmp_path, capsys)
    assert str(broken) in err and "no language-model tensors" in err, err


def test_missing_language_model_tensor_names_it(fam, tmp_path, capsys):
    part = tmp_path / "part"
    part.mkdir()
    state = load_dir(fam["vlm"])
    dropped = next(k for k in state if "layers.1.mlp.down_proj" in k)
    del state[dropped]
    save_file(state, part / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(fam["vlm"] / "config.json", part / "config.json")
    err = cli_error({**recipes(fam, "ties"), "models": [{"model": str(part), "parameters": {"weight": 1.0,
                                                                                          "density": 0.5}}]},
                    tmp_path, capsys)
    assert str(part) in err and "layers.1.mlp.down_proj" in err, err


def test_evolve_config_refuses_dfs_and_vllm_over_a_vlm(fam, tmp_path):
    from fastmerge.errors import FastmergeError
    from fastmerge.evolve_config import EvolveConfig

    cfg = {"models": [str(fam["vlm"]), str(fam["text"])], "space": "dfs", "evaluator": {"name": "loglik"},
           "metric": "loglik", "budget": {"trials": 4}, "out": str(tmp_path / "run")}
    with pytest.raises(FastmergeError, match="DFS over a VLM's language model is not supported"):
        EvolveConfig.from_yaml(cfg)
    with pytest.raises(FastmergeError, match="DFS over a VLM's language model is not supported"):
        EvolveConfig.from_yaml({**cfg, "space": "ps+dfs", "base_model": str(fam["base"]),
                                "merge_method": "ties", "dfs": {"models": [str(fam["text"])]}})
    with pytest.raises(FastmergeError, match="eval_backend: vllm"):
        EvolveConfig.from_yaml({**cfg, "space": "ps", "base_model": str(fam["base"]), "merge_method": "ties",
                                "eval_backend": "vllm"})
    # PS over the VLM is a valid config (its layer count from text_config)
    ok = EvolveConfig.from_yaml({**cfg, "space": "ps", "merge_method": "linear"})
    assert ok.ps_num_genes(2) == 2


# ----------------------------------------------------------------------------------------- evolve


class ImageFitness:
    """A VQA-shaped evaluator for the evolve test: it asks for the processor (``takes_processor``),
    runs the live VLM on an image through the chat template and scores one answer token."""

    takes_processor = True

    def __call__(self, model, processor) -> dict:
        from PIL import Image

        assert type(model).__name__ == "LlavaForConditionalGeneration"
        image = Image.fromarray(np.full((32, 32, 3), 128, dtype=np.uint8))
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "w3"}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        logits = model(**inputs).logits[0, -1].float()
        return {"score": float(logits.log_softmax(-1)[processor.tokenizer.convert_tokens_to_ids("w7")]),
                "n": 1}


#: what the evolve config names (an evaluator with no arguments is the callable itself)
image_fitness = ImageFitness()


def test_evolve_ps_over_a_vlm_runs_and_resumes(fam, tmp_path):
    if fam["naming"] != "legacy":
        pytest.skip("one naming is enough for the search loop")
    from fastmerge.evolve import evolve, read_trials

    cfg = {"models": [str(fam["vlm"]), str(fam["text"])], "base_model": str(fam["base"]), "merge_method": "ties",
           "evaluator": {"name": "tests.test_vlm_merge:image_fitness"}, "metric": "score",
           "ps": {"group_size": 1},  # one gene set per layer: best.yml is written as slices
           "budget": {"generations": 2}, "cma": {"popsize": 4, "seed": 1}, "out": str(tmp_path / "run")}
    first = evolve(cfg, materialize=True)
    assert "slices" in (tmp_path / "run" / "ps" / "best.yml").read_text()
    ps = first.best
    assert ps.trials == 8 and np.isfinite(ps.best_fitness)
    assert (ps.model_dir / "processor_config.json").exists()
    # the materialized best is the VLM the search scored
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(ps.model_dir).eval()
    with torch.no_grad():
        again = ImageFitness()(model, AutoProcessor.from_pretrained(ps.model_dir))
    assert again["score"] == ps.best_fitness  # the same bits: best.yml rebuilds what Merger scored
    resumed = evolve({**cfg, "budget": {"generations": 3}}, resume=True)
    assert resumed.best.trials == 12
    rows = read_trials(tmp_path / "run" / "ps" / "trials.jsonl")
    assert [r["trial"] for r in rows] == list(range(12))


def test_larger_vlm_vocabulary_merges_the_common_rows(fam, tmp_path):
    """LLaVA-1.6-Mistral's 32064 rows against Mistral's 32000: the common rows merged as the text
    merge merges them, the VLM's extra rows (its image token) carried, its vocab_size kept."""
    from transformers import AutoModelForImageTextToText

    state = load_dir(fam["vlm"])
    g = torch.Generator().manual_seed(0)
    for k in list(state):
        if k.endswith(("embed_tokens.weight", "lm_head.weight")):
            state[k] = torch.cat([state[k], 0.02 * torch.randn(3, state[k].shape[1], generator=g)])
    big = copy_with_tensors(fam["vlm"], tmp_path / "big", state)
    cfg = json.loads((big / "config.json").read_text())
    cfg["text_config"]["vocab_size"] += 3
    (big / "config.json").write_text(json.dumps(cfg))
    r = recipes(fam, "dare_ties")
    r["models"][0]["model"] = str(big)
    with pytest.warns(UserWarning, match="vocabulary sizes differ"):
        fastmerge.merge(r, tmp_path / "out")
    fastmerge.merge(recipes(fam, "dare_ties", "lm"), tmp_path / "text_out")
    lm, _ = split_vlm(load_dir(tmp_path / "out"), fam["naming"])
    text = load_dir(tmp_path / "text_out")
    src, _ = split_vlm(state, fam["naming"])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        n = text[name].shape[0]
        assert lm[name].shape[0] == n + 3
        assert torch.equal(lm[name][:n], text[name]), name
        assert torch.equal(lm[name][n:], src[name][n:]), name
    assert json.loads((tmp_path / "out" / "config.json").read_text())["text_config"]["vocab_size"] == n + 3
    AutoModelForImageTextToText.from_pretrained(tmp_path / "out")


def test_two_vlms_merge_their_vision_side_too(fam, tmp_path):
    """Every model a VLM (two LLaVAs): the vision tower and projector are merged like the rest, as
    mergekit merges every tensor; with a text model among them they are the frame's."""
    a = load_dir(fam["vlm"])
    g = torch.Generator().manual_seed(1)
    b = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in a.items()}
    other = copy_with_tensors(fam["vlm"], tmp_path / "other", b)
    r = {"merge_method": "linear", "models": [{"model": str(fam["vlm"]), "parameters": {"weight": 0.5}},
                                              {"model": str(other), "parameters": {"weight": 0.5}}]}
    fastmerge.merge(r, tmp_path / "out")
    merged = load_dir(tmp_path / "out")
    assert set(merged) == set(a)
    for k in merged:
        torch.testing.assert_close(merged[k], (a[k] + b[k]) / 2, rtol=1e-5, atol=1e-6)


def test_llava_next(fam, tmp_path):
    """LLaVA-NeXT (LLaVA-1.6's class): its language model merged as LLaVA's, ``image_newline`` and
    the vision side carried, the output of its class."""
    from transformers import (
        AutoModelForImageTextToText,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

    from fastmerge.synth_vlm import rename_to

    llava = LlavaForConditionalGeneration.from_pretrained(fam["vlm"])
    cfg = LlavaNextConfig(vision_config=llava.config.vision_config, text_config=llava.config.text_config,
                          image_grid_pinpoints=[[32, 32], [32, 64]], image_token_index=4, vision_feature_layer=-1)
    torch.manual_seed(0)
    nxt = LlavaNextForConditionalGeneration(cfg)
    nxt.model.language_model.load_state_dict(llava.model.language_model.state_dict())
    nxt.lm_head.load_state_dict(llava.lm_head.state_dict())
    nxt.save_pretrained(tmp_path / "next")
    rename_to(tmp_path / "next", fam["naming"])
    source = load_dir(tmp_path / "next")
    assert ("image_newline" if fam["naming"] == "legacy" else "model.image_newline") in source
    r = recipes(fam, "dare_ties")
    r["models"][0]["model"] = str(tmp_path / "next")
    fastmerge.merge(r, tmp_path / "out")
    fastmerge.merge(recipes(fam, "dare_ties", "lm"), tmp_path / "text_out")
    merged, text = load_dir(tmp_path / "out"), load_dir(tmp_path / "text_out")
    assert set(merged) == set(source)
    lm, rest = split_vlm(merged, fam["naming"])
    assert all(torch.equal(lm[k], text[k]) for k in text)
    assert all(torch.equal(v, source[k]) for k, v in rest.items())
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    assert type(model).__name__ == "LlavaNextForConditionalGeneration"
    assert torch.equal(model.model.image_newline, source[next(k for k in source if k.endswith("image_newline"))])


def test_passthrough_stacks_layers_into_the_vlm(fam, tmp_path):
    from transformers import AutoModelForImageTextToText

    r = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(fam["vlm"]), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(fam["text"]), "layer_range": [1, 2]}]}]}
    fastmerge.merge(r, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "llava" and cfg["text_config"]["num_hidden_layers"] == 3
    lm, rest = split_vlm(load_dir(tmp_path / "out"), fam["naming"])
    text = load_dir(fam["text"])
    for k in text:
        if k.startswith("model.layers.1."):
            assert torch.equal(lm[k.replace("layers.1.", "layers.2.")], text[k]), k
    _, src_rest = split_vlm(load_dir(fam["vlm"]), fam["naming"])
    assert set(rest) == set(src_rest)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    assert model.config.text_config.num_hidden_layers == 3
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 9, 10, 2]]))


def test_union_tokenizer_moves_the_image_token(fam, tmp_path):
    """A text base whose tokenizer lacks ``<image>``: the union vocabulary appends it, the VLM's
    ``image_token_index`` follows it, and the output still runs on an image."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from fastmerge.synth import word_tokenizer
    from fastmerge.synth_vlm import WORDS

    base2 = tmp_path / "base2"
    shutil.copytree(fam["base"], base2)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (base2 / f).unlink(missing_ok=True)
    word_tokenizer([w for w in WORDS if w != "<image>"] + ["w40"]).save_pretrained(base2)
    r = recipes(fam, "dare_ties")
    r["base_model"] = str(base2)
    r["tokenizer_source"] = "union"
    fastmerge.merge(r, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    processor = AutoProcessor.from_pretrained(tmp_path / "out")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert cfg["image_token_index"] == image_id == 49 and cfg["text_config"]["vocab_size"] == 50
    merged, _ = split_vlm(load_dir(tmp_path / "out"), fam["naming"])
    assert merged["model.embed_tokens.weight"].shape[0] == merged["lm_head.weight"].shape[0] == 50
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "w1"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=Image.new("RGB", (32, 32)), text=prompt, return_tensors="pt")
    assert (inputs["input_ids"] == 49).sum() == 16
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)


def test_sparse_hub_text_config(fam, tmp_path):
    """A hub LLaVA's text_config leaves the text model's defaults out (no num_hidden_layers, no
    hidden_size): the layer count comes from the checkpoint, for merges and for evolve configs."""
    from fastmerge.evolve_config import EvolveConfig
    from fastmerge.plan import model_num_layers

    sparse = tmp_path / "sparse"
    shutil.copytree(fam["vlm"], sparse)
    cfg = json.loads((sparse / "config.json").read_text())
    cfg["text_config"] = {k: cfg["text_config"][k] for k in ("model_type", "vocab_size", "intermediate_size")}
    (sparse / "config.json").write_text(json.dumps(cfg))
    assert model_num_layers(sparse) == 2
    r = recipes(fam, "ties")
    r["models"][0]["model"] = str(sparse)
    fastmerge.merge(r, tmp_path / "out")
    fastmerge.merge(recipes(fam, "ties"), tmp_path / "full")
    a, b = load_dir(tmp_path / "out"), load_dir(tmp_path / "full")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())["text_config"]
    assert out_cfg["num_hidden_layers"] == 2 and "hidden_size" not in out_cfg
    ev = EvolveConfig.from_yaml({"models": [str(sparse), str(fam["text"])], "merge_method": "linear",
                                 "evaluator": {"name": "loglik"}, "metric": "loglik", "ps": {"group_size": 1},
                                 "budget": {"trials": 4}, "out": str(tmp_path / "run")})
    from fastmerge.evolve import ps_space

    assert ps_space(ev).num_layers == 2 and ev.ps_num_genes(2) == 4


def test_layer_count_mismatch_names_the_models(fam, tmp_path, capsys):
    from fastmerge.synth import ModelSpec, make_family

    deep = make_family(tmp_path / "deep", ModelSpec(arch="mistral", layers=4, vocab=49), finetunes=0)[0]
    r = {"merge_method": "linear", "models": [{"model": str(fam["vlm"]), "parameters": {"weight": 0.5}},
                                              {"model": str(deep), "parameters": {"weight": 0.5}}]}
    err = cli_error(r, tmp_path, capsys)
    assert "different layer counts" in err and f"{fam['vlm']}: 2" in err and f"{deep}: 4" in err, err


def test_flat_naming(fam, tmp_path):
    """The third naming (Qwen2-VL's older checkpoints): the language model at the top level as a
    text model's (``model.layers.N...``, ``lm_head``), the vision side beside it."""
    if fam["naming"] != "legacy":
        pytest.skip("made from the legacy checkpoint")
    flat = tmp_path / "flat"
    flat.mkdir()
    lm, rest = split_vlm(load_dir(fam["vlm"]), "legacy")
    save_file({**lm, **rest}, flat / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(fam["vlm"] / "config.json", flat / "config.json")
    r = recipes(fam, "dare_ties")
    r["models"][0]["model"] = str(flat)
    fastmerge.merge(r, tmp_path / "out")
    fastmerge.merge(recipes(fam, "dare_ties", "lm"), tmp_path / "text_out")
    merged, text = load_dir(tmp_path / "out"), load_dir(tmp_path / "text_out")
    assert set(merged) == set(lm) | set(rest)
    assert all(torch.equal(merged[k], text[k]) for k in text)
    assert all(torch.equal(merged[k], rest[k]) for k in rest)
    # in memory: the names map to the module's (model.language_model.*, model.vision_tower.*)
    mem = Merger(r).module.state_dict()
    assert torch.equal(mem["model.language_model.layers.1.mlp.up_proj.weight"], text["model.layers.1.mlp.up_proj.weight"])
    vision = next(k for k in rest if k.startswith("vision_tower."))
    assert torch.equal(mem["model." + vision], rest[vision])


def test_evolve_ps_over_a_vlm_with_the_vqa_evaluator(fam, tmp_path):
    """The issue's acceptance: an evolve run over a tiny VLM scored by the VQA evaluator (ROUGE-L,
    language gate) runs end to end and resumes; the evaluator gets the VLM's processor from the run."""
    if fam["naming"] != "legacy":
        pytest.skip("one naming is enough for the search loop")
    pytest.importorskip("fugashi")
    from PIL import Image

    from fastmerge.evolve import evolve, read_trials

    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    lines = []
    for i, (q, a, colour) in enumerate([("w1 w2", "w1 w3", (255, 0, 0)), ("w4", "w5 w6", (0, 255, 0)),
                                        ("w7 w8", "w1", (0, 0, 255))]):
        Image.new("RGB", (32, 32), colour).save(data / "img" / f"{i}.png")
        lines.append(json.dumps({"image": f"img/{i}.png", "question": q, "answer": a}))
    (data / "vqa.jsonl").write_text("\n".join(lines) + "\n")
    cfg = {"models": [str(fam["vlm"]), str(fam["text"])], "base_model": str(fam["base"]),
           "merge_method": "dare_ties", "metric": "rouge_l_ungated",
           "evaluator": {"name": "vqa", "data": str(data / "vqa.jsonl"), "lang": "ja", "max_new_tokens": 4,
                         "batch_size": 3},
           "budget": {"generations": 1}, "cma": {"popsize": 4, "seed": 2}, "out": str(tmp_path / "run")}
    first = evolve(cfg)
    assert first.best.trials == 4 and np.isfinite(first.best.best_fitness)
    resumed = evolve({**cfg, "budget": {"generations": 2}}, resume=True)
    assert resumed.best.trials == 8
    rows = read_trials(tmp_path / "run" / "ps" / "trials.jsonl")
    assert [r["trial"] for r in rows] == list(range(8))
    assert set(rows[0]["metrics"]) >= {"score", "rouge_l", "rouge_l_ungated", "acc_lang", "n"}


@pytest.mark.interpreter
def test_triton_merger_on_a_vlm_equals_the_cpu_merger(fam):
    """The grouped Triton launch (under the interpreter here) keys DARE masks by the text names too."""
    pytest.importorskip("triton")
    if fam["naming"] != "legacy":
        pytest.skip("one naming is enough")
    r = recipes(fam, "dare_ties")
    want = Merger(r).module.state_dict()
    got = Merger(r, backend="triton").module.state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=k)


@pytest.mark.interpreter
def test_triton_streaming_merge_of_a_vlm_equals_the_cpu_merge(fam, tmp_path):
    """The engine's accelerator path (DeviceRunner + kernel, interpreter here) on a VLM: the same
    masks (text-name keys) and the vision side carried."""
    pytest.importorskip("triton")
    if fam["naming"] != "legacy":
        pytest.skip("one naming is enough")
    r = recipes(fam, "dare_ties")
    fastmerge.merge(r, tmp_path / "cpu")
    fastmerge.merge(r, tmp_path / "triton", fastmerge.MergeOptions(backend="triton"))
    want, got = load_dir(tmp_path / "cpu"), load_dir(tmp_path / "triton")
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=k)


def test_names_convert_between_the_llava_namings():
    """``vlm.rename`` between the three LLaVA layouts, against names written out by hand as each
    layout stores them (transformers 5.24's save, 5's modules, 5.4's save), and ``naming_of`` tells
    them apart."""
    from fastmerge import vlm

    table = {
        "legacy": ["language_model.model.layers.0.self_attn.q_proj.weight", "language_model.model.embed_tokens.weight",
                   "language_model.lm_head.weight", "vision_tower.vision_model.post_layernorm.bias",
                   "multi_modal_projector.linear_1.weight", "image_newline"],
        "v5": ["model.language_model.layers.0.self_attn.q_proj.weight", "model.language_model.embed_tokens.weight",
               "lm_head.weight", "model.vision_tower.vision_model.post_layernorm.bias",
               "model.multi_modal_projector.linear_1.weight", "model.image_newline"],
        "mixed": ["model.language_model.model.layers.0.self_attn.q_proj.weight",
                  "model.language_model.model.embed_tokens.weight", "language_model.lm_head.weight",
                  "model.vision_tower.vision_model.post_layernorm.bias", "model.multi_modal_projector.linear_1.weight",
                  "model.image_newline"],
    }
    for src, names in table.items():
        assert vlm.naming_of(names, "x") == src
        for dst, want in table.items():
            assert [vlm.rename(n, src, dst) for n in names] == want, (src, dst)
