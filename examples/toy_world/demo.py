"""The paper's experiment in miniature, offline on a CPU: evolve merges of a Japanese model and an
English math model into a model that solves Japanese math problems in Japanese.

    python examples/toy_world/demo.py [--quick] [--work DIR] [--seed 0] [--search-seeds 0 1 2]

1. trains (or reuses) the toy world's tiny Llama models: a shared base, ``ja`` (answers Japanese
   questions in Japanese, never shown how to compute) and ``math_en`` (solves English problems);
   ``--seed`` is the world's seed (problems, splits, training);
2. for every search seed (``--search-seeds``: the CMA-ES seed and the DARE ``random_seed``), on the
   same models and data: the PS evolution (dare_ties weights/densities), then PS+DFS (a layer path
   over that PS merge and the sources), and a DFS evolution over the sources alone, with fitness
   ``acc_lang`` on the Japanese *search* split;
3. scores every source (once: they do not depend on the search seed) and every seed's best merge of
   every stage on the held-out *test* split (Japanese: acc and acc_lang; English: acc), and writes
   ``RESULTS.md``, ``results.json`` and ``results.png`` beside this file: per stage each seed's
   scores, their mean, min-max and standard deviation, and only the claims that hold in every seed.

Why several search seeds: one CMA-ES run is one path through a noisy fitness landscape (100 search
problems; a last-digit difference in training on another CPU is enough to send it elsewhere), so a
single seed's ranking of the stages does not carry over to another machine; what holds across seeds
is what the demo claims.

``--quick`` uses the quick models, two search seeds and small budgets: a smoke run of the whole
pipeline (a test runs it), not a result. Every number in the tables comes from test problems, never
used in training or search.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import train  # noqa: E402
import world  # noqa: E402

#: the evolved stages, in the order of the tables
STAGES = ("PS", "PS+DFS", "DFS")
STAGE_KIND = {"PS": "merge: parameter space", "PS+DFS": "merge: parameter + data flow space",
              "DFS": "merge: data flow space"}
#: the test-split scores summarized per stage over the search seeds
METRICS = ("ja_acc", "ja_acc_lang", "en_acc")


@dataclass
class Budgets:
    """Evolution budgets and evaluation sizes of one demo run (per search seed)."""

    search_size: int = 100  # Japanese search problems per fitness evaluation
    test_size: int = 300  # test problems per language
    ps_generations: int = 20
    # 5 generations each with one search seed; 4 since the demo runs three (about 20 minutes in all)
    dfs_generations: int = 4
    psdfs_generations: int = 4
    popsize: int | None = None
    max_new_tokens: int = 48
    repetitions: int = 3
    search_seeds: tuple[int, ...] = (0, 1, 2)
    extra: dict = field(default_factory=dict)


FULL = Budgets()
QUICK = Budgets(search_size=12, test_size=24, ps_generations=1, dfs_generations=1, psdfs_generations=1, popsize=4,
                max_new_tokens=40, repetitions=1, search_seeds=(0, 1))


def _evolve_config(models: dict[str, Path], data: dict[str, Path], space: str, b: Budgets, out: Path,
                   search_seed: int) -> dict:
    """One evolve call; ``search_seed`` seeds CMA-ES and the DARE masks (``random_seed``)."""
    evaluator = {"name": "math", "data": str(data["search_ja"]), "lang": "ja", "template": world.PROMPT_TEMPLATE,
                 "batch_size": 32, "max_new_tokens": b.max_new_tokens, "limit": b.search_size}
    cfg = {
        "models": [str(models["ja"]), str(models["math_en"])],
        "base_model": str(models["base"]),
        "merge_method": "dare_ties",
        "space": space,
        "ps": {"weight": [0.0, 2.0], "density": [0.1, 1.0], "random_seed": search_seed,
               "budget": {"generations": b.ps_generations}},
        "dfs": {"repetitions": b.repetitions, "budget": {"generations": b.psdfs_generations if space == "ps+dfs"
                                                          else b.dfs_generations}},
        "evaluator": evaluator,
        "metric": "acc_lang",
        "cma": {"seed": search_seed, **({"popsize": b.popsize} if b.popsize else {})},
        "out": str(out),
    }
    return cfg


class _Bar:
    """A tqdm bar per evolve stage, fed by the library's progress callback."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar, self.stage, self.label = enabled, None, None, ""

    def __call__(self, ev) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if ev.stage != self.stage or self.bar is None:
            if self.bar is not None:
                self.bar.close()
            self.stage = ev.stage
            self.bar = tqdm(total=ev.trials_total, desc=f"evolve {self.label}{ev.stage}", unit="trial",
                            dynamic_ncols=True)
        if ev.kind in ("trial", "generation", "end"):
            self.bar.update(ev.trials - self.bar.n)
            best = "-" if ev.best is None else f"{ev.best:.3f}"
            self.bar.set_postfix_str(f"gen {ev.generation} best {best} merge {ev.merge_s:.1f}s eval {ev.eval_s:.1f}s")
        if ev.kind == "end":
            self.bar.close()
            self.bar = None

    def start(self, label: str) -> None:
        self.close()
        self.label, self.stage = label, None

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _score(model_dir: Path, data: dict[str, Path], b: Budgets, tokenizer: Path) -> dict:
    from fastmerge.evaluate import evaluate_checkpoint

    out = {}
    for lang in ("ja", "en"):
        spec = {"name": "math", "data": str(data[f"test_{lang}"]), "lang": lang, "template": world.PROMPT_TEMPLATE,
                "batch_size": 32, "max_new_tokens": b.max_new_tokens, "limit": b.test_size}
        m = evaluate_checkpoint(model_dir, spec, tokenizer=tokenizer)
        out[f"{lang}_acc"], out[f"{lang}_acc_lang"], out[f"{lang}_n"] = m["acc"], m["acc_lang"], m["n"]
    return out


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def run(work: Path, quick: bool, seed: int, progress: bool = True, results_dir: Path = HERE,
        search_seeds: list[int] | tuple[int, ...] | None = None, command: str | None = None) -> dict:
    """The whole demo; returns the summary written to ``results[_quick].json``.

    ``seed`` is the world and training seed; each of ``search_seeds`` (default: the budget's) runs
    every evolution stage once on the same models and data. ``command``: the command line to quote in
    RESULTS.md (default: the plain demo command).
    """
    from transformers.utils import logging as hf_logging

    import fastmerge.dfs  # noqa: F401  (registers the path-model class for the DFS exports)
    from fastmerge import evolve

    hf_logging.disable_progress_bar()  # one bar per stage is ours; no per-checkpoint loading bars

    b = QUICK if quick else FULL
    search_seeds = list(b.search_seeds if search_seeds is None else search_seeds)
    if not search_seeds or len(set(search_seeds)) != len(search_seeds) or min(search_seeds) < 0:
        raise ValueError(f"search seeds must be distinct non-negative integers, got {search_seeds}")
    loads = [_load()]
    t_start = time.perf_counter()
    t = time.perf_counter()
    models = train.build_models(work, quick=quick, seed=seed, progress=progress)
    train_s = time.perf_counter() - t
    trained_s = _trained_seconds(models)
    loads.append(_load())
    data = world.write_splits(work / "data", seed=seed)
    tag = "quick" if quick else "full"
    bar = _Bar(progress)
    runs: list[dict] = []  # per search seed: {"search_seed", "evolve_s", "stages": {name: {...}}}
    try:
        for s in search_seeds:
            stages: dict[str, dict] = {}
            t_seed = time.perf_counter()
            for space in ("ps+dfs", "dfs"):
                out = work / f"evolve-{tag}-{space.replace('+', '-')}-s{s}"
                shutil.rmtree(out, ignore_errors=True)  # a fresh search each run (the models are what is cached)
                bar.start(f"seed {s} {'ps+dfs/' if space == 'ps+dfs' else ''}")
                t = time.perf_counter()
                result = evolve(_evolve_config(models, data, space, b, out, s), materialize=True, progress=bar)
                wall = time.perf_counter() - t
                for st in result.stages:
                    name = {"ps": "PS", "dfs": "PS+DFS" if space == "ps+dfs" else "DFS"}[st.stage]
                    stages[name] = {"model": str(st.model_dir), "search_fitness": st.best_fitness,
                                    "trials": st.trials, "generations": st.generations,
                                    "stop_reason": st.stop_reason, "stage_dir": str(st.best_file.parent),
                                    "plot": None if st.plot is None else str(st.plot), "decoded": st.best_decoded}
                stages["PS+DFS" if space == "ps+dfs" else "DFS"]["evolve_wall_s"] = wall
                loads.append(_load())
            runs.append({"search_seed": s, "evolve_s": time.perf_counter() - t_seed, "stages": stages})
    finally:
        bar.close()

    t_score = time.perf_counter()
    tok = models["base"]
    entries = [("base", "source (shared base)", models["base"], None),
               ("ja", "source (Japanese)", models["ja"], None),
               ("math_en", "source (English math)", models["math_en"], None)]
    entries += [(name, STAGE_KIND[name], Path(r["stages"][name]["model"]), r) for r in runs for name in STAGES]
    it = entries
    if progress:
        from tqdm import tqdm

        it = tqdm(entries, desc="scoring on the test split", unit="model")
    rows = []
    for name, kind, path, r in it:
        t = time.perf_counter()
        row = {"model": name, "type": kind, **_score(path, data, b, tok), "score_s": time.perf_counter() - t}
        if r is not None:
            st = r["stages"][name]
            row.update(search_seed=r["search_seed"], search_fitness=st["search_fitness"], trials=st["trials"],
                       generations=st["generations"])
        rows.append(row)
    score_s = time.perf_counter() - t_score
    loads.append(_load())
    total = time.perf_counter() - t_start
    summary = {"command": command or "python examples/toy_world/demo.py" + (" --quick" if quick else ""),
               "quick": quick, "seed": seed, "search_seeds": search_seeds, "train_s": train_s,
               "trained_s": trained_s,
               "evolve_s": sum(r["evolve_s"] for r in runs), "score_s": score_s, "total_s": total,
               "load_1min": [x for x in loads if x is not None], "rows": rows, "budgets": asdict(b),
               "machine": _machine(), "runs": runs, "summary": summarize(rows)}
    _write_results(summary, results_dir, tag)
    return summary


