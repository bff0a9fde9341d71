"""Evolutionary merging: the PS genome's recipe rebuilds what the Merger scored, CMA-ES finds a known
optimum, a killed run resumes to the same log, workers give what one process gives, PS / DFS /
PS+DFS run end to end through the real evaluators, and bad configs fail before any model loads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

import fastmerge
from fastmerge.errors import FastmergeError
from fastmerge.evolve import EvolveConfig, evolve, ps_space, read_trials
from fastmerge.merger import Merger
from fastmerge.synth import ModelSpec, make_family, word_tokenizer

from .test_merge import load_dir

ROOT = Path(__file__).resolve().parents[1]


def config(family, out_dir, **over) -> dict:
    """A PS config over a tiny family with the synthetic distance fitness (target given later)."""
    base, *fts = family
    c = {"models": [str(p) for p in fts], "base_model": str(base), "merge_method": "task_arithmetic",
         "evaluator": {"name": "tests.evolve_fitness:distance_to", "target": "unset"}, "metric": "neg_distance",
         "budget": {"generations": 2}, "out": str(out_dir), "cma": {"seed": 3}}
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(c.get(k), dict):
            c[k] = {**c[k], **v}
        else:
            c[k] = v
    return c


def make_target(cfg: dict, x: np.ndarray, file: Path) -> Path:
    """Merge the genome ``x`` and save the result: the optimum of the distance fitness."""
    space = ps_space(EvolveConfig.from_yaml({**cfg, "out": str(file.parent / "unused")}))
    merger = Merger(space.base_recipe())
    merger.merge(space.candidate(space.decode(x)))
    save_file({k: v.contiguous() for k, v in merger.module.state_dict().items() if "layers" in k}, str(file))
    return file


# ----------------------------------------------------------------------------------------- PS recipe = Merger


@pytest.mark.parametrize("method,group_size,filters", [
    ("dare_ties", None, []), ("dare_ties", 3, ["self_attn", "mlp"]), ("ties", 1, ["mlp"]), ("linear", 2, []),
])
def test_best_recipe_rebuilds_the_scored_model(families, tmp_path, method, group_size, filters):
    base, ft0, ft1 = families("llama", layers=4)
    over = {"merge_method": method, "ps": {"group_size": group_size, "filters": filters, "weight": [0.0, 2.0]}}
    if method == "linear":
        over.update(models=[str(base), str(ft0), str(ft1)], base_model=None)
    cfg = config([base, ft0, ft1], tmp_path / "out", **over)
    space = ps_space(EvolveConfig.from_yaml(cfg))
    x = np.random.default_rng(0).uniform(size=space.size)
    merger = Merger(space.base_recipe())
    merger.merge(space.candidate(space.decode(x)))
    recipe = space.recipe(space.decode(x))
    assert ("slices" in recipe) == (space.groups > 1)
    file = tmp_path / "best.yml"
    file.write_text(yaml.safe_dump(recipe, sort_keys=False))
    fastmerge.merge(file, tmp_path / "merged")
    disk, mem = load_dir(tmp_path / "merged"), merger.module.state_dict()
    assert set(disk) <= set(mem)
    for name, t in disk.items():
        assert torch.equal(mem[name], t), name
    # and the genes really differ per group/filter (the test would pass trivially otherwise)
    if space.groups > 1 or filters:
        d = space.decode(x)
        assert len({tuple(r) for r in d.weights.reshape(-1, d.weights.shape[-1]).tolist()}) > 1


def test_genome_layout(families, tmp_path):
    base, ft0, ft1 = families("llama", layers=4)
    cfg = config([base, ft0, ft1], tmp_path, merge_method="dare_ties",
                 ps={"group_size": 3, "filters": ["self_attn"], "weight": [0.0, 2.0], "density": [0.2, 1.0]})
    space = ps_space(EvolveConfig.from_yaml(cfg))
    assert space.shape == (2, 2, 2) and space.size == 16
    d = space.decode(np.ones(16))
    assert np.all(d.weights == 2.0) and np.all(d.densities == 1.0)
    assert space.group_of("model.layers.2.mlp.up_proj.weight") == 0
    assert space.group_of("model.layers.3.mlp.up_proj.weight") == 1
    assert space.group_of("model.embed_tokens.weight") == 0 and space.group_of("lm_head.weight") == 1
    assert space.filter_of("model.layers.0.self_attn.q_proj.weight") == 0
    assert space.filter_of("model.layers.0.input_layernorm.weight") == 1


# ----------------------------------------------------------------------------------------- the search


def test_converges_to_a_known_optimum(families, tmp_path):
    family = families("llama", layers=4)
    target_x = np.array([0.3, 0.8, 0.7, 0.2])  # 2 layer groups x 2 models, weights only
    cfg = config(family, tmp_path / "out", ps={"group_size": 2}, budget={"generations": 40})
    target = make_target(cfg, target_x, tmp_path / "target.safetensors")
    cfg["evaluator"]["target"] = str(target)
    seen = []
    result = evolve(cfg, progress=seen.append)
    best = result.best
    np.testing.assert_allclose(np.array(best.best_decoded["weights"]).ravel(), target_x, atol=0.005)
    start = read_trials(tmp_path / "out/ps/trials.jsonl")[0]["fitness"]  # ~ a distance of 0.25 per weight
    assert best.best_fitness > start / 100, (best.best_fitness, start)
    # outputs: the log, a plot, the recipe, the space description; progress reported per trial
    trials = read_trials(tmp_path / "out/ps/trials.jsonl")
    assert len(trials) == best.trials and {"x", "decoded", "fitness", "metrics", "merge_s", "eval_s"} <= set(trials[0])
    assert (tmp_path / "out/ps/fitness.png").stat().st_size > 1000
    assert fastmerge.load_recipe(best.best_file).slices
    assert json.loads((tmp_path / "out/ps/space.json").read_text())["layer_groups"] == [[0, 2], [2, 4]]
    assert sum(e.kind == "trial" for e in seen) == best.trials
    assert seen[-1].kind == "end" and seen[-1].best == best.best_fitness
    # a finished run resumed with the same budget does nothing; a larger budget continues it
    again = evolve(cfg, resume=True)
    assert again.best.trials == best.trials


def _wait_for(pred, timeout: float, proc: subprocess.Popen) -> None:
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before the kill: {proc.stderr.read()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for generation 2")
        time.sleep(0.02)


def test_resume_after_kill_gives_the_uninterrupted_log(families, tmp_path):
    family = families("llama", layers=4)
    cfg = config(family, tmp_path / "killed", merge_method="dare_ties", ps={"group_size": 2},
                 budget={"generations": 4}, cma={"popsize": 4, "seed": 11})
    target = make_target(cfg, np.full(8, 0.6), tmp_path / "target.safetensors")
    cfg["evaluator"].update(target=str(target), sleep=0.25)
    file = tmp_path / "killed.yml"
    file.write_text(yaml.safe_dump(cfg))
    log = tmp_path / "killed/ps/trials.jsonl"

    def in_generation_2() -> bool:
        return log.exists() and any(json.loads(ln)["generation"] == 2 for ln in log.read_text().splitlines() if ln)

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "fastmerge", "evolve", str(file), "--no-progress"], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(in_generation_2, 300, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cut = read_trials(log)
    assert 8 < len(cut) < 12  # generations 0 and 1 complete, generation 2 cut off

    resumed = evolve(file, resume=True)
    straight = evolve({**cfg, "out": str(tmp_path / "straight")})
    assert read_trials(log, timings=False) == read_trials(tmp_path / "straight/ps/trials.jsonl", timings=False)
    assert resumed.best.best_x == straight.best.best_x and resumed.best.trials == 16
    with pytest.raises(FastmergeError, match="config changed"):
        evolve({**cfg, "ps": {"group_size": 1}}, resume=True)
    with pytest.raises(FastmergeError, match="already holds an evolve run"):
        evolve(file)


def test_workers_give_what_one_process_gives(families, tmp_path):
    family = families("llama", layers=4)
    cfg = config(family, tmp_path / "one", ps={"group_size": 2}, budget={"generations": 2}, cma={"popsize": 4})
    cfg["evaluator"]["target"] = str(make_target(cfg, np.full(4, 0.4), tmp_path / "target.safetensors"))
    one = evolve(cfg)
    two = evolve({**cfg, "out": str(tmp_path / "two"), "workers": 2})
    a = read_trials(tmp_path / "one/ps/trials.jsonl", timings=False)
    b = read_trials(tmp_path / "two/ps/trials.jsonl", timings=False)
    assert [r["x"] for r in a] == [r["x"] for r in b]
    np.testing.assert_allclose([r["fitness"] for r in a], [r["fitness"] for r in b], rtol=1e-12)
    assert one.best.best_x == two.best.best_x


def test_the_draw_cache_does_not_change_a_dare_search(families, tmp_path, monkeypatch):
    """``draw_cache: false`` (every candidate draws DARE's masks afresh) logs the same trials, bit for
    bit, as the default cache, and is a setting a run may resume with (not in the fingerprint)."""
    made = []
    init = Merger.__init__

    def spy(self, *args, **kw):
        init(self, *args, **kw)
        made.append(self.draws is not None)

    monkeypatch.setattr(Merger, "__init__", spy)
    family = families("llama", layers=4)
    cfg = config(family, tmp_path / "cached", merge_method="dare_ties", ps={"group_size": 2},
                 budget={"generations": 2}, cma={"popsize": 4})
    cfg["evaluator"]["target"] = str(make_target(cfg, np.full(8, 0.4), tmp_path / "target.safetensors"))
    made.clear()
    evolve(cfg)
    plain = {**cfg, "out": str(tmp_path / "plain"), "draw_cache": False}
    evolve(plain)
    assert made == [True, False]  # the runner's Merger of each run
    a = read_trials(tmp_path / "cached/ps/trials.jsonl", timings=False)
    b = read_trials(tmp_path / "plain/ps/trials.jsonl", timings=False)
    assert len(a) == 8 and [r["x"] for r in a] == [r["x"] for r in b]
    assert [r["fitness"] for r in a] == [r["fitness"] for r in b]
    assert EvolveConfig.from_yaml(plain).fingerprint("ps") == EvolveConfig.from_yaml(cfg).fingerprint("ps")


def test_wall_time_budget_stops_between_generations(families, tmp_path):
    family = families("llama", layers=4)
    cfg = config(family, tmp_path / "out", budget={"wall_time": 0.001, "generations": 50}, cma={"popsize": 4})
    cfg["evaluator"]["target"] = str(make_target(cfg, np.full(2, 0.5), tmp_path / "target.safetensors"))
    res = evolve(cfg)
    assert res.best.stop_reason == "wall_time" and res.best.generations == 1 and res.best.trials == 4


# ----------------------------------------------------------------------------------------- real evaluators

WORDS = ("Q: A: the answer is how many cats dogs legs eggs box boxes are in has one two three four five six . ? "
         "りんご みかん 個 です 答え は").split() + [str(i) for i in range(20)]
QUESTIONS = [("Tom has 3 cats . How many legs ?", 12), ("A box has 6 eggs . How many eggs in 2 boxes ?", 12),
             ("りんご 3 個 みかん 4 個", 7), ("how many dogs are in the box ?", 2)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny family (base + 2 fine-tunes) saved with a word-level tokenizer, and math/loglik data."""
    root = tmp_path_factory.mktemp("evolve-world")
    tok = word_tokenizer(WORDS)
    paths = make_family(root / "models", ModelSpec(hidden=32, layers=2, heads=4, kv_heads=2, vocab=64), finetunes=2,
                        delta_scale=0.2)
    for p in paths:
        tok.save_pretrained(p)
    math_file = root / "math.jsonl"
    math_file.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in QUESTIONS))
    text_file = root / "text.jsonl"
    text_file.write_text("".join(json.dumps({"text": f"{q} the answer is {a}"}) + "\n" for q, a in QUESTIONS))
    return {"models": paths, "math": math_file, "text": text_file}


