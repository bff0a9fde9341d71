"""The VQA evaluator on a tiny LLaVA (random weights, so the answers are arbitrary words): its answers
equal a manual ``model.generate`` per record through the processor and chat template, batched or
not; its metrics equal :mod:`fastmerge.rouge` applied to those answers; it runs on a live module
changed in place, on a checkpoint, from a spec and an evolve config, and as ``fastmerge eval --task
vqa``; bad data are one-line errors naming file:line."""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("fugashi")
Image = pytest.importorskip("PIL.Image")
ImageDraw = pytest.importorskip("PIL.ImageDraw")

from fastmerge import rouge, vqa  # noqa: E402
from fastmerge.cli import main  # noqa: E402
from fastmerge.errors import FastmergeError  # noqa: E402
from fastmerge.evaluate import evaluate_checkpoint, load_evaluator  # noqa: E402
from fastmerge.synth_vlm import make_vlm_family  # noqa: E402
from fastmerge.vqa import VQAEvaluator  # noqa: E402

#: (question, references, image colour, size); the references use the tiny vocabulary so that some
#: arbitrary answers share words with them (ROUGE-L > 0)
RECORDS = [
    ("w1 w2", ["w1 w25 w1", "w3"], (255, 0, 0), (40, 30)),
    ("w3 w4 w5 w6 w7", ["w25 w1 w26"], (0, 255, 0), (32, 32)),
    ("w8", ["w31 w15 w1"], (0, 0, 255), (50, 20)),
    ("w9 w10 w11", ["w6 w7"], (200, 200, 0), (24, 48)),
    ("w12", ["w1"], (10, 120, 240), (36, 36)),
]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_vlm_family(tmp_path_factory.mktemp("vlm"), text_finetunes=2)


