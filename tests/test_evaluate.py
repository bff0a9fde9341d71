"""Evaluators: answer extraction and language identification on real sentences, our greedy loop
against HF ``generate``, scoring through a scripted model whose outputs are known, log-likelihood
against a per-example computation, evaluator specs, bad data, and ``fastmerge eval``."""

from __future__ import annotations

import json
import math
import sys
from types import SimpleNamespace

import pytest
import torch

from fastmerge import evaluate as ev
from fastmerge.errors import FastmergeError
from fastmerge.evaluate import (
    LoglikEvaluator,
    MathEvaluator,
    detect_language,
    evaluate_checkpoint,
    extract_answer,
    generate_ids,
    greedy_generate,
    load_evaluator,
    score,
)

# ------------------------------------------------------------------------------------------------
# extract_answer: the last number, as a reader would read it
# ------------------------------------------------------------------------------------------------

ANSWERS = [
    ("The answer is 1,000.", 1000.0),
    ("So the total is 1,000,000 yen.", 1000000.0),
    ("He pays $12.50 for lunch.", 12.5),
    ("The answer is 12.", 12.0),
    ("-7", -7.0),
    ("The temperature fell to -4 degrees.", -4.0),
    ("10-4=6", 6.0),
    ("First 3 + 4 = 7, then 7 x 2 = 14. The answer is 14", 14.0),
    ("In Germany one writes 1,5 for one and a half.", 5.0),  # not a thousands group: 1 and 5
    ("About 3.14159 metres", 3.14159),
    ("She sold 50% of 1,200 apples, i.e. 600.", 600.0),
    ("no number here", None),
    ("", None),
    ("答えは１２３円です。", 123.0),  # full-width digits
    ("合計は１，０００円です。", 1000.0),  # full-width comma
    ("りんごは3個あります。3×4=12なので、答えは12です。", 12.0),
    ("所以答案是 3.5。", 3.5),
    ("小明有５个苹果，吃了２个，还剩３个。", 3.0),
    ("答えは−８です。", -8.0),  # U+2212 minus sign
    ("彼は２０２４年に３．５キロ走った。", 3.5),  # full-width decimal point
    ("答えは十二です。", None),  # number words are not numbers
]


@pytest.mark.parametrize("text,expected", ANSWERS)
def test_extract_answer(text, expected):
    got = extract_answer(text)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected, rel=0, abs=1e-12)


# ------------------------------------------------------------------------------------------------
# detect_language: fastText lid.176 on real English / Japanese / Chinese sentences
# ------------------------------------------------------------------------------------------------

SENTENCES = [
    ("The answer is 1,000.", "en"),
    ("Janet has 3 apples and buys 4 more, so she has 7 apples in total.", "en"),
    ("Each box holds 12 pencils. 5 boxes hold 5 x 12 = 60 pencils.", "en"),
    ("First, we add the two numbers together.\nThen we divide by 2.", "en"),
    ("答えは１２３円です。", "ja"),
    ("りんごは3個あります。3×4=12なので、答えは12です。", "ja"),
    ("太郎さんは毎日2キロ走ります。1週間では何キロ走りますか。", "ja"),
    ("まず、全部のえんぴつの数を数えましょう。", "ja"),
    ("所以答案是 3.5。", "zh"),
    ("小明有5个苹果，吃了2个，还剩3个。", "zh"),
    ("一个班有40名学生，其中一半是女生，所以女生有20名。", "zh"),
    ("我们先计算每天的费用，然后乘以天数。", "zh"),
]


@pytest.mark.parametrize("text,lang", SENTENCES)
def test_detect_language(text, lang):
    code, prob = detect_language(text)
    assert code == lang
    assert 0.3 < prob <= 1.0


def test_chinese_varieties_fold_to_zh():
    text = "小明有5个苹果，吃了2个，还剩3个。"  # lid.176 says Wu Chinese
    assert detect_language(text, fold_chinese=False)[0] == "wuu"
    assert detect_language(text)[0] == "zh"
    assert score([text], [3], "zh")["acc_lang"] == 1.0


def test_detect_language_blank_and_model_loaded_once():
    assert detect_language("  \n ") == ("", 0.0)
    first = ev._lid_model()
    detect_language("hello world")
    assert ev._lid_model() is first