def real_config(world, out, space: str, **over) -> dict:
    base, ft0, ft1 = world["models"]
    c = {"models": [str(ft0), str(ft1)], "base_model": str(base), "space": space, "out": str(out),
         "evaluator": {"name": "math", "data": str(world["math"]), "max_new_tokens": 4, "batch_size": 4},
         "metric": "acc", "budget": {"generations": 2}, "cma": {"popsize": 4, "seed": 1},
         "dfs": {"repetitions": 2}}
    c.update(over)
    return c


def _score(model_dir: Path, spec: dict) -> dict:
    from fastmerge.evaluate import evaluate_checkpoint

    return evaluate_checkpoint(model_dir, spec)


def test_ps_end_to_end_with_the_math_evaluator(world, tmp_path):
    cfg = real_config(world, tmp_path / "run", "ps", merge_method="dare_ties", ps={"group_size": 1})
    res = evolve(cfg, materialize=True)
    (ps,) = res.stages
    trials = read_trials(tmp_path / "run/ps/trials.jsonl")
    assert len(trials) == 8 and all(set(t["metrics"]) >= {"acc", "acc_lang", "n"} for t in trials)
    assert all(t["merge_s"] > 0 and t["eval_s"] > 0 for t in trials)
    # the materialized best scores what the search scored
    assert _score(ps.model_dir, cfg["evaluator"]) == ps.best_metrics
    assert json.loads((tmp_path / "run/result.json").read_text())["stages"][0]["best_fitness"] == ps.best_fitness


