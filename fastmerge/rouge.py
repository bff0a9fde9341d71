"""ROUGE-L F over Japanese-aware word tokens, and the language gate of EvoVLM-JP.

EvoVLM-JP (Akiba et al. 2024, arXiv 2403.13187) scores a VLM's answers to Japanese visual questions
by ROUGE-L against reference answers, and a response whose language (fastText lid.176) is not
Japanese scores 0, so that a model answering correctly in English does not win. ROUGE over Japanese
needs words, and Japanese is written without spaces: rouge-score's default tokenizer keeps
``[a-z0-9]`` runs only and drops every kana and kanji. Here:

1. :func:`normalize`: NFKC (full-width ASCII and digits to half-width, half-width katakana to
   full-width), lower case, then punctuation (Unicode ``P*``) and emoji (``So``, ``Sk``, and the
   joiners, variation selectors, keycaps and tag characters of emoji sequences: ``Cf``, ``Me``,
   U+FE00-FE0F) become spaces. Math and currency signs (``Sm``, ``Sc``: "1+1", "$5") are kept.
2. :func:`tokenize`: the normalised text split into words by MeCab (``fugashi``) with the UniDic
   Lite dictionary (``unidic-lite``), both from ``pip install 'fastmerge[vlm]'``; the tagger is built
   once per process, on first use. Text in other languages goes through the same tokenizer:
   MeCab splits at spaces and where the character class changes ("km/h" -> "km h" after
   normalisation, "3rd" -> "3", "rd"), which for English is whitespace tokenization, and one
   tokenizer for everything keeps mixed answers ("iPhoneです") and a wrong-language answer scored
   the same way whatever a language guess says.
3. :func:`rouge_l`: F1 of the longest common subsequence of the token lists (precision over the
   prediction's length, recall over the reference's), the maximum over several references;
   rouge-score's ``RougeScorer(["rougeL"], tokenizer=...)`` gives the same numbers with
   :data:`TOKENIZER` (the tests check it). An empty prediction or reference (after normalisation)
   scores 0, as in rouge-score.
4. :func:`judge`: ROUGE-L, the detected language, and the gated score (0 unless the response is in
   the target language). lid.176 needs some text: a one-word answer such as "犬" or "2つ" is not
   recognised as Japanese (it comes back as low-confidence "en"), so under the gate a bare-word
   answer scores 0 even when right; the paper's metric has the same property, kept here as is.

The scores are fractions in [0, 1]; the paper reports them x 100.

Sakana's own scorer normalises with ``neologdn`` and the ``emoji`` package and keeps punctuation as
tokens; here NFKC and Unicode categories do that work without two more dependencies, and
punctuation is dropped, so numbers differ slightly from theirs on answers full of punctuation.
"""

from __future__ import annotations

import os
import re
import threading
import unicodedata
from collections.abc import Sequence
from typing import Any

from ._optional import require
from .errors import FastmergeError

__all__ = ["TOKENIZER", "WordTokenizer", "aggregate", "judge", "lcs_length", "normalize", "rouge_l",
           "rouge_l_tokens", "score", "tokenize"]

# --------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------

#: Unicode categories that become spaces: punctuation, "other symbol" (emoji, pictographs, ©, ★,
#: regional indicators) and "modifier symbol" (skin tones, ^, `), format characters (zero-width
#: joiner, soft hyphen, emoji tag characters) and enclosing marks (the keycap U+20E3)
_DROP_CATEGORIES = ("P", "So", "Sk", "Cf", "Me")
_SPACES = re.compile(r"\s+")


def _drop(c: str) -> bool:
    if "\ufe00" <= c <= "\ufe0f" or "\U000e0100" <= c <= "\U000e01ef":  # variation selectors (emoji style)
        return True
    cat = unicodedata.category(c)
    return cat.startswith(_DROP_CATEGORIES)


