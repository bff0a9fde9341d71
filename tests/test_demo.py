"""The bundled demo: its --quick run end to end (train or reuse the toy models, PS+DFS and DFS
evolutions once per search seed, scoring on the held-out split, RESULTS + JSON + PNG) on tiny
budgets, and the multi-seed summary and claims on synthetic scores."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest
import yaml

DEMO = Path(__file__).resolve().parents[1] / "examples" / "toy_world" / "demo.py"


@pytest.fixture(scope="module")
def demo():
    sys.path.insert(0, str(DEMO.parent))
    spec = importlib.util.spec_from_file_location("toy_world_demo", DEMO)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)
    sys.path.remove(str(DEMO.parent))


@pytest.mark.demo
def test_demo_quick_end_to_end(demo, tmp_path):
    s = demo.run(tmp_path / "work", quick=True, seed=0, progress=False, results_dir=tmp_path / "results")
    check_quick_run(demo, s, tmp_path / "work", tmp_path / "results")


def check_quick_run(demo, s: dict, work: Path, results: Path) -> None:
    """What a --quick run's summary, evolve directories and result files must satisfy."""
    seeds = list(demo.QUICK.search_seeds)
    assert len(seeds) >= 2 and s["search_seeds"] == seeds
    sources = [r for r in s["rows"] if "search_seed" not in r]
    merges = [r for r in s["rows"] if "search_seed" in r]
    # the sources do not depend on the search seed: scored once; every stage once per seed
    assert [r["model"] for r in sources] == ["base", "ja", "math_en"]
    assert [(r["model"], r["search_seed"]) for r in merges] == [(n, k) for k in seeds for n in demo.STAGES]
    for r in s["rows"]:
        assert r["ja_n"] == r["en_n"] == demo.QUICK.test_size
        for k in ("ja_acc", "ja_acc_lang", "en_acc"):
            assert 0.0 <= r[k] <= 1.0
        assert r["ja_acc_lang"] <= r["ja_acc"]  # acc_lang = correct AND Japanese

    # the per-stage statistics are those of the per-seed test scores
    best_source = max(r["ja_acc_lang"] for r in sources)
    assert s["summary"]["best_source"]["ja_acc_lang"] == best_source
    for name in demo.STAGES:
        st = s["summary"]["stages"][name]
        mine = [r for r in merges if r["model"] == name]
        assert [x["search_seed"] for x in st["seeds"]] == seeds
        for key in ("ja_acc", "ja_acc_lang", "en_acc"):
            vals = [r[key] for r in mine]
            assert st[key]["mean"] == pytest.approx(statistics.fmean(vals))
            assert (st[key]["min"], st[key]["max"]) == (min(vals), max(vals))
            assert st[key]["std"] == pytest.approx(statistics.stdev(vals))
        for x, r in zip(st["seeds"], mine):
            assert x["margin_vs_best_source"] == pytest.approx(r["ja_acc_lang"] - best_source)

    # each search seed is its own search, seeded as the config says: CMA-ES seed and DARE random_seed
    from fastmerge.evaluate import evaluate_checkpoint

    world = sys.modules["world"]
    spec = {"name": "math", "data": str(work / "data" / "search_ja.jsonl"), "lang": "ja",
            "template": world.PROMPT_TEMPLATE, "batch_size": 32, "max_new_tokens": demo.QUICK.max_new_tokens,
            "limit": demo.QUICK.search_size}
    first_genomes = []
    for run in s["runs"]:
        k, st = run["search_seed"], run["stages"]
        assert set(st) == set(demo.STAGES)
        for name in demo.STAGES:
            assert st[name]["trials"] >= demo.QUICK.popsize and Path(st[name]["model"]).is_dir()
        ps_dir = Path(st["PS"]["stage_dir"])
        cfg = yaml.safe_load((ps_dir.parent / "config.yml").read_text())
        assert cfg["cma"]["seed"] == k and cfg["ps"]["random_seed"] == k
        trials = [json.loads(line) for line in (ps_dir / "trials.jsonl").read_text().splitlines()]
        assert len(trials) == st["PS"]["trials"]
        assert max(t["fitness"] for t in trials) == st["PS"]["search_fitness"]
        first_genomes.append(trials[0]["x"])
        # the materialized PS model (tied embeddings, like every toy model) scores on the search split
        # exactly what the in-place trial scored: the live module is the checkpoint
        again = evaluate_checkpoint(Path(st["PS"]["model"]), spec, tokenizer=work / "models-quick" / "base")
        assert again["acc_lang"] == pytest.approx(st["PS"]["search_fitness"], abs=1e-9)
        # the PS+DFS path runs over this seed's PS merge (model A of its DFS stage), in this seed's run
        assert st["PS+DFS"]["decoded"]  # a decoded path
        assert Path(st["PS+DFS"]["stage_dir"]).parent == ps_dir.parent
        assert str(Path(st["PS"]["model"])) in (Path(st["PS+DFS"]["stage_dir"]) / "space.json").read_text()
    # different seeds, different searches (CMA-ES's first sample differs)
    assert len({json.dumps(x) for x in first_genomes}) == len(seeds)

    md = (results / "RESULTS_quick.md").read_text()
    assert "What holds across the 2 search seeds" in md
    for name in demo.STAGES:
        for k in seeds:
            assert f"| {name} | {k} |" in md  # a row per stage and seed
    for c in demo.claims(s):
        assert c in md
    assert (results / "results_quick.png").stat().st_size > 1000
    saved = json.loads((results / "results_quick.json").read_text())
    assert saved["quick"] is True and saved["search_seeds"] == seeds
    assert saved["summary"] == json.loads(json.dumps(s["summary"]))