def test_dfs_end_to_end_with_the_loglik_evaluator(world, tmp_path):
    ev = {"name": "loglik", "data": str(world["text"])}
    cfg = real_config(world, tmp_path / "run", "dfs", evaluator=ev, metric="loglik", base_model=None)
    res = evolve(cfg, materialize=True)
    (dfs,) = res.stages
    from fastmerge.dfs import LayerPath, load_path_file

    path, models, head = load_path_file(dfs.best_file)
    assert models == cfg["models"] and head == 0
    assert path == LayerPath.from_dict(dfs.best_decoded)
    fitnesses = [t["fitness"] for t in read_trials(tmp_path / "run/dfs/trials.jsonl")]
    assert len(set(fitnesses)) > 1  # different paths really run
    np.testing.assert_allclose(_score(dfs.model_dir, ev)["loglik"], dfs.best_fitness, rtol=1e-5)


def test_ps_then_dfs(world, tmp_path):
    cfg = real_config(world, tmp_path / "run", "ps+dfs", merge_method="ties",
                      evaluator={"name": "loglik", "data": str(world["text"])}, metric="loglik")
    res = evolve(cfg)
    ps, dfs = res.stages
    from fastmerge.dfs import load_path_file

    _, models, head = load_path_file(dfs.best_file)
    assert models == [str(tmp_path / "run/ps/model"), *cfg["models"]] and head == 0  # the PS merge is model A
    assert ps.model_dir == tmp_path / "run/ps/model" and (ps.model_dir / "tokenizer.json").exists()
    assert len(read_trials(tmp_path / "run/dfs/trials.jsonl")) == 8
    assert dfs.best_decoded["hops"][0][:2] == [0, 0]  # fix_ends: every path starts with model A's first layer
    # resuming the finished run (with a larger DFS budget) keeps the PS result and its model, and goes on
    stamp = (ps.model_dir / "config.json").stat().st_mtime_ns
    before = read_trials(tmp_path / "run/dfs/trials.jsonl")
    more = evolve({**cfg, "dfs": {**cfg["dfs"], "budget": {"generations": 3}}}, resume=True)
    assert (ps.model_dir / "config.json").stat().st_mtime_ns == stamp
    assert more.stages[0].best_x == ps.best_x and more.stages[1].trials == 12
    assert read_trials(tmp_path / "run/dfs/trials.jsonl")[:8] == before