@pytest.fixture(scope="module")
def vlm(family):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(family["vlm"], dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(family["vlm"])


def _draw(path: Path, colour, size) -> None:
    im = Image.new("RGB", size, colour)
    ImageDraw.Draw(im).rectangle([2, 2, size[0] // 2, size[1] // 2], fill=(255 - colour[0], 255, 255 - colour[2]))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


@pytest.fixture
def data(tmp_path) -> Path:
    """data/vqa.jsonl with images under data/img/, paths relative to the file."""
    root = tmp_path / "data"
    lines = []
    for i, (q, refs, colour, size) in enumerate(RECORDS):
        _draw(root / "img" / f"{i}.png", colour, size)
        rec = {"image": f"img/{i}.png", "question": q}
        rec.update({"answers": refs} if i % 2 == 0 else {"answer": refs[0]})
        lines.append(json.dumps(rec))
    (root / "vqa.jsonl").write_text("\n".join(lines) + "\n")
    return root / "vqa.jsonl"


def manual_answers(model, processor, data: Path, max_new_tokens: int) -> list[str]:
    """One ``model.generate`` per record, the way a user would write it."""
    out = []
    for line in data.read_text().splitlines():
        rec = json.loads(line)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": rec["question"]}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        image = Image.open(data.parent / rec["image"]).convert("RGB")
        enc = processor(images=[image], text=[prompt], return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens)
        out.append(processor.tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return out


def _refs(data: Path) -> list[list[str]]:
    recs = [json.loads(line) for line in data.read_text().splitlines()]
    return [r["answers"] if "answers" in r else [r["answer"]] for r in recs]


# ------------------------------------------------------------------------------------------------
# generation and metrics
# ------------------------------------------------------------------------------------------------


def test_answers_equal_manual_generate_batched_or_not(vlm, data):
    model, processor = vlm
    want = manual_answers(model, processor, data, max_new_tokens=6)
    assert any(want) and len(set(want)) > 1  # the records get different answers
    for bs in (1, 2, 5):
        ev = VQAEvaluator(data, lang="ja", batch_size=bs, max_new_tokens=6)
        ev(model, processor)
        assert [it["output"] for it in ev.last_outputs] == want, bs
        assert [it["question"] for it in ev.last_outputs] == [r[0] for r in RECORDS]


@pytest.mark.parametrize("lang", ["ja", "en", None])
def test_metrics_are_the_rouge_module_on_the_answers(vlm, data, lang):
    model, processor = vlm
    ev = VQAEvaluator(data, lang=lang, batch_size=2, max_new_tokens=6)
    metrics = ev(model, processor)
    outputs = [it["output"] for it in ev.last_outputs]
    assert metrics == rouge.score(outputs, _refs(data), lang)
    assert set(metrics) == ev.metric_names == set(vqa.METRICS)
    assert metrics["n"] == len(RECORDS) and metrics["score"] == metrics["rouge_l"]
    assert metrics["rouge_l_ungated"] > 0  # some words shared with the references
    for it, refs in zip(ev.last_outputs, _refs(data)):
        assert it["references"] == refs and it["rouge_l"] == rouge.rouge_l(it["output"], refs)
    if lang == "ja":  # "w1 w25 ..." is no Japanese: all gated to 0
        assert metrics["acc_lang"] == 0.0 and metrics["rouge_l"] == 0.0
    if lang is None:
        assert metrics["acc_lang"] == 1.0 and metrics["rouge_l"] == metrics["rouge_l_ungated"]


def test_progress_stop_and_template(vlm, data):
    model, processor = vlm
    calls = []
    ev = VQAEvaluator(data, batch_size=2, max_new_tokens=6, progress=lambda d, t: calls.append((d, t)))
    ev(model, processor)
    assert calls == [(2, 5), (4, 5), (5, 5)]
    plain = [it["output"] for it in ev.last_outputs]
    word = plain[0].split()[1]
    cut = VQAEvaluator(data, batch_size=2, max_new_tokens=6, stop=[word])
    cut(model, processor)
    assert [it["output"] for it in cut.last_outputs] == [o[:o.find(word)].strip() if word in o else o for o in plain]
    # a template written out by hand is the chat template's text: the same answers
    same = VQAEvaluator(data, batch_size=2, max_new_tokens=6, template="USER: <image> {question} ASSISTANT:")
    same(model, processor)
    assert [it["output"] for it in same.last_outputs] == plain


def test_processor_failure_is_one_line(vlm, data):
    model, processor = vlm
    ev = VQAEvaluator(data, batch_size=2, max_new_tokens=4, template="USER: {question} ASSISTANT:")  # no <image>
    with pytest.raises(FastmergeError) as e:
        ev(model, processor)
    assert str(e.value).startswith(f"{data}:") and "cannot encode this batch" in str(e.value)
    assert "\n" not in str(e.value)


def test_in_memory_records_with_pil_images(vlm, data):
    model, processor = vlm
    recs = [json.loads(line) for line in data.read_text().splitlines()]
    for r in recs:
        r["image"] = Image.open(data.parent / r["image"])
    ev = VQAEvaluator(recs, batch_size=3, max_new_tokens=6)
    ev(model, processor)
    assert [it["output"] for it in ev.last_outputs] == manual_answers(model, processor, data, 6)


def test_live_module_changed_in_place(family, data):
    """What the evolve loop does: one module whose language-model weights are rewritten between
    calls; the processor comes from the model's directory (plain tokenizer given) and loads once."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    model = AutoModelForImageTextToText.from_pretrained(family["vlm"], dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(family["vlm"])
    tok = AutoTokenizer.from_pretrained(family["vlm"])
    ev = VQAEvaluator(data, lang="ja", batch_size=2, max_new_tokens=6)
    before = ev(model, tok)
    first = [it["output"] for it in ev.last_outputs]
    assert first == manual_answers(model, processor, data, 6)
    with torch.no_grad():
        lm_params = [p for n, p in model.named_parameters() if "language_model" in n]
        g = torch.Generator().manual_seed(1)
        for p in lm_params:
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    after = ev(model, tok)
    second = [it["output"] for it in ev.last_outputs]
    assert second != first and second == manual_answers(model, processor, data, 6)
    assert after == rouge.score(second, _refs(data), "ja") and before == rouge.score(first, _refs(data), "ja")
    assert list(ev._processors) == [str(family["vlm"])]  # loaded once, kept


def test_processor_given_as_a_directory_or_missing(vlm, family, data, tmp_path):
    model, processor = vlm
    want = manual_answers(model, processor, data, 4)
    ev = VQAEvaluator(data, max_new_tokens=4, processor=str(family["vlm"]))
    ev(model, None)
    assert [it["output"] for it in ev.last_outputs] == want
    # a module with no directory behind it and a plain tokenizer: one line naming the fix
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    config = copy.deepcopy(model.config)
    config._name_or_path = ""
    bare = LlavaForConditionalGeneration(config).eval()
    text_tok = AutoTokenizer.from_pretrained(family["base"])  # a directory without an image processor
    with pytest.raises(FastmergeError, match="no processor.*processor: DIR"):
        VQAEvaluator(data, max_new_tokens=4)(bare, text_tok)
    # ... but the tokenizer of the VLM's directory leads to its processor
    ev = VQAEvaluator(data, max_new_tokens=4)
    ev(bare, processor.tokenizer)
    assert list(ev._processors) == [str(family["vlm"])]
    with pytest.raises(FastmergeError, match="no image processor in"):
        VQAEvaluator(data, max_new_tokens=4, processor=str(tmp_path))(model, None)


def test_not_a_vlm_is_refused(vlm, data, families):
    from fastmerge.backends import HFBackend

    model, processor = vlm
    ev = VQAEvaluator(data, max_new_tokens=4)
    with pytest.raises(FastmergeError, match="vision-language torch module"):
        ev(object(), processor)
    # the hf backend's live module is unwrapped
    ev(HFBackend(model, processor.tokenizer), processor)
    assert [it["output"] for it in ev.last_outputs] == manual_answers(model, processor, data, 4)


# ------------------------------------------------------------------------------------------------
# checkpoint, spec, evolve config, CLI
# ------------------------------------------------------------------------------------------------


def test_checkpoint_and_spec(vlm, family, data):
    model, processor = vlm
    spec = {"name": "vqa", "data": str(data), "lang": "ja", "max_new_tokens": 5, "batch_size": 2}
    ev = load_evaluator(spec)
    assert isinstance(ev, VQAEvaluator) and ev.lang == "ja" and ev.batch_size == 2 and ev.max_new_tokens == 5
    live = ev(model, processor)
    from_disk = evaluate_checkpoint(family["vlm"], spec)
    assert from_disk == live
    with pytest.raises(FastmergeError, match="hf backend"):
        evaluate_checkpoint(family["vlm"], spec, backend="vllm")
    with pytest.raises(FastmergeError, match="evaluator 'vqa'.*unexpected keyword"):
        load_evaluator({**spec, "bogus": 1})


def test_evolve_config_takes_the_vqa_evaluator(family, data, tmp_path):
    import yaml

    from fastmerge.evolve_config import BUILTIN_METRICS, EvolveConfig

    assert BUILTIN_METRICS["vqa"] == vqa.METRICS
    cfg_dir = data.parent
    cfg = {"models": [str(p) for p in family["text"]], "base_model": str(family["base"]),
           "merge_method": "task_arithmetic", "metric": "score", "budget": {"generations": 1},
           "evaluator": {"name": "vqa", "data": "vqa.jsonl", "lang": "ja", "max_new_tokens": 8, "batch_size": 4,
                         "processor": os.path.relpath(family["vlm"], cfg_dir)},  # both relative to the config
           "out": str(tmp_path / "out")}
    (cfg_dir / "evolve.yml").write_text(yaml.safe_dump(cfg))
    config = EvolveConfig.from_yaml(cfg_dir / "evolve.yml")
    assert config.evaluator["data"] == str(data.resolve())
    assert config.evaluator["processor"] == str(family["vlm"].resolve())
    ev = load_evaluator(config.evaluator)
    assert isinstance(ev, VQAEvaluator) and ev.max_new_tokens == 8
    (cfg_dir / "evolve.yml").write_text(yaml.safe_dump({**cfg, "metric": "acc"}))
    with pytest.raises(FastmergeError, match="metric: 'acc' is not reported by the 'vqa' evaluator"):
        EvolveConfig.from_yaml(cfg_dir / "evolve.yml")


def test_cli_eval_vqa(vlm, family, data, capsys, tmp_path):
    model, processor = vlm
    argv = ["eval", str(family["vlm"]), "--task", "vqa", "--data", str(data), "--lang", "ja", "--batch-size", "2",
            "--max-new-tokens", "5", "--no-progress"]
    assert main(argv + ["--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics == VQAEvaluator(data, lang="ja", max_new_tokens=5)(model, processor)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{family['vlm']}: score=") and "rouge_l_ungated=" in out and "acc_lang=" in out
    # a checkpoint saved without its processor: --tokenizer names the directory that has it
    bare = tmp_path / "weights_only"
    shutil.copytree(family["vlm"], bare)
    for f in ("processor_config.json", "preprocessor_config.json", "chat_template.jinja"):
        (bare / f).unlink(missing_ok=True)
    argv[1] = str(bare)
    assert main(argv + ["--json", "--tokenizer", str(family["vlm"])]) == 0
    assert json.loads(capsys.readouterr().out) == metrics


def _error(argv, capsys) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1, err
    return err


def test_cli_eval_vqa_errors(family, data, capsys):
    vlm_dir = str(family["vlm"])
    assert "--task vqa needs --data" in _error(["eval", vlm_dir, "--task", "vqa"], capsys)
    bad = data.parent / "bad.jsonl"
    bad.write_text(json.dumps({"image": "img/0.png", "question": "w1", "answers": ["w1"]}) + "\n"
                   + json.dumps({"image": "../outside.png", "question": "w1", "answers": ["w1"]}) + "\n")
    err = _error(["eval", vlm_dir, "--task", "vqa", "--data", str(bad)], capsys)
    assert f"{bad}:2: 'image' '../outside.png' leaves the data directory" in err
    err = _error(["eval", vlm_dir, "--task", "vqa", "--data", str(data), "--backend", "vllm"], capsys)
    assert "hf backend" in err
    err = _error(["eval", str(family["base"]), "--task", "vqa", "--data", str(data), "--no-progress"], capsys)
    assert "no image processor in" in err


# ------------------------------------------------------------------------------------------------
# bad data: one line naming file:line
# ------------------------------------------------------------------------------------------------

BAD = [
    ({"question": "q", "answers": ["a"]}, "'image' is missing"),
    ({"image": "", "question": "q", "answers": ["a"]}, "'image' must be a path"),
    ({"image": 3, "question": "q", "answers": ["a"]}, "'image' must be a path"),
    ({"image": "img/0.png", "answers": ["a"]}, "'question' is missing"),
    ({"image": "img/0.png", "question": 5, "answers": ["a"]}, "'question' is not a string"),
    ({"image": "img/0.png", "question": "q"}, "no reference answer"),
    ({"image": "img/0.png", "question": "q", "answers": []}, "'answers' must be a non-empty list of strings"),
    ({"image": "img/0.png", "question": "q", "answers": "a"}, "'answers' must be a non-empty list of strings"),
    ({"image": "img/0.png", "question": "q", "answers": ["a", 1]}, "'answers' must be a non-empty list of strings"),
    ({"image": "img/0.png", "question": "q", "answer": ["a"]}, "'answer' must be a string"),
    ({"image": "/etc/passwd", "question": "q", "answer": "a"}, "'image' '/etc/passwd' is an absolute path"),
    ({"image": "../data/img/0.png", "question": "q", "answer": "a"}, "leaves the data directory"),
    ({"image": "img/../../x.png", "question": "q", "answer": "a"}, "leaves the data directory"),
    ({"image": "img/missing.png", "question": "q", "answer": "a"}, "image not found: "),
    ({"image": "broken.png", "question": "q", "answer": "a"}, "cannot read image "),
    ({"image": "img", "question": "q", "answer": "a"}, "cannot read image "),
]


@pytest.mark.parametrize("rec,msg", BAD)
def test_bad_records(data, rec, msg):
    (data.parent / "broken.png").write_bytes(b"not a png at all")
    good = json.dumps({"image": "img/0.png", "question": "q", "answer": "a"})
    f = data.parent / "bad.jsonl"
    f.write_text(good + "\n\n" + json.dumps(rec) + "\n")
    with pytest.raises(FastmergeError) as e:
        VQAEvaluator(f)
    assert str(e.value).startswith(f"{f}:3: ") and msg in str(e.value) and "\n" not in str(e.value)


def test_the_first_bad_line_is_reported(data):
    f = data.parent / "bad.jsonl"
    f.write_text(json.dumps({"image": "img/missing.png", "question": "q", "answer": "a"}) + "\n"
                 + json.dumps({"image": "img/0.png", "answer": "a"}) + "\n")
    with pytest.raises(FastmergeError, match=f"^{f}:1: image not found"):
        VQAEvaluator(f)


def test_paths_inside_the_directory_are_fine(data):
    f = data.parent / "ok.jsonl"
    f.write_text(json.dumps({"image": "img/../img/./1.png", "question": "q", "answer": "a"}) + "\n")
    assert VQAEvaluator(f).images == [data.parent / "img/../img/./1.png"]


def test_bad_arguments(data):
    with pytest.raises(FastmergeError, match="batch_size must be at least 1"):
        VQAEvaluator(data, batch_size=0)
    with pytest.raises(FastmergeError, match="max_new_tokens must be at least 1"):
        VQAEvaluator(data, max_new_tokens=0)
    with pytest.raises(FastmergeError, match=r"must contain \{question\}"):
        VQAEvaluator(data, template="USER: <image> ASSISTANT:")
    with pytest.raises(FastmergeError, match="bad prompt template"):
        VQAEvaluator(data, template="USER: <image> {question} {answer} ASSISTANT:")
    assert len(VQAEvaluator(data, limit=2).questions) == 2


def test_missing_pillow_names_the_extra(data, monkeypatch):
    from fastmerge._optional import MissingDependency

    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(MissingDependency) as e:
        VQAEvaluator(data)
    assert "\n" not in str(e.value) and "pip install 'fastmerge[vlm]'" in str(e.value)


def test_llava_next_anyres_batched_equals_unbatched(tmp_path):
    """LLaVA-NeXT's processor gives each image its own number of tiles (image_sizes): batches of
    differently shaped images still answer as one record at a time does."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    from fastmerge.synth import ModelSpec
    from fastmerge.synth_vlm import CHAT_TEMPLATE, IMAGE_TOKEN, tokenizer, vision_config

    tok = tokenizer()
    grid = [[32, 64], [64, 32], [64, 64]]
    cfg = LlavaNextConfig(vision_config=vision_config(32, 8), text_config=ModelSpec(arch="mistral", vocab=len(tok)).config(),
                          image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN), image_grid_pinpoints=grid,
                          vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(cfg).float().eval()
    try:
        ip = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                     image_grid_pinpoints=grid)
    except ImportError as e:  # transformers 5.4's needs torchvision (5.24's has a PIL backend)
        pytest.skip(f"LLaVA-NeXT's image processor: {str(e).strip().splitlines()[0]}")
    processor = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=8, num_additional_image_tokens=1,
                                   vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE)
    lines = []
    for i, size in enumerate([(40, 30), (30, 70), (64, 64), (20, 20)]):
        _draw(tmp_path / f"{i}.png", (60 * i, 100, 200 - 40 * i), size)
        lines.append(json.dumps({"image": f"{i}.png", "question": f"w{i} w{i + 3}", "answer": "w1"}))
    (tmp_path / "v.jsonl").write_text("\n".join(lines) + "\n")
    answers = []
    for bs in (1, 4):
        ev = VQAEvaluator(tmp_path / "v.jsonl", batch_size=bs, max_new_tokens=6)
        ev(model, processor)
        answers.append([it["output"] for it in ev.last_outputs])
    assert answers[0] == answers[1] and any(answers[0])