def _rows(stage_scores: dict[str, list[float]], best_source: float = 0.077) -> list[dict]:
    rows = [{"model": n, "type": "source", "ja_acc": a, "ja_acc_lang": a, "en_acc": 0.1, "ja_n": 300, "en_n": 300}
            for n, a in (("base", 0.0), ("ja", best_source), ("math_en", 0.0))]
    for name, vals in stage_scores.items():
        for k, v in enumerate(vals):
            rows.append({"model": name, "type": "merge", "search_seed": k, "ja_acc": v, "ja_acc_lang": v,
                         "en_acc": 0.5, "ja_n": 300, "en_n": 300, "search_fitness": v + 0.02, "trials": 8})
    return rows


def test_claims_say_only_what_holds_in_every_seed(demo):
    """A stage that beats the best source in every seed is said to, with its worst seed; one that falls
    below it in some seed is said to beat it only in the others, naming the seed; paired comparisons
    of the stages say when the order depends on the seed."""
    rows = _rows({"PS": [0.223, 0.210, 0.240], "PS+DFS": [0.150, 0.137, 0.260], "DFS": [0.153, 0.073, 0.060]})
    s = {"search_seeds": [0, 1, 2], "summary": demo.summarize(rows)}
    st = s["summary"]["stages"]
    assert st["PS"]["ja_acc_lang"]["min"] == 0.210 and st["DFS"]["ja_acc_lang"]["max"] == 0.153
    assert st["DFS"]["ja_acc_lang"]["std"] == pytest.approx(statistics.stdev([0.153, 0.073, 0.060]))
    text = "\n".join(demo.claims(s))
    assert "PS beats the best source in every one of the 3 seeds**: its lowest JA acc_lang is 0.210" in text
    assert "DFS beats the best source in 1 of 3 seeds only**: at or below `ja`'s 0.077 in seed 1: 0.073, seed 2: 0.060" in text
    assert "PS+DFS vs PS depends on the seed (above in 1, below in 2" in text
    assert "DFS is below PS in every seed" in text
    # the per-seed margin in standard errors of the difference
    se = ((0.210 * 0.790 + 0.077 * 0.923) / 300) ** 0.5
    assert st["PS"]["seeds"][1]["margin_se"] == pytest.approx((0.210 - 0.077) / se)
    none = _rows({"DFS": [0.05, 0.07]})
    text = "\n".join(demo.claims({"search_seeds": [0, 1], "summary": demo.summarize(none)}))
    assert "DFS does not beat the best source in any seed**: its highest JA acc_lang is 0.070" in text