def test_cli_evolve(world, tmp_path, capsys):
    from fastmerge.cli import main

    cfg = real_config(world, tmp_path / "ignored", "ps", merge_method="task_arithmetic", budget={"trials": 3},
                      evaluator={"name": "loglik", "data": str(world["text"])}, metric="loglik")
    file = tmp_path / "evolve.yml"
    file.write_text(yaml.safe_dump(cfg))
    assert main(["evolve", str(file), "--out", str(tmp_path / "cli"), "--no-progress", "--materialize"]) == 0
    out = capsys.readouterr().out
    assert "best" in out and str(tmp_path / "cli/ps/best.yml") in out
    assert (tmp_path / "cli/ps/model/config.json").exists()
    assert len(read_trials(tmp_path / "cli/ps/trials.jsonl")) == 4  # 3 trials round up to a generation
    assert main(["evolve", str(file), "--out", str(tmp_path / "cli")]) == 2  # exists, no --resume
    assert "already holds an evolve run" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- bad configs


BAD = [
    ({"budget": None}, "give a budget"),
    ({"budget": {"wall_time": "soon"}}, "wall_time"),
    ({"budget": {"trials": 0}}, "trials: must be >= 1"),
    ({"bogus": 1}, "bogus: unknown key"),
    ({"models": ["/nonexistent/model"]}, "model directory not found"),
    ({"metric": "accuracy", "evaluator": {"name": "math", "data": "DATA"}}, "not reported by the 'math' evaluator"),
    ({"evaluator": {"name": "math", "data": "/nonexistent.jsonl"}}, "file not found"),
    ({"evaluator": "mystery"}, "neither a built-in"),
    ({"ps": {"weight": [1.0, 0.5]}}, "low < high"),
    ({"merge_method": "dare_ties", "ps": {"density": [0.0, 1.5]}}, r"keep fraction in \[0, 1\]"),
    ({"ps": {"group_size": 0}}, "group_size: must be >= 1"),
    ({"ps": {"filters": ["mlp", "mlp"]}}, "distinct"),
    ({"ps": {"parameters": {"t": 0.5}}}, "unknown parameter 't'"),
    ({"space": "everything"}, "space:"),
    ({"merge_method": "slerp"}, "cannot be searched in parameter space"),
    ({"merge_method": "dare_ties", "base_model": None}, "needs a base_model"),
    ({"merge_method": "linear"}, "has no base model"),
    ({"cma": {"sigma0": 0}}, "sigma0: must be > 0"),
    ({"cma": {"x0": 1.5}}, "x0 must lie in it"),
    ({"cma": {"popsize": 3}}, "popsize: must be >= 4"),
    ({"workers": 0}, "workers: must be >= 1"),
    ({"threads": 0}, "threads: must be >= 1"),
    ({"device": "tpu"}, "device: expected cpu"),
    ({"out": None}, "no output directory"),
    ({"space": "dfs", "dfs": {"repetitions": 0}}, "repetitions: must be >= 1"),
    ({"space": "dfs", "dfs": {"head": 5}}, "head: 5 is not one of the 2"),
    ({"space": "dfs", "dfs": {"scale_range": [2, 1]}}, "scale_range"),
]


