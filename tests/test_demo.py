"""The bundled demo's --quick run: the whole pipeline (train or reuse the toy models, PS+DFS and DFS
evolutions, scoring on the held-out split, RESULTS + PNG) end to end on tiny budgets."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

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
    names = [r["model"] for r in s["rows"]]
    assert names == ["base", "ja", "math_en", "PS", "PS+DFS", "DFS"]
    for r in s["rows"]:
        assert r["ja_n"] == r["en_n"] == demo.QUICK.test_size
        for k in ("ja_acc", "ja_acc_lang", "en_acc"):
            assert 0.0 <= r[k] <= 1.0
        assert r["ja_acc_lang"] <= r["ja_acc"]  # acc_lang = correct AND Japanese
    for name in ("PS", "PS+DFS", "DFS"):
        st = s["stages"][name]
        assert st["trials"] >= demo.QUICK.popsize and Path(st["model"]).is_dir()
    # the materialized PS model (tied embeddings, like every toy model) scores on the search split
    # exactly what the in-place trial scored: the live module is the checkpoint
    from fastmerge.evaluate import evaluate_checkpoint

    world = sys.modules["world"]
    spec = {"name": "math", "data": str(tmp_path / "work" / "data" / "search_ja.jsonl"), "lang": "ja",
            "template": world.PROMPT_TEMPLATE, "batch_size": 32, "max_new_tokens": demo.QUICK.max_new_tokens,
            "limit": demo.QUICK.search_size}
    ps = s["stages"]["PS"]
    again = evaluate_checkpoint(Path(ps["model"]), spec, tokenizer=tmp_path / "work" / "models-quick" / "base")
    assert again["acc_lang"] == pytest.approx(ps["search_fitness"], abs=1e-9)
    # the PS+DFS path starts from the PS merge (model A of the DFS stage)
    hops = s["stages"]["PS+DFS"]["decoded"]
    assert hops  # a decoded path
    md = (tmp_path / "results" / "RESULTS_quick.md").read_text()
    assert "| PS+DFS |" in md and (tmp_path / "results" / "results_quick.png").stat().st_size > 1000
    assert json.loads((tmp_path / "results" / "results_quick.json").read_text())["quick"] is True
