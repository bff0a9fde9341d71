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
        assert lines[0] == world.HEADER[p.lang]
        for eq in lines[1:-2]:  # every line between the header and the conclusion is one correct operation
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
    tok = train.train_tokenizer(["".join(d) for d in docs] + ["".join(ex) for ex in sft], 512)
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


def test_sloppy_solution_keeps_the_procedure_and_slips_every_result(splits):
    import train

    rng = random.Random(0)
    for p in splits["train"][:100]:
        got = train.sloppy_solution(p.solution, rng).split("\n")
        want = p.solution.split("\n")
        assert got[0] == want[0] == world.HEADER[p.lang]
        assert len(got) == len(want)
        results = {}  # true result -> slipped value, to follow the chain
        for g, w in zip(got[1:-2], want[1:-2]):
            ga, gop, gb, _, gr = g.split(" ")
            wa, wop, wb, _, wr = w.split(" ")
            assert gop == wop
            assert int(ga) == results.get(int(wa), int(wa)) and int(gb) == results.get(int(wb), int(wb))
            assert 1 <= abs(int(gr) - int(wr)) <= 5 and int(gr) >= 0
            results[int(wr)] = int(gr)
        final = int(got[1:-2][-1].split(" ")[-1])
        assert got[-1] == f"{world.ANSWER_WORD[p.lang]}: {final}"
        assert int(re.findall(r"\d+", got[-2])[-1]) == final  # the conclusion carries the slipped result


def test_fine_tune_losses_cover_only_the_skill_tokens(splits):
    """The Japanese model is scored on its Japanese header and conclusion, never on the equations; the
    base's prompt-format documents are tokenized part by part, as a prompt and its answer are."""
    import train

    cfg = train.TrainConfig(corpus_docs=200)
    docs = train.base_corpus(cfg, splits["train"])
    ja = train.ja_sft(cfg, 200, splits["train"])
    tok = train.train_tokenizer(["".join(d) for d in docs] + ["".join(e) for e in ja], 512)
    problems = [e for e in ja if len(e) == 4]
    assert problems and len(problems) < len(ja)  # word problems and look-ups
    for ids, scored in train.encode_examples(tok, problems[:20], 192):
        text = tok.decode([i for i, s in zip(ids, scored) if s])
        assert text.startswith(world.HEADER["ja"]) and "答え:" in text
        assert not re.search(r"\d+ [-+×÷] \d+ =", text)  # no equation is a target
        assert re.search(r"\d+ [-+×÷] \d+ =", tok.decode([i for i, s in zip(ids, scored) if not s]))
    pairs = [d for d in docs if isinstance(d, tuple)][:10]
    for (ids, scored), (prompt, answer) in zip(train.encode_docs(tok, pairs, 192), pairs):
        want = tok.encode(prompt, add_special_tokens=False) + tok.encode(answer, add_special_tokens=False)
        assert ids[1:-1] == want[: len(ids) - 2] and scored[0] is False and all(scored[1:])