@pytest.mark.parametrize("over,msg", BAD, ids=[m for _, m in BAD])
def test_bad_configs_fail_before_loading_models(families, tmp_path, monkeypatch, over, msg):
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "1", "answer": 1}\n')
    cfg = config(families("llama", layers=4), tmp_path / "out", **over)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    if isinstance(cfg.get("evaluator"), dict) and cfg["evaluator"].get("data") == "DATA":
        cfg["evaluator"]["data"] = str(data)

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(Merger, "__init__", no_loading)
    with pytest.raises(FastmergeError, match=msg):
        evolve(cfg)
    assert not (tmp_path / "out").exists()


def test_the_annotated_example_config_is_valid(world, tmp_path):
    data = yaml.safe_load((ROOT / "examples/evolve/config.yml").read_text())
    base, ft0, ft1 = world["models"]
    data.update(models=[str(ft0), str(ft1)], base_model=str(base), out=str(tmp_path / "out"))
    data["evaluator"]["data"] = str(world["math"])
    config = EvolveConfig.from_yaml(data)
    assert config.ps_num_genes(2) == 4 and config.budget.trials == 1000


def test_config_errors_name_the_file(tmp_path):
    f = tmp_path / "c.yml"
    f.write_text("models: [a\n")
    with pytest.raises(FastmergeError, match=r"c\.yml: invalid YAML"):
        EvolveConfig.from_yaml(f)
    with pytest.raises(FastmergeError, match="config file not found"):
        EvolveConfig.from_yaml(tmp_path / "missing.yml")
    f.write_text("models: [m]\nevaluator: math\n")
    with pytest.raises(FastmergeError, match=r"c\.yml: metric: Field required"):
        EvolveConfig.from_yaml(f)