def _trained_seconds(models: dict[str, Path]) -> float | None:
    """How long training the (possibly cached) models took when they were trained, from their metadata."""
    try:
        return sum(json.loads((p / "toy_world.json").read_text())["seconds"] for p in models.values())
    except (OSError, KeyError, TypeError, ValueError):
        return None


def _stats(values: list[float]) -> dict:
    """mean, min, max and the sample standard deviation (n - 1; 0 for one value) of values."""
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def _se_diff(p: float, q: float, n: int) -> float:
    """Standard error of a difference of two proportions on n problems each (unpaired: conservative)."""
    return ((p * (1 - p) + q * (1 - q)) / max(n, 1)) ** 0.5


def summarize(rows: list[dict]) -> dict:
    """Per stage: each seed's test scores and their statistics; the best source; per seed the margin
    of the stage over the best source (JA acc_lang) in standard errors of the difference."""
    sources = [r for r in rows if "search_seed" not in r]
    best = max(sources, key=lambda r: r["ja_acc_lang"])
    out = {"best_source": {"model": best["model"], "ja_acc_lang": best["ja_acc_lang"]}, "stages": {}}
    for name in STAGES:
        mine = sorted((r for r in rows if r["model"] == name and "search_seed" in r), key=lambda r: r["search_seed"])
        if not mine:
            continue
        seeds = []
        for r in mine:
            margin = r["ja_acc_lang"] - best["ja_acc_lang"]
            se = _se_diff(r["ja_acc_lang"], best["ja_acc_lang"], r["ja_n"])
            seeds.append({"search_seed": r["search_seed"], **{k: r[k] for k in (*METRICS, "search_fitness")},
                          "margin_vs_best_source": margin, "margin_se": margin / se if se > 0 else None})
        out["stages"][name] = {"seeds": seeds,
                               **{k: _stats([x[k] for x in seeds]) for k in (*METRICS, "search_fitness")}}
    return out


