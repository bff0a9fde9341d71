"""The paper's experiment in miniature, offline on a CPU: evolve merges of a Japanese model and an
English math model into a model that solves Japanese math problems in Japanese.

    python examples/toy_world/demo.py [--quick] [--work DIR] [--seed 0]

1. trains (or reuses) the toy world's tiny Llama models: a shared base, ``ja`` (answers Japanese
   questions in Japanese, never shown how to compute) and ``math_en`` (solves English problems);
2. runs the PS evolution (dare_ties weights/densities), then PS+DFS (a layer path over the PS merge
   and the sources), and a DFS evolution over the sources alone, with fitness ``acc_lang`` on the
   Japanese *search* split;
3. scores every source and every best merge on the held-out *test* split (Japanese: acc and
   acc_lang; English: acc) and writes ``RESULTS.md`` and ``results.png`` beside this file.

``--quick`` uses the quick models and small budgets: a smoke run of the whole pipeline (a test runs
it), not a result. Every number in the table comes from test problems, never used in training or
search.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import train  # noqa: E402
import world  # noqa: E402


@dataclass
class Budgets:
    """Evolution budgets and evaluation sizes of one demo run."""

    search_size: int = 100  # Japanese search problems per fitness evaluation
    test_size: int = 300  # test problems per language
    ps_generations: int = 20
    dfs_generations: int = 5
    psdfs_generations: int = 5
    popsize: int | None = None
    max_new_tokens: int = 48
    repetitions: int = 3
    extra: dict = field(default_factory=dict)


FULL = Budgets()
QUICK = Budgets(search_size=12, test_size=24, ps_generations=1, dfs_generations=1, psdfs_generations=1, popsize=4,
                max_new_tokens=40, repetitions=1)


def _evolve_config(models: dict[str, Path], data: dict[str, Path], space: str, b: Budgets, out: Path,
                   seed: int) -> dict:
    evaluator = {"name": "math", "data": str(data["search_ja"]), "lang": "ja", "template": world.PROMPT_TEMPLATE,
                 "batch_size": 32, "max_new_tokens": b.max_new_tokens, "limit": b.search_size}
    cfg = {
        "models": [str(models["ja"]), str(models["math_en"])],
        "base_model": str(models["base"]),
        "merge_method": "dare_ties",
        "space": space,
        "ps": {"weight": [0.0, 2.0], "density": [0.1, 1.0], "random_seed": seed,
               "budget": {"generations": b.ps_generations}},
        "dfs": {"repetitions": b.repetitions, "budget": {"generations": b.psdfs_generations if space == "ps+dfs"
                                                          else b.dfs_generations}},
        "evaluator": evaluator,
        "metric": "acc_lang",
        "cma": {"seed": seed, **({"popsize": b.popsize} if b.popsize else {})},
        "out": str(out),
    }
    return cfg


class _Bar:
    """A tqdm bar per evolve stage, fed by the library's progress callback."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar, self.stage = enabled, None, None

    def __call__(self, ev) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if ev.stage != self.stage or self.bar is None:
            if self.bar is not None:
                self.bar.close()
            self.stage = ev.stage
            self.bar = tqdm(total=ev.trials_total, desc=f"evolve {ev.stage}", unit="trial", dynamic_ncols=True)
        if ev.kind in ("trial", "generation", "end"):
            self.bar.update(ev.trials - self.bar.n)
            best = "-" if ev.best is None else f"{ev.best:.3f}"
            self.bar.set_postfix_str(f"gen {ev.generation} best {best} merge {ev.merge_s:.1f}s eval {ev.eval_s:.1f}s")
        if ev.kind == "end":
            self.bar.close()
            self.bar = None

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _score(model_dir: Path, data: dict[str, Path], b: Budgets, tokenizer: Path) -> dict:
    from fastmerge.evaluate import evaluate_checkpoint

    out = {}
    for lang in ("ja", "en"):
        spec = {"name": "math", "data": str(data[f"test_{lang}"]), "lang": lang, "template": world.PROMPT_TEMPLATE,
                "batch_size": 32, "max_new_tokens": b.max_new_tokens, "limit": b.test_size}
        m = evaluate_checkpoint(model_dir, spec, tokenizer=tokenizer)
        out[f"{lang}_acc"], out[f"{lang}_acc_lang"], out[f"{lang}_n"] = m["acc"], m["acc_lang"], m["n"]
    return out


