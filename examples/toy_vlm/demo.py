"""EvoVLM-JP in miniature: evolve a merge of a tiny English VLM with a tiny Japanese text LM that answers
Japanese questions about pictures, and score it on held-out pictures against its sources.

    python examples/toy_vlm/demo.py [--quick] [--threads N]      # or: make demo-vlm

1. Train (or reuse, cached under ``work/``) the toy visual world's models (``train_vlm.py``): ``base`` (a
   tiny text Mistral), ``ja`` (base + Japanese chat, text only) and ``vlm_en`` (a tiny LLaVA: a CLIP
   vision tower and projector trained from scratch with the base's language model, on English questions
   about pictures).
2. Write the data (``picture_world.py``): Japanese questions about search pictures and about test pictures
   (disjoint seeds: no model saw these pictures), English questions about the test pictures.
3. Score the sources on the test pictures: ``vlm_en`` as it is, and ``ja`` in ``vlm_en``'s frame (the
   VLM's vision tower and projector, ``ja`` as its language model: a text LM cannot look at pictures
   otherwise), and ``base`` in the same frame; plus a small grid of task-arithmetic merges.
4. ``fastmerge evolve``: PS over the VLM (layer-wise dare_ties weights and densities for ``vlm_en`` and
   ``ja`` over ``base``, CMA-ES), fitness = the vqa evaluator's language-gated ROUGE-L on the Japanese
   search questions (``lang: ja``: an English answer scores 0), as ``examples/evolve/paper_vlm_ja.yml``
   does at 7B.
5. Score the evolved merge on the test pictures and write ``RESULTS.md`` and ``results.json`` here.

Metrics (test pictures, Japanese questions): ``rouge_l`` (the fitness: ROUGE-L F1 over MeCab words, 0
for a non-Japanese answer), ``acc_lang`` (share of answers in Japanese) and ``exact`` (the normalised
answer equals the reference: right and in Japanese).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import picture_world as world  # noqa: E402
import train_vlm as train  # noqa: E402


@dataclass(frozen=True)
class DemoConfig:
    search_size: int = 120
    test_size: int = 200
    popsize: int = 10
    generations: int = 15
    max_new_tokens: int = 16
    grid: tuple[float, ...] = (0.0, 0.5, 1.0)
    search_seeds: tuple[int, ...] = (0, 1, 2)


#: answers are one sentence: cut at the first Japanese full stop (every model alike; an English answer is
#: not cut by it and still scores 0 under the ja gate)
STOP = ["。"]

FULL = DemoConfig()
QUICK = DemoConfig(search_size=16, test_size=24, popsize=4, generations=1, grid=(1.0,), search_seeds=(0,))


def write_data(work: Path, cfg: DemoConfig) -> dict[str, Path]:
    data = work / "data"
    search = world.make_items("search", cfg.search_size)
    test = world.make_items("test", cfg.test_size)
    return {"search_ja": world.write_vqa(search, data, "ja"), "test_ja": world.write_vqa(test, data, "ja"),
            "test_en": world.write_vqa(test, data, "en")}


def in_frame(vlm_dir: Path, text_dir: Path, out: Path) -> Path:
    """``vlm_dir``'s checkpoint with ``text_dir``'s weights as its language model (vision side kept)."""
    from transformers import AutoModelForCausalLM

    from fastmerge.vqa import load_vlm

    if (out / "config.json").exists():
        return out
    vlm = load_vlm(vlm_dir)
    lm = AutoModelForCausalLM.from_pretrained(text_dir, dtype=torch.float32)
    vlm.model.language_model.load_state_dict(lm.model.state_dict())
    vlm.lm_head.load_state_dict(lm.lm_head.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vlm.save_pretrained(tmp)
    for f in vlm_dir.iterdir():
        if f.suffix in (".json", ".jinja") and f.name not in ("config.json", "generation_config.json",
                                                               "model.safetensors.index.json", "toy_vlm.json"):
            shutil.copy(f, tmp / f.name)
    tmp.rename(out)
    return out


def score(model_dir: Path, data: Path, lang: str, cfg: DemoConfig) -> dict:
    """The vqa evaluator's metrics plus ``exact`` and per-kind ``exact``; ``samples``: a few outputs."""
    from fastmerge import rouge
    from fastmerge.vqa import VQAEvaluator, load_vlm

    ev = VQAEvaluator(data, lang=lang, batch_size=32, max_new_tokens=cfg.max_new_tokens, stop=STOP)
    m = ev(load_vlm(model_dir))
    kinds = [json.loads(line)["kind"] for line in data.read_text().splitlines()]
    hits = [rouge.normalize(o["output"]) == rouge.normalize(o["references"][0]) for o in ev.last_outputs]
    m["exact"] = statistics.fmean(hits)
    for k in world.KINDS:
        sel = [h for h, kk in zip(hits, kinds) if kk == k]
        m[f"exact_{k}"] = statistics.fmean(sel) if sel else 0.0
    m["per_item"] = {"rouge_l": [o["rouge_l_gated"] for o in ev.last_outputs], "exact": [float(h) for h in hits]}
    m["samples"] = [{"q": o["question"], "ref": o["references"][0], "out": o["output"]} for o in ev.last_outputs[:4]]
    return m