def claims(s: dict) -> list[str]:
    """The statements about the JA acc_lang test scores that hold across the search seeds, in words."""
    sm = s["summary"]
    bs_name, bs = sm["best_source"]["model"], sm["best_source"]["ja_acc_lang"]
    n_seeds = len(s["search_seeds"])
    every = "in the one seed" if n_seeds == 1 else f"in every one of the {n_seeds} seeds"
    out = []
    for name, st in sm["stages"].items():
        v = st["ja_acc_lang"]
        above = [x for x in st["seeds"] if x["ja_acc_lang"] > bs]
        low = [x for x in st["seeds"] if x["ja_acc_lang"] <= bs]
        if not low:
            ses = [x["margin_se"] for x in st["seeds"] if x["margin_se"] is not None]
            sig = f", at least {min(ses):.1f} standard errors of the difference" if ses else ""
            out.append(f"**{name} beats the best source {every}**: its lowest JA acc_lang is {v['min']:.3f} against "
                       f"`{bs_name}`'s {bs:.3f} (mean {v['mean']:.3f}, std {v['std']:.3f}; smallest margin "
                       f"{v['min'] - bs:+.3f}{sig}).")
        elif not above:
            out.append(f"**{name} does not beat the best source in any seed**: its highest JA acc_lang is "
                       f"{v['max']:.3f} against `{bs_name}`'s {bs:.3f} (mean {v['mean']:.3f}).")
        else:
            lows = ", ".join(f"seed {x['search_seed']}: {x['ja_acc_lang']:.3f}" for x in low)
            out.append(f"**{name} beats the best source in {len(above)} of {n_seeds} seeds only**: at or below "
                       f"`{bs_name}`'s {bs:.3f} in {lows} (mean {v['mean']:.3f}, range {v['min']:.3f}-{v['max']:.3f}).")
    # the stages against each other, paired by seed (same models, data and seed)
    st = sm["stages"]
    for a, c in (("PS+DFS", "PS"), ("DFS", "PS"), ("DFS", "PS+DFS")):
        if a not in st or c not in st:
            continue
        pairs = [(x["ja_acc_lang"], y["ja_acc_lang"]) for x, y in zip(st[a]["seeds"], st[c]["seeds"])]
        hi = sum(x > y for x, y in pairs)
        lo = sum(x < y for x, y in pairs)
        diff = statistics.fmean(x - y for x, y in pairs)
        if hi == len(pairs):
            verdict = f"{a} is above {c} in every seed"
        elif lo == len(pairs):
            verdict = f"{a} is below {c} in every seed"
        else:
            verdict = (f"{a} vs {c} depends on the seed (above in {hi}, below in {lo}, equal in "
                       f"{len(pairs) - hi - lo} of {len(pairs)})")
        out.append(f"{verdict}: mean difference {diff:+.3f} JA acc_lang.")
    return out