def test_missing_lid_model_names_the_path(monkeypatch, tmp_path):
    missing = tmp_path / "nowhere" / "lid.176.ftz"
    monkeypatch.setattr(ev, "_LID_MODEL", None)
    monkeypatch.setenv(ev.LID_ENV, str(missing))
    with pytest.raises(FastmergeError, match=str(missing)):
        detect_language("hello")


def test_lid_path_env_override(monkeypatch, tmp_path):
    real = ev._lid_path()
    monkeypatch.setattr(ev, "_LID_MODEL", None)
    monkeypatch.setenv(ev.LID_ENV, str(real))
    assert ev._lid_path() == real
    assert detect_language("答えは12です。")[0] == "ja"


# ------------------------------------------------------------------------------------------------
# score / judge
# ------------------------------------------------------------------------------------------------


def test_score_table():
    outputs = ["りんごは3個、みかんは4個なので、3+4=7。答えは7個です。",  # correct, ja
               "The answer is 1,000.",  # correct, en
               "答えは６です。",  # wrong
               "わかりません。"]  # no number
    answers = [7, 1000, 5, 2]
    assert score(outputs, answers, "ja") == {"acc": 0.5, "acc_lang": 0.25, "n": 4}
    assert score(outputs, answers, "en") == {"acc": 0.5, "acc_lang": 0.25, "n": 4}
    assert score(outputs, answers, "ja-JP")["acc_lang"] == 0.25
    assert score(outputs, answers) == {"acc": 0.5, "acc_lang": 0.5, "n": 4}
    # relative tolerance 1e-6 * max(1, |answer|)
    assert score(["1000001.5"], [1000000])["acc"] == 0.0
    assert score(["1000000.5"], [1000000])["acc"] == 1.0
    assert score(["0.33333"], [1 / 3])["acc"] == 0.0
    assert score(["0.333333"], [1 / 3])["acc"] == 1.0
    with pytest.raises(FastmergeError):
        score(["1"], [1, 2])


# ------------------------------------------------------------------------------------------------
# A tiny word-level tokenizer and a tiny random Llama over it
# ------------------------------------------------------------------------------------------------

QUESTIONS = [
    ("Tom has 3 cats . How many legs do the cats have ?", 12),
    ("りんごが3個、みかんが4個あります。合わせて何個ですか？", 7),
    ("太郎さんは1000円持っています。いくら持っていますか？", 1000),
    ("花子さんは5本のペンを持っています。何本ですか？", 5),
    ("A box holds 6 eggs . How many eggs are in 2 boxes ?", 12),
]
REPLIES = {
    QUESTIONS[0][0]: "Each cat has 4 legs , so 3 x 4 = 12 . The answer is 12 .",  # correct, en
    QUESTIONS[1][0]: "りんごは3個、みかんは4個なので、3+4=7。 答えは7個です。",  # correct, ja
    QUESTIONS[2][0]: "The answer is 1,000 .",  # correct, but English
    QUESTIONS[3][0]: "答えは６本です。",  # wrong, ja
    QUESTIONS[4][0]: "答えは12個です。 Q: 次の 問題",  # correct, ja; the stop string cuts the tail
}
CORPUS = [*(q for q, _ in QUESTIONS), *REPLIES.values(), "Q: A: the answer is one two three four five six"]


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3}
    for line in CORPUS:
        for w in line.split():
            vocab.setdefault(w, len(vocab))
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="[PAD]", eos_token="[EOS]", bos_token="[BOS]",
                                   unk_token="[UNK]")