def merge_ta(paths: dict, w_vlm: float, w_ja: float, out: Path) -> Path:
    import fastmerge

    if not (out / "config.json").exists():
        recipe = {"merge_method": "task_arithmetic", "base_model": str(paths["base"]),
                  "models": [{"model": str(paths["vlm_en"]), "parameters": {"weight": w_vlm}},
                             {"model": str(paths["ja"]), "parameters": {"weight": w_ja}}],
                  "dtype": "float32"}
        fastmerge.merge(recipe, out)
    return out


def evolve_config(paths: dict, data: dict, work: Path, cfg: DemoConfig, seed: int = 0) -> dict:
    return {
        "models": [str(paths["vlm_en"]), str(paths["ja"])], "base_model": str(paths["base"]),
        "merge_method": "dare_ties", "space": "ps",
        "ps": {"group_size": 1, "weight": [0.0, 1.5], "density": [0.0, 1.0],
               "parameters": {"normalize": False, "rescale": True}, "random_seed": 42 + seed},
        "evaluator": {"name": "vqa", "data": str(data["search_ja"]), "lang": "ja", "batch_size": 40,
                      "max_new_tokens": cfg.max_new_tokens, "stop": STOP},
        "metric": "score",
        "cma": {"x0": 0.5, "sigma0": 1 / 6, "popsize": cfg.popsize, "seed": seed},
        "budget": {"generations": cfg.generations},
        "out": str(work / f"evolve-{seed}"), "device": "cpu",
    }


def run(work: Path, quick: bool = False, log=print, results_dir: Path | None = HERE) -> dict:
    from fastmerge.evolve import evolve

    cfg = QUICK if quick else FULL
    t0 = time.perf_counter()
    paths = train.build_models(work, quick=quick, log=log)
    t_train = time.perf_counter() - t0
    data = write_data(work, cfg)
    mdir = work / ("merges-quick" if quick else "merges")
    models = {"vlm_en": paths["vlm_en"], "ja (in vlm_en's frame)": in_frame(paths["vlm_en"], paths["ja"], mdir / "ja_frame"),
              "base (in vlm_en's frame)": in_frame(paths["vlm_en"], paths["base"], mdir / "base_frame")}
    rows = []

    def add(name: str, d: Path, kind: str, extra: dict | None = None) -> None:
        ja = score(d, data["test_ja"], "ja", cfg)
        en = score(d, data["test_en"], "en", cfg)
        row = {"model": name, "kind": kind, "ja_rouge_l": ja["rouge_l"], "ja_acc_lang": ja["acc_lang"],
               "ja_exact": ja["exact"], **{f"ja_{k}": ja[k] for k in ja if k.startswith("exact_")},
               "en_exact": en["exact"], "en_rouge_l": en["rouge_l"], "n": ja["n"], "samples_ja": ja["samples"],
               "per_item_ja": ja["per_item"],
               **(extra or {})}
        rows.append(row)
        log(f"{name}: JA rouge_l {row['ja_rouge_l']:.3f} acc_lang {row['ja_acc_lang']:.3f} exact "
            f"{row['ja_exact']:.3f} | EN exact {row['en_exact']:.3f}")

    for name, d in models.items():
        add(name, d, "source" if "base" not in name else "reference")
    for a in cfg.grid:
        for b in cfg.grid:
            if (a, b) in ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0)):
                continue  # the base / the sources themselves
            add(f"ta(vlm={a}, ja={b})", merge_ta(paths, a, b, mdir / f"ta_{a}_{b}"), "grid")
    sources = [r for r in rows if r["kind"] == "source"]
    best = max(sources, key=lambda r: r["ja_rouge_l"])
    search_scores = {name: score(d, data["search_ja"], "ja", cfg)["rouge_l"] for name, d in models.items()}
    t1 = time.perf_counter()
    for seed in cfg.search_seeds:  # one search per seed (CMA-ES and DARE seeds), each scored on the test split
        ec = evolve_config(paths, data, work, cfg, seed)
        shutil.rmtree(ec["out"], ignore_errors=True)
        res = evolve(ec, materialize=True).best
        name = f"evolved PS merge (seed {seed})"
        add(name, Path(res.model_dir), "evolved", {"search_rouge_l": res.best_fitness, "trials": res.trials,
                                                  "search_seed": seed})
        search_scores[name] = res.best_fitness
        # against the best source, per test question (paired): margin and its standard error
        evo = rows[-1]
        for key in ("rouge_l", "exact"):
            d = [a - b for a, b in zip(evo["per_item_ja"][key], best["per_item_ja"][key])]
            se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("nan")
            evo[f"margin_{key}"] = {"vs": best["model"], "margin": statistics.fmean(d), "se": se}
    t_evolve = time.perf_counter() - t1
    summary = {"rows": rows, "search_rouge_l": search_scores, "config": cfg.__dict__,
               "train_config_digest": (train.quick_config() if quick else train.TrainConfig()).digest(),
               "seconds": {"train": round(t_train), "evolve": round(t_evolve), "total": round(time.perf_counter() - t0)}}
    if results_dir is not None:
        write_results(summary, results_dir, quick)
    return summary