def _machine() -> dict:
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__}


def _fmt_range(st: dict) -> str:
    return f"{st['mean']:.3f} | {st['min']:.3f}-{st['max']:.3f} | {st['std']:.3f}"


def _decoded_short(decoded: dict | None, names: list[str]) -> str:
    """A global PS merge's weights and densities, one line: ``ja w 0.63 d 0.70; math_en w ...`` (``decoded``
    as evolve reports it: ``{"weights": [[[w per model]]], "densities": ...}``); "" for any other shape."""
    try:
        (ws,), = decoded["weights"]
        (ds,), = decoded["densities"]
        if len(ws) != len(names) or len(ds) != len(names):
            return ""
        return "; ".join(f"{n} w {w:.2f} d {d:.2f}" for n, w, d in zip(names, ws, ds))
    except (KeyError, TypeError, ValueError):
        return ""


def _write_results(s: dict, results_dir: Path, tag: str) -> None:
    suffix = "" if tag == "full" else f"_{tag}"
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"results{suffix}.json").write_text(json.dumps(s, indent=1, default=str) + "\n")
    rows, sm, m, b = s["rows"], s["summary"], s["machine"], s["budgets"]
    seeds = s["search_seeds"]
    sources = [r for r in rows if "search_seed" not in r]
    n_ja, n_en = sources[0]["ja_n"], sources[0]["en_n"]

    src = ["| model | type | JA acc | JA acc_lang | EN acc |", "| --- | --- | ---: | ---: | ---: |"]
    src += [f"| {r['model']} | {r['type']} | {r['ja_acc']:.3f} | {r['ja_acc_lang']:.3f} | {r['en_acc']:.3f} |"
            for r in sources]

    agg = ["| stage | JA acc_lang mean | min-max | std | JA acc mean | min-max | std | EN acc mean | min-max | std "
           "| per seed JA acc_lang |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, st in sm["stages"].items():
        per = " / ".join(f"{x['ja_acc_lang']:.3f}" for x in st["seeds"])
        agg.append(f"| {name} | {_fmt_range(st['ja_acc_lang'])} | {_fmt_range(st['ja_acc'])} "
                   f"| {_fmt_range(st['en_acc'])} | {per} |")

    per_seed = ["| stage | search seed | JA acc | JA acc_lang | EN acc | search fitness | trials | vs best source "
                "(JA acc_lang) |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    by_key = {(r["model"], r["search_seed"]): r for r in rows if "search_seed" in r}
    for name, st in sm["stages"].items():
        for x in st["seeds"]:
            r = by_key[(name, x["search_seed"])]
            se = "" if x["margin_se"] is None else f" ({x['margin_se']:.1f} SE)"
            per_seed.append(f"| {name} | {x['search_seed']} | {r['ja_acc']:.3f} | {r['ja_acc_lang']:.3f} "
                            f"| {r['en_acc']:.3f} | {r['search_fitness']:.3f} | {r['trials']} "
                            f"| {x['margin_vs_best_source']:+.3f}{se} |")

    ps_lines = []
    for r in s["runs"]:
        d = _decoded_short(r["stages"].get("PS", {}).get("decoded"), ["ja", "math_en"])
        if d:
            ps_lines.append(f"- seed {r['search_seed']}: {d}")

    first = s["runs"][0]["stages"]
    budgets = "\n".join(
        f"- {k}: {first[k]['trials']} trials in {first[k]['generations']} generation"
        f"{'' if first[k]['generations'] == 1 else 's'} per seed"
        for k in STAGES if k in first)
    evolve_walls = ", ".join(f"seed {r['search_seed']} {r['evolve_s']:.0f} s" for r in s["runs"])
    loads = s.get("load_1min") or []
    load_txt = (f" The 1-minute load average, sampled between phases, ranged {min(loads):.1f}-{max(loads):.1f} on "
                f"{m['cores']} cores (this run itself accounts for about {min(m['threads'], m['cores'] or 1)}); a "
                f"higher load means other jobs shared the CPUs and inflated these wall times." if loads else "")
    trained = s.get("trained_s")
    train_note = (f" (models cached: training them took {trained:.0f} s when they were trained)"
                  if trained is not None and s["train_s"] < 0.5 * trained else "")
    seed_word = "seed" if len(seeds) == 1 else "seeds"
    text = f"""# Toy world results{' (--quick smoke run: tiny budgets, not a result)' if s['quick'] else ''}

Measured by `{s.get('command') or 'python examples/toy_world/demo.py' + (' --quick' if s['quick'] else '')}` (world seed {s['seed']}, search
{seed_word} {' '.join(map(str, seeds))}) on {m['cpu']} ({m['threads']} thread{'' if m['threads'] == 1 else 's'}), torch {m['torch']}: training
{s['train_s']:.0f} s{train_note}, evolution {s['evolve_s']:.0f} s ({evolve_walls}), scoring
{s['score_s']:.0f} s, whole run {s['total_s']:.0f} s.{load_txt}

Test split: {n_ja} Japanese and {n_en} English problems, none seen in training or search. `acc_lang`:
the last number is the answer and fastText lid.176 detects the output as the problem's language.
Every evolution stage ran once per search seed (the CMA-ES seed and the DARE `random_seed`) on the
same trained models and data; each run's best merge (by search fitness) is scored on the test split.

## What holds across the {len(seeds)} search {seed_word}

{chr(10).join('- ' + c for c in claims(s))}

One test problem is {1 / max(n_ja, 1):.3f} of JA acc_lang; "SE" is the standard error of the difference
between a merge's and the best source's JA acc_lang (unpaired, {n_ja} problems each: conservative).

## Sources (deterministic: scored once)

{chr(10).join(src)}

## Evolved merges over the search seeds (test split; std: sample standard deviation)

{chr(10).join(agg)}

![results](results{suffix}.png)

## Each search seed

{chr(10).join(per_seed)}
{(chr(10) + 'PS weights (w) and densities (d) found per seed:' + chr(10) + chr(10).join(ps_lines) + chr(10))
 if ps_lines else ''}
Budgets per search seed (fitness = Japanese `acc_lang` on {b['search_size']} search problems):
{budgets}

Why the world is or is not mergeable, every design tried and its measurements: [NOTES.md](NOTES.md).
"""
    (results_dir / f"RESULTS{suffix}.md").write_text(text)
    _plot(s, results_dir / f"results{suffix}.png")


def _plot(s: dict, file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = [r for r in s["rows"] if "search_seed" not in r]
    st = s["summary"]["stages"]
    names = [r["model"] for r in sources] + list(st)
    x = list(range(len(names)))
    fig, ax = plt.subplots(figsize=(8.5, 3.9))
    w = 0.27
    n = len(s["search_seeds"])
    for i, (key, label) in enumerate((("ja_acc", "JA acc"), ("ja_acc_lang", "JA acc_lang"), ("en_acc", "EN acc"))):
        pos = [j + (i - 1) * w for j in x]
        means = [r[key] for r in sources] + [st[k][key]["mean"] for k in st]
        ax.bar(pos, means, w, label=label)
        ms = pos[len(sources):]
        lo = [st[k][key]["mean"] - st[k][key]["min"] for k in st]
        hi = [st[k][key]["max"] - st[k][key]["mean"] for k in st]
        ax.errorbar(ms, [st[k][key]["mean"] for k in st], yerr=[lo, hi], fmt="none", ecolor="black", elinewidth=1,
                    capsize=3)
        for p, k in zip(ms, st):
            ys = [seed[key] for seed in st[k]["seeds"]]
            ax.plot([p] * len(ys), ys, "o", ms=2.5, color="black", alpha=0.6)
    top = max([r[k] for r in sources for k in METRICS] + [st[k][m]["max"] for k in st for m in METRICS] + [0.05])
    ax.set_ylim(0, min(1.0, top * 1.25))
    ax.set_xticks(x, names)
    ax.set_ylabel("accuracy (test split)")
    ax.set_title(f"toy world: sources vs evolved merges (merges: mean over {n} search seeds, "
                 "whiskers min-max, dots seeds)", fontsize=9)
    ax.legend(frameon=False, ncol=3)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="quick models, tiny budgets: a smoke run, not a result")
    ap.add_argument("--work", default=str(HERE / "work"), help="models, data and evolve runs (default: work/)")
    ap.add_argument("--seed", type=int, default=0, help="the world's seed: problems, splits and training (default 0)")
    ap.add_argument("--search-seeds", type=int, nargs="+", default=None, metavar="SEED",
                    help="one run of every evolution stage per seed (CMA-ES seed and DARE random_seed), on the "
                         f"same models (default: {' '.join(map(str, FULL.search_seeds))}; with --quick "
                         f"{' '.join(map(str, QUICK.search_seeds))})")
    ap.add_argument("--results", default=str(HERE), help="where RESULTS.md, results.json and results.png go")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.search_seeds is not None and (len(set(args.search_seeds)) != len(args.search_seeds)
                                          or min(args.search_seeds) < 0):
        ap.error("--search-seeds: distinct non-negative integers")
    if args.threads:
        torch.set_num_threads(args.threads)
    s = run(Path(args.work), args.quick, args.seed, progress=not args.no_progress, results_dir=Path(args.results),
            search_seeds=args.search_seeds,
            command=" ".join(["python examples/toy_world/demo.py", *(sys.argv[1:] if argv is None else argv)]))
    print(Path(args.results) / ("RESULTS_quick.md" if args.quick else "RESULTS.md"))
    for r in s["rows"]:
        if "search_seed" not in r:
            print(f"{r['model']:8s}         JA acc {r['ja_acc']:.3f}  JA acc_lang {r['ja_acc_lang']:.3f}  "
                  f"EN acc {r['en_acc']:.3f}")
    for r in s["rows"]:
        if "search_seed" in r:
            print(f"{r['model']:8s} seed {r['search_seed']:<3d} JA acc {r['ja_acc']:.3f}  JA acc_lang "
                  f"{r['ja_acc_lang']:.3f}  EN acc {r['en_acc']:.3f}")
    for name, st in s["summary"]["stages"].items():
        v = st["ja_acc_lang"]
        print(f"{name:8s} JA acc_lang mean {v['mean']:.3f}  min {v['min']:.3f}  max {v['max']:.3f}  std {v['std']:.3f}")
    print(f"total {s['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
