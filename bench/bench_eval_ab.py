"""hf against vLLM on the same candidates, side by side in one process, alternating.

    python bench/bench_eval_ab.py [--reps 6] [--threads 2] [--out bench/results/eval_ab_cpu]

The engines benchmark (``bench_evolve.py --preset engines``) times whole evolve runs one after the
other, so on a shared machine whose speed drifts (by 2x within an hour on this VM) the hf rows and
the vLLM rows can meet different machines. Here one ``Merger`` over the engines family (its cached
``h768-l14-v16384`` models; ``bench_evolve.py --preset engines`` makes them) is bound into one CPU
``vllm.LLM`` (``Merger.bind`` over ``VLLMBackend.weight_targets``, as evolve does), and every
repetition merges one random candidate (timed), repacks it for vLLM (timed: upload) and scores it
with the same math evaluator (128 questions x 32 new tokens, batch 32 for hf) on both engines, in
alternating order. Both engines read the very same tensors. Per repetition the ratio of the two
trials (merge + upload + vLLM eval against merge + hf eval) is taken, and its median reported, so
slow minutes hit both sides of a ratio alike. The scores are reported too (greedy, fp32: they should
agree). ``--generate`` adds transformers' ``model.generate`` over the same module and prompts (batch
32, greedy), the peer of the issue's probe (vLLM 10.3 s against generate's 27.0 s), to the rotation.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def hf_generate(model, tok, prompts: list[str], new_tokens: int, batch_size: int = 32) -> int:
    """transformers' greedy ``model.generate`` over the prompts, batches of similar length padded on
    the left as our loop pads them; returns the number of new tokens (the work done)."""
    import torch

    from fastmerge.backends.hf import HFBackend, batches_by_length, left_pad, pad_id

    rows = HFBackend(model, tok).encode(prompts)  # the ids our loop and vLLM get
    made = 0
    with torch.inference_mode():
        for batch in batches_by_length([len(r) for r in rows], batch_size):
            ids, mask = left_pad([rows[i] for i in batch], pad_id(tok), torch.device("cpu"))
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=pad_id(tok))
            made += (out.shape[1] - ids.shape[1]) * len(batch)
    return made


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/fastmerge-bench-evolve/h768-l14-v16384"))
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--questions", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "eval_ab_cpu")
    ap.add_argument("--generate", action="store_true",
                    help="also time transformers' model.generate on the same prompts (the issue's probe's peer)")
    args = ap.parse_args()
    models = args.workdir / "models"
    if not (models / "ft1" / "config.json").exists():
        raise SystemExit(f"{models}: run bench/bench_evolve.py --preset engines first (it makes the models)")

    import torch
    from transformers import AutoTokenizer

    from fastmerge.backends.vllm_engine import VLLMBackend
    from fastmerge.evaluate import MathEvaluator
    from fastmerge.merger import Genome, Merger

    sys.path.insert(0, str(HERE))
    from bench_evolve import cpu_name, engine_versions

    torch.set_num_threads(args.threads)
    recipe = {"merge_method": "dare_ties", "base_model": str(models / "base"), "random_seed": 0,
              "models": [{"model": str(models / f), "parameters": {"weight": 0.5, "density": 0.5}}
                         for f in ("ft0", "ft1")]}
    merger = Merger(recipe, threads=args.threads)
    tok = AutoTokenizer.from_pretrained(models / "base")
    engine = VLLMBackend(models / "base", tok, threads=args.threads, max_model_len=512, kv_cache_gib=2)
    targets = engine.weight_targets(dict(merger.module.named_parameters()))
    if targets is None:
        raise SystemExit("the vLLM engine's layout was not recognized: nothing to bind")
    merger.bind(targets)
    evaluator = MathEvaluator(args.workdir / "math.jsonl", batch_size=32, max_new_tokens=args.tokens,
                              limit=args.questions)
    load_before = list(os.getloadavg())
    rng = random.Random(0)
    rows = []
    for rep in range(args.reps):
        genome = Genome(weights=[rng.uniform(0.2, 1.0) for _ in range(2)],
                        densities=[rng.uniform(0.2, 0.9) for _ in range(2)])
        t = time.perf_counter()
        merger.merge(genome)
        merge_s = time.perf_counter() - t
        t = time.perf_counter()
        engine.weights_written()
        upload_s = time.perf_counter() - t
        row = {"rep": rep, "merge_s": round(merge_s, 4), "upload_s": round(upload_s, 4)}
        order = ["hf", "vllm"] + (["generate"] if args.generate else [])
        for name in order if rep % 2 == 0 else order[::-1]:
            t = time.perf_counter()
            if name == "generate":
                outs = hf_generate(merger.module, tok, evaluator.prompts(), args.tokens)
            else:
                score = evaluator(merger.module if name == "hf" else engine, tok)
                row[f"{name}_acc"] = score["acc"]
            row[f"{name}_eval_s"] = round(time.perf_counter() - t, 3)
        if args.generate:
            row["generate_tokens"] = outs
        row["hf_trial_s"] = round(merge_s + row["hf_eval_s"], 3)
        row["vllm_trial_s"] = round(merge_s + upload_s + row["vllm_eval_s"], 3)
        row["trial_ratio"] = round(row["vllm_trial_s"] / row["hf_trial_s"], 4)
        row["eval_ratio"] = round(row["vllm_eval_s"] / row["hf_eval_s"], 4)
        row["merge_upload_pct_of_vllm_trial"] = round(100 * (merge_s + upload_s) / row["vllm_trial_s"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)

    def med(key: str) -> float:
        return round(statistics.median(r[key] for r in rows), 4)

    if args.generate:
        for r in rows:
            r["vllm_over_generate"] = round(r["vllm_eval_s"] / r["generate_eval_s"], 4)
            r["hf_over_generate"] = round(r["hf_eval_s"] / r["generate_eval_s"], 4)
    summary = {k: med(k) for k in ("merge_s", "upload_s", "hf_eval_s", "vllm_eval_s", "hf_trial_s", "vllm_trial_s",
                                   "trial_ratio", "eval_ratio", "merge_upload_pct_of_vllm_trial")
               + (("generate_eval_s", "vllm_over_generate", "hf_over_generate") if args.generate else ())}
    summary["acc_equal"] = sum(r["hf_acc"] == r["vllm_acc"] for r in rows)
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": args.threads,
               "torch": torch.__version__, "engines": engine_versions(),
               "loadavg_before": load_before, "loadavg_after": list(os.getloadavg()),
               "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    setup = {"params_per_model": sum(t.numel() for t in merger.module.parameters()), "questions": args.questions,
             "new_tokens": args.tokens, "hf_batch_size": 32, "method": "dare_ties", "reps": args.reps}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"machine": machine, "setup": setup, "summary": summary,
                                                         "rows": rows}, indent=1))
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(json.dumps(summary))
    print(f"wrote {args.out.with_suffix('.json')} and .csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