def write_results(s: dict, out: Path, quick: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if quick else ""
    (out / f"results{suffix}.json").write_text(json.dumps(s, indent=1, ensure_ascii=False))
    lines = ["# Toy visual world: results" + (" (--quick)" if quick else ""), "",
             "Written by `examples/toy_vlm/demo.py` from the run it describes (CPU; see README there).", "",
             f"Test: {s['rows'][0]['n']} held-out pictures, Japanese questions (and the same pictures with English "
             "questions for `EN exact`). `JA ROUGE-L` is the fitness metric (0 for an answer not in Japanese); "
             "`exact` = the answer equals the reference after normalisation.", "",
             "| model | kind | search JA ROUGE-L | JA ROUGE-L | JA acc_lang | JA exact | "
             + " | ".join(f"exact ({k})" for k in world.KINDS) + " | EN exact |",
             "|---|---|---|---|---|---|" + "---|" * len(world.KINDS) + "---|"]
    for r in s["rows"]:
        srch = s["search_rouge_l"].get(r["model"])
        lines.append(f"| {r['model']} | {r['kind']} | {'' if srch is None else f'{srch:.3f}'} | {r['ja_rouge_l']:.3f} | "
                     f"{r['ja_acc_lang']:.3f} | {r['ja_exact']:.3f} | "
                     + "".join(f"{r[f'ja_exact_{k}']:.3f} | " for k in world.KINDS) + f"{r['en_exact']:.3f} |")
    lines += ["", "Each evolved merge minus the best source on the test questions (paired; standard error):", ""]
    for evo in (r for r in s["rows"] if r["kind"] == "evolved"):
        lines.append(f"- {evo['model']} minus {evo['margin_rouge_l']['vs']}: JA ROUGE-L "
                     f"{evo['margin_rouge_l']['margin']:+.3f} ({evo['margin_rouge_l']['se']:.3f}), JA exact "
                     f"{evo['margin_exact']['margin']:+.3f} ({evo['margin_exact']['se']:.3f}); "
                     f"{evo['trials']} trials")
    lines += ["", f"Seconds: {s['seconds']}.", "", "Sample answers (Japanese test questions):", ""]
    for r in s["rows"]:
        if r["kind"] in ("source", "evolved"):
            lines.append(f"- {r['model']}: " + "; ".join(f"{x['q']} -> {x['out']!r} (ref {x['ref']})"
                                                         for x in r["samples_ja"][:3]))
        if r["kind"] == "evolved":
            break
    (out / f"RESULTS{suffix}.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(HERE / "work"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    run(Path(args.work), quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