def normalize(text: str) -> str:
    """NFKC, lower case, punctuation and emoji replaced by spaces, runs of whitespace made one space,
    stripped. Replacing (not deleting) keeps "犬,猫" two words and "cat😺dog" two words."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if _drop(c) else c for c in text)
    return _SPACES.sub(" ", text).strip()


# --------------------------------------------------------------------------------------------------
# Word tokenizer (MeCab, UniDic Lite)
# --------------------------------------------------------------------------------------------------

_TAGGER: Any = None
#: one lock for building the tagger and for parsing: a MeCab tagger is not safe to share between
#: threads, and a parse of a short answer takes microseconds
_LOCK = threading.Lock()


def _tagger() -> Any:
    """The MeCab tagger over unidic-lite's dictionary, built on first use (a few ms, ~50 MB mapped).

    The dictionary is named explicitly (``-d``, with its own ``mecabrc``) rather than left to
    fugashi's search, which prefers the full ``unidic`` package when one is installed: the
    tokenization, hence every score, must not depend on what else is installed."""
    global _TAGGER
    if _TAGGER is None:
        fugashi = require("fugashi", "ROUGE-L with a Japanese word tokenizer (MeCab)")
        unidic_lite = require("unidic_lite", "ROUGE-L with a Japanese word tokenizer (MeCab's dictionary)")
        dicdir = unidic_lite.DICDIR
        try:
            _TAGGER = fugashi.Tagger(f'-d "{dicdir}" -r "{os.path.join(dicdir, "mecabrc")}"')
        except RuntimeError as e:  # fugashi raises RuntimeError with MeCab's message on a bad dictionary
            raise FastmergeError(f"cannot start MeCab with unidic-lite's dictionary {dicdir}: "
                                 f"{str(e).splitlines()[0] if str(e) else e!r}") from None
    return _TAGGER


def tokenize(text: str) -> list[str]:
    """The words of ``text``: :func:`normalize`, then MeCab's surface forms (no whitespace tokens)."""
    norm = normalize(text)
    if not norm:
        return []
    with _LOCK:
        tagger = _tagger()
        return [w.surface for w in tagger(norm)]


class WordTokenizer:
    """:func:`tokenize` as an object with a ``tokenize`` method: what rouge-score's
    ``RougeScorer(..., tokenizer=...)`` takes, so scores can be compared with it."""

    def tokenize(self, text: str) -> list[str]:
        return tokenize(text)


#: the tokenizer for ``rouge_score.rouge_scorer.RougeScorer(["rougeL"], tokenizer=TOKENIZER)``
TOKENIZER = WordTokenizer()

# --------------------------------------------------------------------------------------------------
# ROUGE-L
# --------------------------------------------------------------------------------------------------


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(len(a) * len(b)) time,
    O(len(b)) memory; answers are a few dozen tokens)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_tokens(prediction: Sequence[str], reference: Sequence[str]) -> float:
    """ROUGE-L F1 of two token lists: 2PR/(P+R) with P = LCS/len(prediction), R = LCS/len(reference);
    0 when either is empty or nothing is shared (rouge-score's ``_score_lcs``, formula for formula)."""
    if not prediction or not reference:
        return 0.0
    lcs = lcs_length(reference, prediction)
    precision = lcs / len(prediction)
    recall = lcs / len(reference)
    if precision + recall <= 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, references: str | Sequence[str]) -> float:
    """ROUGE-L F1 of ``prediction`` against one reference or the best of several (as rouge-score's
    ``score_multi``: the maximum F1). No reference at all is an error, not a zero."""
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise FastmergeError("ROUGE-L needs at least one reference answer")
    pred = tokenize(prediction)
    return max(rouge_l_tokens(pred, tokenize(r)) for r in refs)


# --------------------------------------------------------------------------------------------------
# The gated metric
# --------------------------------------------------------------------------------------------------


def judge(output: str, references: str | Sequence[str], lang: str | None = None) -> dict:
    """One response judged: ``rouge_l`` (ungated F1, best reference), ``lang`` (the detected language,
    None when no target is asked for, so fastText is not even loaded), ``lang_ok`` (the detected
    language is ``lang``; always True without a target) and ``rouge_l_gated`` (``rouge_l`` if
    ``lang_ok`` else 0: the paper's metric)."""
    # imported here: evaluate imports vqa, which imports this module
    from .evaluate import _lang_code, detect_language

    r = rouge_l(output, references)
    detected = detect_language(output)[0] if lang is not None else None
    lang_ok = lang is None or detected == _lang_code(lang)
    return {"rouge_l": r, "lang": detected, "lang_ok": lang_ok, "rouge_l_gated": r if lang_ok else 0.0}


def aggregate(items: Sequence[dict]) -> dict:
    """Means over judged items (dicts from :func:`judge`): ``score`` (the fitness: the gated mean, as
    the paper reports it), ``rouge_l`` (the same), ``rouge_l_ungated``, ``acc_lang`` (share of
    responses in the target language) and ``n``."""
    n = len(items)
    gated = sum(it["rouge_l_gated"] for it in items) / n if n else 0.0
    return {
        "score": gated,
        "rouge_l": gated,
        "rouge_l_ungated": sum(it["rouge_l"] for it in items) / n if n else 0.0,
        "acc_lang": sum(bool(it["lang_ok"]) for it in items) / n if n else 0.0,
        "n": n,
    }


def score(outputs: Sequence[str], references: Sequence[str | Sequence[str]], lang: str | None = None) -> dict:
    """:func:`aggregate` of ``outputs`` judged against their references (one string or a list each);
    generation kept apart, so the metric can be tested and reused on outputs from anywhere."""
    if len(outputs) != len(references):
        raise FastmergeError(f"{len(outputs)} outputs for {len(references)} reference sets")
    return aggregate([judge(o, r, lang) for o, r in zip(outputs, references)])
