"""The toy world (examples/toy_world): generator invariants and a tiny-training smoke test (fast, CPU)."""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

import pytest
import torch

TOY = Path(__file__).resolve().parents[1] / "examples" / "toy_world"
sys.path.insert(0, str(TOY))

import world  # noqa: E402

SMALL = {"train": 200, "search": 40, "test": 80}

#: each template's answer from its numbers, written independently of world.py's Step arithmetic
EXPECTED = {
    "price": lambda a, p: a * p,
    "change": lambda a, p, m: m - a * p,
    "quantity": lambda a, b, c: a + b - c,
    "share": lambda k, q: q,
    "distance": lambda s, h: s * h,
    "fill": lambda r, q: q,
    "boxes": lambda b, k, x: b * k + x,
    "two_items": lambda a, p, b, q: a * p + b * q,
}


@pytest.fixture(scope="module")
def splits() -> dict[str, list[world.Problem]]:
    return world.make_splits(0, SMALL)


def test_deterministic_per_seed(splits):
    again = world.make_splits(0, SMALL)
    assert [p.to_json() for s in world.SPLITS for p in splits[s]] == [p.to_json() for s in world.SPLITS for p in again[s]]
    other = world.make_splits(1, SMALL)
    assert [p.question for p in other["test"]] != [p.question for p in splits["test"]]


def test_sizes_languages_templates(splits):
    for split, n in SMALL.items():
        probs = splits[split]
        assert len(probs) == 2 * n
        assert {p.lang for p in probs} == {"en", "ja"}
        assert {p.template for p in probs} == set(world.TEMPLATES)


def test_splits_disjoint_by_underlying_problem(splits):
    keys = {s: {p.key for p in splits[s]} for s in world.SPLITS}
    assert not keys["train"] & keys["search"]
    assert not keys["train"] & keys["test"]
    assert not keys["search"] & keys["test"]
    # the key spaces themselves are disjoint (not only the drawn samples)
    parts = world.split_keys(0)
    for t in world.TEMPLATES:
        a, b, c = (set(parts[s][t]) for s in world.SPLITS)
        assert not (a & b or a & c or b & c) and a and b and c


def test_answers_are_last_number_and_correct(splits):
    for p in (p for s in world.SPLITS for p in splits[s]):
        assert p.answer == EXPECTED[p.template](*p.numbers), p
        assert p.answer > 0
        assert int(re.findall(r"\d+", p.solution)[-1]) == p.answer
        lines = p.solution.split("\n")
        assert lines[-1] == f"{world.ANSWER_WORD[p.lang]}: {p.answer}"
        for eq in lines[:-2]:  # every line before the conclusion is one correct operation
            a, op, b, _, r = eq.split(" ")
            assert world.Step(int(a), op, int(b)).result == int(r)


def test_jsonl_roundtrip(tmp_path, splits):
    path = world.write_jsonl(splits["test"][:5], tmp_path / "t.jsonl")
    rows = world.read_jsonl(path)
    assert [r["question"] for r in rows] == [p.question for p in splits["test"][:5]]
    assert all(isinstance(r["answer"], int) and {"solution", "lang", "template"} <= r.keys() for r in rows)


def test_fasttext_reads_the_languages(splits):
    from measure import detect_lang

    rng = random.Random(0)
    sample = rng.sample(splits["test"], 60)
    for p in sample:
        assert detect_lang(p.question) == p.lang, p.question
        assert detect_lang(p.solution) == p.lang, p.solution
    for lang in world.LANGS:
        qa = world.lookup_qa(rng, lang)
        assert detect_lang(qa.response) == lang


def test_tiny_training_smoke(tmp_path):
    import train
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    cfg = train.TrainConfig(model=train.ModelConfig(hidden=32, layers=2, heads=2, intermediate=64, max_len=96),
                            corpus_docs=300)
    probs = world.make_splits(0, {"train": 50, "search": 2, "test": 2})["train"]
    docs = train.base_corpus(cfg, probs)
    sft = train.math_sft(cfg, probs)
    tok = train.train_tokenizer(docs + [p + r for p, r in sft], 512)
    # numbers are single tokens however they are surrounded (the cross-lingual point of the pre-split)
    assert tok.tokenize("を3個")[-2:-1] == tok.tokenize("buys 3")[-1:] == tok.tokenize("3 × 4")[:1]
    model = train.make_model(cfg.model, tok, 0)
    data = train.encode_examples(tok, sft, cfg.model.max_len)
    losses = train.train_phase(model, data, train.PhaseConfig(steps=30, lr=3e-3, batch=8, warmup=3),
                               tok.pad_token_id, 0, "smoke", progress=False)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    out = tmp_path / "m"
    train._save(model, tok, out, {"digest": cfg.digest()})
    assert train._cached(out, cfg.digest()) and not train._cached(out, "other")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    tok2 = AutoTokenizer.from_pretrained(out)
    ids = tok2(world.prompt(probs[0].question), return_tensors="pt")
    assert ids["input_ids"][0, 0].item() == tok2.bos_token_id  # the default call adds <s>, as in training
    with torch.no_grad():
        assert torch.allclose(loaded(**ids).logits, model(**ids).logits, atol=1e-5)