@pytest.fixture(scope="module")
def llama(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=128,
                      initializer_range=0.2, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


PROMPTS = ["Q: Tom has 3 cats . How many legs do the cats have ? A:",
           "the answer",
           "Q: A box holds 6 eggs . A:",
           "one two three four five six",
           "Q: 答えは７個です。 A:"]


def _hf_generate(model, tok, prompts, max_new_tokens, eos):
    enc = tok(prompts, padding=True, padding_side="left", return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=eos)
    rows = []
    for r in out[:, enc["input_ids"].shape[1]:].tolist():
        cut = next((i for i, t in enumerate(r) if t in eos), len(r))
        rows.append(r[:cut])
    return rows


def test_greedy_generate_equals_hf_generate(llama, tok):
    n = 8
    free = _hf_generate(llama, tok, PROMPTS, n, [tok.eos_token_id])
    assert len({tuple(r) for r in free}) > 1 and len({len(tok(p).input_ids) for p in PROMPTS}) == len(PROMPTS)
    # Make one generated token an eos so rows stop at different steps: a token of row 0 absent from some row.
    stop_tok = next(t for t in free[0][1:] if any(t not in r for r in free[1:]))
    eos = [tok.eos_token_id, stop_tok]
    old = llama.generation_config.eos_token_id
    llama.generation_config.eos_token_id = eos
    try:
        ref = _hf_generate(llama, tok, PROMPTS, n, eos)
        assert min(len(r) for r in ref) < n == max(len(r) for r in ref)  # per-row stopping is exercised
        for bs in (len(PROMPTS), 2, 1):
            assert generate_ids(llama, tok, PROMPTS, max_new_tokens=n, batch_size=bs) == ref
        texts = greedy_generate(llama, tok, PROMPTS, max_new_tokens=n, batch_size=2)
        assert texts == [tok.decode(r, skip_special_tokens=True) for r in ref]
    finally:
        llama.generation_config.eos_token_id = old


def test_greedy_generate_does_not_touch_tokenizer(llama, tok):
    side = tok.padding_side
    greedy_generate(llama, tok, PROMPTS[:2], max_new_tokens=2)
    assert tok.padding_side == side
    assert greedy_generate(llama, tok, [], max_new_tokens=2) == []


# ------------------------------------------------------------------------------------------------
# A scripted model: known outputs through the bare forward contract (as the DFS executor offers)
# ------------------------------------------------------------------------------------------------


class Scripted(torch.nn.Module):
    """Answers each prompt with ``replies[question]`` then eos, via forward() only; counts calls.

    Its "cache" is whatever it likes (the step and the scripts): the loop must pass it back untouched.
    """

    def __init__(self, tok, replies: dict[str, str]):
        super().__init__()
        self.tok, self.calls = tok, 0
        self.replies = {q: tok(r, add_special_tokens=False).input_ids + [tok.eos_token_id] for q, r in replies.items()}

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=True):
        self.calls += 1
        if isinstance(past_key_values, SimpleNamespace):
            state = past_key_values
            assert input_ids.shape[1] == 1 and attention_mask.shape[1] == state.width + state.step
            assert torch.equal(position_ids[:, 0], state.last_pos + state.step)
        else:  # first step: find each row's question in its (left-padded) prompt
            assert bool((attention_mask[:, -1] == 1).all()), "prompts must be left-padded"
            texts = [self.tok.decode(r[m.bool()].tolist()) for r, m in zip(input_ids, attention_mask)]
            scripts = [next(s for q, s in self.replies.items() if q in t) for t in texts]
            assert torch.equal(position_ids[:, -1], attention_mask.sum(-1) - 1)
            state = SimpleNamespace(scripts=scripts, step=0, width=input_ids.shape[1], last_pos=position_ids[:, -1])
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], len(self.tok))
        for i, s in enumerate(state.scripts):
            logits[i, -1, s[min(state.step, len(s) - 1)]] = 1.0
        return SimpleNamespace(logits=logits, past_key_values=SimpleNamespace(**{**vars(state), "step": state.step + 1}))


def test_math_evaluator_known_outputs(tok, tmp_path):
    data = tmp_path / "math.jsonl"
    data.write_text("\n".join(json.dumps({"question": q, "answer": a}, ensure_ascii=False) for q, a in QUESTIONS)
                    + "\n\n", encoding="utf-8")
    calls = []
    # the tokenizer's decode joins words with spaces, so the stop string here has no newline
    m = MathEvaluator(data, lang="ja", batch_size=2, stop=["Q:"], progress=lambda d, t: calls.append((d, t)))
    model = Scripted(tok, REPLIES)
    assert m(model, tok) == {"acc": 0.8, "acc_lang": 0.4, "n": 5}
    assert calls == [(2, 5), (4, 5), (5, 5)]
    got = [(o["question"], o["predicted"], o["correct"], o["lang"]) for o in m.last_outputs]
    assert got == [(QUESTIONS[0][0], 12.0, True, "en"), (QUESTIONS[1][0], 7.0, True, "ja"),
                   (QUESTIONS[2][0], 1000.0, True, "en"), (QUESTIONS[3][0], 6.0, False, "ja"),
                   (QUESTIONS[4][0], 12.0, True, "ja")]
    assert m.last_outputs[4]["output"] == "答えは12個です。 "  # cut before the stop string
    assert [o["output"] for o in m.last_outputs[:4]] == [REPLIES[q] for q, _ in QUESTIONS[:4]]
    # generation stopped at the stop string/eos: longest reply is 15 tokens + eos, not max_new_tokens
    longest = max(len(tok(REPLIES[q], add_special_tokens=False).input_ids) for q, _ in QUESTIONS)
    assert model.calls <= 3 * (longest + 1) < 3 * m.max_new_tokens
    # no target language: acc_lang == acc, and the limit keeps the first items
    m2 = MathEvaluator([{"question": q, "answer": str(a)} for q, a in QUESTIONS], limit=3)
    assert m2(Scripted(tok, REPLIES), tok) == {"acc": 1.0, "acc_lang": 1.0, "n": 3}