def run(work: Path, quick: bool, seed: int, progress: bool = True, results_dir: Path = HERE) -> dict:
    from transformers.utils import logging as hf_logging

    import fastmerge.dfs  # noqa: F401  (registers the path-model class for the DFS exports)
    from fastmerge import evolve

    hf_logging.disable_progress_bar()  # one bar per stage is ours; no per-checkpoint loading bars

    b = QUICK if quick else FULL
    t_start = time.perf_counter()
    t = time.perf_counter()
    models = train.build_models(work, quick=quick, seed=seed, progress=progress)
    train_s = time.perf_counter() - t
    data = world.write_splits(work / "data", seed=seed)
    tag = "quick" if quick else "full"
    bar = _Bar(progress)
    stages: dict[str, dict] = {}
    try:
        for space in ("ps+dfs", "dfs"):
            out = work / f"evolve-{tag}-{space.replace('+', '-')}"
            shutil.rmtree(out, ignore_errors=True)  # a fresh search each run (the models are what is cached)
            t = time.perf_counter()
            result = evolve(_evolve_config(models, data, space, b, out, seed), materialize=True, progress=bar)
            wall = time.perf_counter() - t
            for st in result.stages:
                name = {"ps": "PS", "dfs": "PS+DFS" if space == "ps+dfs" else "DFS"}[st.stage]
                stages[name] = {"model": st.model_dir, "search_fitness": st.best_fitness, "trials": st.trials,
                                "generations": st.generations, "stage_dir": st.best_file.parent,
                                "plot": st.plot, "decoded": st.best_decoded}
            stages["PS+DFS" if space == "ps+dfs" else "DFS"]["evolve_wall_s"] = wall
    finally:
        bar.close()

    tok = models["base"]
    rows = []
    entries = [("base", "source (shared base)", models["base"]), ("ja", "source (Japanese)", models["ja"]),
               ("math_en", "source (English math)", models["math_en"])]
    entries += [(name, "merge: " + {"PS": "parameter space", "DFS": "data flow space",
                                    "PS+DFS": "parameter + data flow space"}[name], st["model"])
                for name, st in stages.items()]
    it = entries
    if progress:
        from tqdm import tqdm

        it = tqdm(entries, desc="scoring on the test split", unit="model")
    for name, kind, path in it:
        t = time.perf_counter()
        row = {"model": name, "type": kind, **_score(Path(path), data, b, tok), "score_s": time.perf_counter() - t}
        if name in stages:
            st = stages[name]
            row.update(search_fitness=st["search_fitness"], trials=st["trials"], generations=st["generations"])
        rows.append(row)
    total = time.perf_counter() - t_start
    summary = {"quick": quick, "seed": seed, "train_s": train_s, "total_s": total, "rows": rows,
               "budgets": b.__dict__, "machine": _machine(),
               "stages": {k: {kk: (str(vv) if isinstance(vv, Path) else vv) for kk, vv in v.items()}
                          for k, v in stages.items()}}
    _write_results(summary, results_dir, tag)
    return summary


def _machine() -> dict:
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__}


