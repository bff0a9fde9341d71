"""In-memory merging: fastmerge's ``Merger`` against mergekit's Python API on the same tensors.

    python bench/bench_merger.py [--workdir /tmp/fastmerge-bench] [--reps 5] [--mergekit-reps 1]

Uses the 245M-parameter bf16 Llama family made by ``bench/compare_mergekit.py`` (base + 3
fine-tunes). Both sides start from the same tensors already in memory (nothing is read from disk
inside the timed region):
  - fastmerge: ``Merger(recipe).merge(Genome(...))`` writes every tensor of the candidate into the
    live module in place (the evolve hot path);
  - mergekit: for every tensor, ``registry.get(method).merge_group(TensorGroup(...), **params)``,
    mergekit's own per-tensor merge call, with the same weights and densities.
dare_ties runs twice: with the Merger's default DARE draw cache (``cpu.DrawCache``: the first merge
draws and keeps the draws, later ones reuse them) and with ``draw_cache=False`` (every merge draws),
both loaded at once and their merges alternated, so the median of the repetitions is the search's
steady state and ``first_merge_s`` the first one.
Writes bench/results/merger_inmemory.csv (+ machine line) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
WEIGHTS = (0.5, 0.3, 0.4)
DENSITIES = (0.5, 0.6, 0.7)


def recipe(models: Path, method: str) -> dict:
    return {
        "merge_method": method,
        "base_model": str(models / "base"),
        "models": [{"model": str(models / f"ft{i}"), "parameters": {"weight": w, "density": d}}
                   for i, (w, d) in enumerate(zip(WEIGHTS, DENSITIES))],
        "dtype": "bfloat16",
    }


def mergekit_pass(merger, method: str) -> float:
    """Merge every planned tensor with mergekit's merge_group on the Merger's loaded sources."""
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorEntry, TensorGroup

    impl = registry.get(method)
    params = {"int8_mask": False, "lambda": 1.0,
              "normalize": method == "ties", "rescale": method == "dare_ties"}
    t0 = time.perf_counter()
    for task in merger.plan.tensors:
        src = [merger._sources[(s.model, s.name)] for s in task.sources]
        ids = [f"m{i}" for i in range(len(src) - 1)]
        group = TensorGroup(entries=(TensorEntry("base", src[0], is_base=True),)
                            + tuple(TensorEntry(i, x) for i, x in zip(ids, src[1:])))
        impl.merge_group(group, **params, weight=dict(zip(ids, WEIGHTS)), density=dict(zip(ids, DENSITIES)))
    return time.perf_counter() - t0


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/fastmerge-bench"))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--mergekit-reps", type=int, default=1)
    args = ap.parse_args()
    models = args.workdir / "models-250m"
    if not (models / "ft2" / "config.json").exists():
        raise SystemExit(f"{models}: run bench/compare_mergekit.py first (it makes the models)")

    from fastmerge import Genome, Merger, cpu

    rows = []
    genome = Genome(weights=list(WEIGHTS), densities=list(DENSITIES))
    for method, variants in (("dare_ties", (True, False)), ("ties", (True,))):
        mergers, load_s = {}, {}
        for draw_cache in variants:  # dare_ties: both loaded, their merges alternate (same machine state)
            t0 = time.perf_counter()
            mergers[draw_cache] = Merger(recipe(models, method), draw_cache=draw_cache)
            load_s[draw_cache] = time.perf_counter() - t0
            # the constructor merged the recipe once (filling the draw cache): start over, so the first
            # timed merge is a search's first
            if draw_cache:
                mergers[draw_cache].draws = cpu.DrawCache()
        times: dict[bool, list[float]] = {v: [] for v in variants}
        for rep in range(args.reps):
            for v in variants if rep % 2 == 0 else variants[::-1]:
                t = time.perf_counter()
                mergers[v].merge(genome)
                times[v].append(time.perf_counter() - t)
        any_merger = mergers[variants[0]]
        mkm = statistics.median([mergekit_pass(any_merger, method) for _ in range(args.mergekit_reps)])
        for v in variants:
            fm = statistics.median(times[v])
            rows.append({"method": method, "draw_cache": v if method == "dare_ties" else "",
                         "params_m": round(sum(t.numel() for t in any_merger._params.values()) / 1e6, 1),
                         "load_s": round(load_s[v], 2), "first_merge_s": round(times[v][0], 3),
                         "fastmerge_merge_s": round(fm, 3), "mergekit_merge_group_s": round(mkm, 2),
                         "speedup": round(mkm / fm, 1), "threads": torch.get_num_threads(), "cpu": cpu_name(),
                         "cores": torch.get_num_threads(), "gpu": "none"})
        del mergers, any_merger
    out = HERE / "results" / "merger_inmemory.csv"
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("| method | draw cache | Merger.merge s (first) | mergekit merge_group s | speed-up |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        cache = {True: "on", False: "off"}.get(r["draw_cache"], "-")
        print(f"| {r['method']} | {cache} | {r['fastmerge_merge_s']} ({r['first_merge_s']}) | "
              f"{r['mergekit_merge_group_s']} | {r['speedup']}x |")
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