def test_math_evaluator_end_to_end_tiny_llama(llama, tok):
    data = [{"question": q, "answer": a} for q, a in QUESTIONS]
    calls = []
    m = MathEvaluator(data, lang="en", batch_size=2, max_new_tokens=6, progress=lambda d, t: calls.append((d, t)))
    metrics = m(llama, tok)
    prompts = [ev.DEFAULT_TEMPLATE.format(question=q) for q, _ in QUESTIONS]
    one_by_one = [greedy_generate(llama, tok, [p], max_new_tokens=6, stop=list(ev.DEFAULT_STOP))[0] for p in prompts]
    assert [o["output"] for o in m.last_outputs] == one_by_one
    assert any(one_by_one)
    assert metrics == score(one_by_one, [a for _, a in QUESTIONS], "en")
    assert calls[-1] == (5, 5)


# ------------------------------------------------------------------------------------------------
# Log-likelihood
# ------------------------------------------------------------------------------------------------


def test_loglik_against_per_example(llama, tok):
    data = [{"text": "Q: Tom has 3 cats . A: the answer is 12 ."},
            {"text": "one two"},
            {"question": "Q: A box holds 6 eggs . How many eggs are in 2 boxes ? A:", "answer": "12"},
            {"question": "Q: the answer", "answer": "is one two three"},
            {"text": "答えは12個です。 Q: 次の 問題 one two three four five six"}]
    total, count = 0.0, 0
    with torch.no_grad():
        for rec in data:
            if "text" in rec:
                ids, start = tok(rec["text"]).input_ids, 1
            else:
                q = tok(rec["question"]).input_ids
                ids, start = q + tok(" " + rec["answer"], add_special_tokens=False).input_ids, len(q)
            lp = torch.log_softmax(llama(torch.tensor([ids])).logits[0].double(), -1)
            total += sum(float(lp[t - 1, ids[t]]) for t in range(start, len(ids)))
            count += len(ids) - start
    got = LoglikEvaluator(data, batch_size=2)(llama, tok)
    assert got["n"] == 5 and got["tokens"] == count
    assert got["loglik"] == pytest.approx(total / count, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(-total / count), rel=1e-5)
    assert LoglikEvaluator(data, batch_size=5, limit=2)(llama, tok)["tokens"] == len((data[0]["text"] + " " + data[1]["text"]).split())


# ------------------------------------------------------------------------------------------------
# Specs and bad input
# ------------------------------------------------------------------------------------------------