def _write_results(s: dict, results_dir: Path, tag: str) -> None:
    suffix = "" if tag == "full" else f"_{tag}"
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"results{suffix}.json").write_text(json.dumps(s, indent=1, default=str) + "\n")
    table = ["| model | type | JA acc | JA acc_lang | EN acc | search fitness | trials |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in s["rows"]:
        fit = f"{r['search_fitness']:.3f}" if "search_fitness" in r else ""
        table.append(f"| {r['model']} | {r['type']} | {r['ja_acc']:.3f} | {r['ja_acc_lang']:.3f} | {r['en_acc']:.3f} "
                     f"| {fit} | {r.get('trials', '')} |")
    n_ja, n_en = s["rows"][0]["ja_n"], s["rows"][0]["en_n"]
    stages = "\n".join(f"- {k}: {v['trials']} trials in {v['generations']} generations"
                       + (f", {v['evolve_wall_s']:.0f} s of evolution"
                          + (" (PS and PS+DFS together: one evolve call)" if k == "PS+DFS" else "")
                          if "evolve_wall_s" in v else "")
                       for k, v in s["stages"].items())
    m = s["machine"]
    sources = [r for r in s["rows"] if r["type"].startswith("source")]
    merges = [r for r in s["rows"] if r["type"].startswith("merge")]
    bs = max(sources, key=lambda r: r["ja_acc_lang"])
    bm = max(merges, key=lambda r: r["ja_acc_lang"])
    margin = bm["ja_acc_lang"] - bs["ja_acc_lang"]
    # standard error of a difference of two proportions on n problems each (unpaired: conservative)
    se = ((bm["ja_acc_lang"] * (1 - bm["ja_acc_lang"]) + bs["ja_acc_lang"] * (1 - bs["ja_acc_lang"])) / max(n_ja, 1)) ** 0.5
    verdict = (f"The best merge ({bm['model']}, JA acc_lang {bm['ja_acc_lang']:.3f}) "
               + ("beats" if margin > 0 else "does not beat")
               + f" the best source ({bs['model']}, {bs['ja_acc_lang']:.3f}) by {margin:+.3f} on the test split"
               + (f" ({n_ja} problems: one problem is {1 / n_ja:.3f}; the margin is {margin / se:.1f} standard "
                  f"errors of the difference)." if n_ja and se > 0 else "."))
    text = f"""# Toy world results{' (--quick smoke run: tiny budgets, not a result)' if s['quick'] else ''}

Measured by `python examples/toy_world/demo.py{' --quick' if s['quick'] else ''}` on {m['cpu']} ({m['threads']} threads),
torch {m['torch']}: training {s['train_s']:.0f} s (0 when cached), whole run {s['total_s']:.0f} s.
Test split: {n_ja} Japanese and {n_en} English problems, none seen in training or search. `acc_lang`:
the last number is the answer and fastText lid.176 detects the output as the problem's language.

{chr(10).join(table)}

Budgets (fitness = Japanese `acc_lang` on {s['budgets']['search_size']} search problems):
{stages}

![results](results{suffix}.png)

{verdict} Why the world is or is not mergeable, every design tried and its measurements:
[NOTES.md](NOTES.md).
"""
    (results_dir / f"RESULTS{suffix}.md").write_text(text)
    _plot(s, results_dir / f"results{suffix}.png")


def _plot(s: dict, file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = s["rows"]
    names = [r["model"] for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(8, 3.6))
    w = 0.27
    for i, (key, label) in enumerate((("ja_acc", "JA acc"), ("ja_acc_lang", "JA acc_lang"), ("en_acc", "EN acc"))):
        ax.bar([j + (i - 1) * w for j in x], [r[key] for r in rows], w, label=label)
    ax.set_xticks(list(x), names)
    ax.set_ylabel("accuracy (test split)")
    ax.set_title("toy world: sources vs evolved merges")
    ax.legend(frameon=False, ncol=3)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="quick models, tiny budgets: a smoke run, not a result")
    ap.add_argument("--work", default=str(HERE / "work"), help="models, data and evolve runs (default: work/)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", default=str(HERE), help="where RESULTS.md and results.png go")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    s = run(Path(args.work), args.quick, args.seed, progress=not args.no_progress, results_dir=Path(args.results))
    print(Path(args.results) / ("RESULTS_quick.md" if args.quick else "RESULTS.md"))
    for r in s["rows"]:
        print(f"{r['model']:8s} JA acc {r['ja_acc']:.3f}  JA acc_lang {r['ja_acc_lang']:.3f}  EN acc {r['en_acc']:.3f}")
    print(f"total {s['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