def test_the_paper_ps_config_is_valid_with_local_stand_ins(families, tmp_path):
    """examples/evolve/paper_ps_ja_math.yml with tiny Mistral stand-ins for the hub ids: the config
    parses and gives the paper's layer-wise genome (weight and density per model and layer)."""
    data = yaml.safe_load((ROOT / "examples/evolve/paper_ps_ja_math.yml").read_text())
    base, *fts = families("mistral", finetunes=3)
    assert len(data["models"]) == 3
    data.update(models=[str(f) for f in fts], base_model=str(base), out=str(tmp_path / "out"))
    (tmp_path / "search.jsonl").write_text('{"question": "1 + 1 は?", "answer": "2"}\n')
    data["evaluator"]["data"] = str(tmp_path / "search.jsonl")
    config = EvolveConfig.from_yaml(data)
    layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    assert config.ps_num_genes(layers) == layers * 3 * 2
    space = ps_space(config)
    assert len(space.x0()) == layers * 3 * 2
    recipe = space.base_recipe()
    assert recipe["merge_method"] == "dare_ties"
    assert recipe["parameters"]["normalize"] is False and recipe["parameters"]["rescale"] is True
    # the same search scored on vLLM: a valid config, the same fingerprint (a run may resume on it)
    assert EvolveConfig.from_yaml({**data, "eval_backend": "vllm"}).fingerprint("ps") == config.fingerprint("ps")


def test_paper_vlm_example_runs_on_tiny_stand_ins(tmp_path):
    """examples/evolve/paper_vlm_ja.yml (EvoVLM-JP) with a tiny LLaVA, a tiny Japanese text fine-tune
    and their tiny Mistral base for the hub ids, and a two-question Japanese VQA file: the config
    parses to the paper's layer-wise genome over the VLM (weight and density per model and layer),
    and one generation (4 trials) runs through the vqa evaluator (the VLM's processor, the ja gate) on the CPU."""
    pytest.importorskip("fugashi")
    from PIL import Image

    from fastmerge.synth_vlm import make_vlm_family

    data = yaml.safe_load((ROOT / "examples/evolve/paper_vlm_ja.yml").read_text())
    assert data["models"][0] == "llava-hf/llava-v1.6-mistral-7b-hf" and data["space"] == "ps"
    assert data["evaluator"]["name"] == "vqa" and data["evaluator"]["lang"] == "ja"
    fam = make_vlm_family(tmp_path / "models", text_finetunes=1)
    assert len(data["models"]) == 2
    (tmp_path / "img").mkdir()
    lines = []
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        Image.new("RGB", (32, 32), colour).save(tmp_path / "img" / f"{i}.png")
        lines.append(json.dumps({"image": f"img/{i}.png", "question": "この図形は何色ですか？",
                                 "answers": ["赤い丸です。" if i == 0 else "青い丸です。"]}, ensure_ascii=False))
    (tmp_path / "search.jsonl").write_text("\n".join(lines) + "\n")
    data.update(models=[str(fam["vlm"]), str(fam["text"][0])], base_model=str(fam["base"]),
                out=str(tmp_path / "out"), device="cpu", budget={"generations": 1}, cma={**data["cma"], "popsize": 4})
    data["evaluator"].update(data=str(tmp_path / "search.jsonl"), max_new_tokens=4)
    config = EvolveConfig.from_yaml(data)
    layers = json.loads((fam["base"] / "config.json").read_text())["num_hidden_layers"]
    assert config.ps_num_genes(layers) == layers * 2 * 2
    recipe = ps_space(config).base_recipe()
    assert recipe["merge_method"] == "dare_ties"
    assert recipe["parameters"]["normalize"] is False and recipe["parameters"]["rescale"] is True
    result = evolve(data)
    assert result.best.trials == 4 and np.isfinite(result.best.best_fitness)
    rows = read_trials(tmp_path / "out" / "ps" / "trials.jsonl")
    assert [r["trial"] for r in rows] == [0, 1, 2, 3]
    assert set(rows[0]["metrics"]) >= {"score", "rouge_l", "rouge_l_ungated", "acc_lang", "n"}
    assert rows[0]["metrics"]["n"] == 2