USER_MODULE = '''
CONST = 3

def evaluate(model, tokenizer):
    return {"score": 0.25}

def make(scale):
    return lambda model, tokenizer: {"score": scale}

def bad_factory(scale):
    return scale
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "fm_user_eval.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "fm_user_eval"
    sys.modules.pop("fm_user_eval", None)


def test_load_evaluator(user_module, tmp_path):
    assert load_evaluator(f"{user_module}:evaluate")(None, None) == {"score": 0.25}
    assert load_evaluator({"name": f"{user_module}:evaluate"})(None, None) == {"score": 0.25}
    assert load_evaluator({"name": f"{user_module}:make", "scale": 0.5})(None, None) == {"score": 0.5}
    m = load_evaluator({"name": "math", "data": [{"question": "q", "answer": 1}], "lang": "ja", "limit": 1})
    assert isinstance(m, MathEvaluator) and m.lang == "ja" and m.answers == [1.0]
    assert isinstance(load_evaluator({"name": "loglik", "data": [{"text": "a b"}]}), LoglikEvaluator)
    for spec, msg in [
        ("fm_no_such_module:f", "cannot import module 'fm_no_such_module'"),
        (f"{user_module}:nope", "has no attribute 'nope'"),
        (f"{user_module}:CONST", "not callable"),
        ({"name": f"{user_module}:bad_factory", "scale": 1}, "returned int"),
        ({"name": f"{user_module}:make", "bogus": 1}, "factory"),
        ("accuracy", "expected a built-in"),
        ({"name": "math", "data": [{"question": "q", "answer": 1}], "bogus": 1}, "bogus"),
        ({"data": "x.jsonl"}, "name"),
    ]:
        with pytest.raises(FastmergeError, match=msg):
            load_evaluator(spec)


@pytest.mark.parametrize("content,msg", [
    ('{"question": "a", "answer": 1}\n{"answer": 2}\n', r"bad\.jsonl:2: 'question' is missing"),
    ('{"question": "a", "answer": 1}\n\n{"question": "b", "answer": "twelve"}\n', r"bad\.jsonl:3: 'answer' is not a number"),
    ('{"question": "a"}\n', r"bad\.jsonl:1: 'answer' is missing"),
    ('{"question": 5, "answer": 1}\n', r"bad\.jsonl:1: 'question' is not a string"),
    ('{"question": "a", "answer": 1}\n{"question": "b", "answer": 2\n', r"bad\.jsonl:2: not valid JSON"),
    ('[1, 2]\n', r"bad\.jsonl:1: expected a JSON object"),
    ("\n\n", r"bad\.jsonl: no evaluation items"),
])
def test_bad_math_data(tmp_path, content, msg):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(FastmergeError, match=msg):
        MathEvaluator(path)


def test_bad_arguments(tmp_path):
    with pytest.raises(FastmergeError, match="cannot read evaluation data"):
        MathEvaluator(tmp_path / "missing.jsonl")
    with pytest.raises(FastmergeError, match="must contain"):
        MathEvaluator([{"question": "a", "answer": 1}], template="Q: {q}")
    with pytest.raises(FastmergeError, match="bad prompt template"):
        MathEvaluator([{"question": "a", "answer": 1}], template="{question} {other}")
    with pytest.raises(FastmergeError, match="limit"):
        MathEvaluator([{"question": "a", "answer": 1}], limit=0)
    with pytest.raises(FastmergeError, match=r"<data>\[1\]: expected 'text'"):
        LoglikEvaluator([{"text": "a"}, {"foo": "b"}])
    assert MathEvaluator([{"question": "a", "answer": "１，０００"}]).answers == [1000.0]


# ------------------------------------------------------------------------------------------------
# Checkpoints on disk and the CLI
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(llama, tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("eval-ckpt")
    llama.save_pretrained(path)
    tok.save_pretrained(path)
    data = path / "math.jsonl"
    data.write_text("\n".join(json.dumps({"question": q, "answer": a}, ensure_ascii=False) for q, a in QUESTIONS))
    return path, data


def test_evaluate_checkpoint_matches_in_memory(checkpoint, llama, tok):
    path, data = checkpoint
    spec = {"name": "math", "data": str(data), "max_new_tokens": 4, "batch_size": 2}
    expected = MathEvaluator(data, max_new_tokens=4)(llama, tok)
    assert evaluate_checkpoint(path, spec) == expected
    with pytest.raises(FastmergeError, match="no config.json"):
        evaluate_checkpoint(path / "nope", spec)


def test_cli_eval(checkpoint, llama, tok, capsys, user_module):
    from fastmerge.cli import main

    path, data = checkpoint
    expected = MathEvaluator(data, lang="en", max_new_tokens=4, limit=3)(llama, tok)
    rc = main(["eval", str(path), "--task", "math", "--data", str(data), "--lang", "en", "--limit", "3",
               "--max-new-tokens", "4", "--batch-size", "2", "--json", "--no-progress"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out) == expected
    rc = main(["eval", str(path), "--task", "loglik", "--data", str(data), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "loglik=" in out and "n=5" in out
    rc = main(["eval", str(path), "--task", "math", "--data", str(path / "missing.jsonl")])
    assert rc == 2 and "missing.jsonl" in capsys.readouterr().err
    rc = main(["eval", str(path), "--task", f"{user_module}:evaluate", "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out) == {"score": 0.25}
    rc = main(["eval", str(path), "--task", f"{user_module}:make", "--data", "x.jsonl"])
    assert rc == 2 and "factory" in capsys.readouterr().err
