"""The vllm evaluation backend (CPU, fp32, a tiny Llama): its greedy generations and log-likelihoods equal
the hf backend's for the same weights, after several in-place updates (A -> B -> 0.5A+0.5B -> A), reloaded
or merged straight into the engine's tensors, with untied and tied embeddings, and on a fresh engine; an
evolve run scored on vLLM gives the hf run's trial log. Runs where vLLM is installed (`make test-engines`);
one engine per model family serves the module (start-up costs seconds)."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
if os.environ.get("FASTMERGE_REQUIRE_ENGINES") != "1":
    pytest.importorskip("vllm")

from fastmerge.backends import HFBackend  # noqa: E402
from fastmerge.evolve import evolve, read_trials  # noqa: E402
from fastmerge.synth import ModelSpec, make_family, word_tokenizer  # noqa: E402

WORDS = [f"w{i}" for i in range(120)] + [str(i) for i in range(100)] + "Q: A: the answer is".split()
MAX_NEW = 10


PROMPTS = [" ".join(WORDS[(i * 7 + j * 13) % 120] for j in range(3 + i % 6)) for i in range(12)]


def _family(root, **spec) -> dict:
    """base + 2 fine-tunes (head_dim 64: vLLM's CPU attention needs it) with a word-level tokenizer."""
    from transformers import AutoTokenizer

    tok = word_tokenizer(WORDS)
    spec = ModelSpec(hidden=128, layers=2, heads=2, kv_heads=1, vocab=len(tok) + 4, **spec)
    paths = make_family(root / "models", spec, finetunes=2, delta_scale=0.2)
    for p in paths:
        tok.save_pretrained(p)
    return {"models": paths, "tok": AutoTokenizer.from_pretrained(paths[0]), "prompts": PROMPTS}


def _engine(model, tok):
    from fastmerge.backends.vllm_engine import VLLMBackend

    return VLLMBackend(model, tok, threads=1, max_model_len=128, kv_cache_gib=1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A Llama family, and its prompts as math questions."""
    root = tmp_path_factory.mktemp("vllm-world")
    data = root / "math.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": i}) + "\n" for i, q in enumerate(PROMPTS)))
    return {**_family(root), "data": data}


def _state(path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


@pytest.fixture(scope="module")
def engine(world):
    with _engine(world["models"][0], world["tok"]) as e:
        yield e


@pytest.fixture(scope="module")
def hf(world):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(world["models"][0], dtype=torch.float32).eval()
    return HFBackend(model, world["tok"])


def _requests(world) -> list[tuple[list[int], list[int]]]:
    rows = HFBackend(None, world["tok"]).encode(world["prompts"])
    return [(r[: max(1, len(r) // 2)], r[max(1, len(r) // 2):]) for r in rows if len(r) > 1]


def _same_scores(hf, engine, world) -> None:
    rows = hf.encode(world["prompts"])
    want = hf.generate_ids(rows, MAX_NEW, batch_size=5)
    got = engine.generate_ids(rows, MAX_NEW)
    assert got == want
    reqs = _requests(world)
    h, v = hf.loglikelihood(reqs, batch_size=4), engine.loglikelihood(reqs)
    assert [g for _, g in v] == [g for _, g in h]
    for (lv, _), (lh, _) in zip(v, h):
        assert lv == pytest.approx(lh, rel=1e-4, abs=1e-4)  # fp32, different kernels


def test_base_equals_hf(world, engine, hf):
    _same_scores(hf, engine, world)
    assert engine.generate(world["prompts"][:3], MAX_NEW) == hf.generate(world["prompts"][:3], MAX_NEW)


def test_in_place_updates_follow_the_weights(world, engine, hf):
    a, b = _state(world["models"][1]), _state(world["models"][2])
    mix = {k: 0.5 * a[k] + 0.5 * b[k] for k in a}
    outputs = []
    for state in (a, b, mix, a):
        engine.load_weights(state.items())
        hf.load_weights(state.items())
        _same_scores(hf, engine, world)
        outputs.append(engine.generate_ids(hf.encode(world["prompts"]), MAX_NEW))
    assert outputs[0] == outputs[3] and outputs[0] != outputs[1]  # the update took, and went back


def test_a_fresh_engine_gives_the_updated_engines_outputs(world, engine, tmp_path):
    import fastmerge

    base, ft0, ft1 = world["models"]
    recipe = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": str(ft0), "parameters": {"weight": 0.5}},
                         {"model": str(ft1), "parameters": {"weight": 0.5}}]}
    out = tmp_path / "mix"
    fastmerge.merge(recipe, out)
    a, b = _state(ft0), _state(ft1)
    engine.load_weights((k, 0.5 * a[k] + 0.5 * b[k]) for k in a)
    rows = engine.encode(world["prompts"])
    updated = engine.generate_ids(rows, MAX_NEW), engine.loglikelihood(_requests(world))
    with _engine(out, world["tok"]) as fresh:
        assert fresh.generate_ids(rows, MAX_NEW) == updated[0]
        for (lf, gf), (lu, gu) in zip(fresh.loglikelihood(_requests(world)), updated[1]):
            assert gf == gu and lf == pytest.approx(lu, rel=1e-5, abs=1e-5)


@pytest.fixture(scope="module")
def tied_world(tmp_path_factory):
    """The world's shapes with tied embeddings (no lm_head in the checkpoint: vLLM's lm_head is the
    embedding's weight), base + 2 fine-tunes."""
    return _family(tmp_path_factory.mktemp("vllm-tied"), tie_embeddings=True)


@pytest.fixture(scope="module")
def tied_engine(tied_world):
    with _engine(tied_world["models"][0], tied_world["tok"]) as e:
        yield e


def _checkpoint(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


def _hf(path, tok) -> HFBackend:
    from transformers import AutoModelForCausalLM

    return HFBackend(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), tok)


def test_in_place_updates_of_a_tied_model_reach_its_lm_head(tied_world, tied_engine):
    """vLLM 0.32's reload_weights left a tied lm_head packed with the first weights on a CPU (logits
    from the base's embedding, inputs from the candidate's); the backend repacks it."""
    hf = _hf(tied_world["models"][0], tied_world["tok"])
    a, b = _checkpoint(tied_world["models"][1]), _checkpoint(tied_world["models"][2])
    assert "lm_head.weight" not in a  # tied: the checkpoint holds the embedding only
    for state in (a, b):
        tied_engine.load_weights(state.items())
        hf.load_weights(state.items())
        _same_scores(hf, tied_engine, tied_world)


def _merger(models, weights):
    from fastmerge.merger import Merger

    base, ft0, ft1 = models
    return Merger({"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
                   "models": [{"model": str(ft0), "parameters": {"weight": weights[0]}},
                              {"model": str(ft1), "parameters": {"weight": weights[1]}}]}, threads=1)


@pytest.mark.parametrize("which", ["untied", "tied"])
def test_a_merge_written_into_the_engine_equals_hf_and_a_reload(request, which):
    """The Merger bound to the engine's own tensors (weight_targets): every candidate reaches vLLM by
    its repacking alone, and scores as the hf backend over the same module and as a reload does."""
    from fastmerge.merger import Genome

    w = request.getfixturevalue("world" if which == "untied" else "tied_world")
    engine = request.getfixturevalue("engine" if which == "untied" else "tied_engine")
    merger = _merger(w["models"], (1.0, 0.0))
    targets = engine.weight_targets(dict(merger.module.named_parameters()))
    assert targets is not None and set(targets) == {n for n, _ in merger.module.named_parameters()}
    engine_ptrs = {t.data_ptr() for t in targets.values()}
    merger.bind(targets)
    assert {p.data_ptr() for _, p in merger.module.named_parameters()} == engine_ptrs  # no copy of its own
    hf = HFBackend(merger.module, w["tok"])
    rows = hf.encode(w["prompts"])
    outputs = []
    for weights in ((1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (1.0, 0.0)):
        merger.merge(Genome(weights=list(weights)))
        engine.weights_written()
        _same_scores(hf, engine, w)
        direct = engine.generate_ids(rows, MAX_NEW), engine.loglikelihood(_requests(w))
        engine.load_weights((n, p.detach().clone()) for n, p in merger.module.named_parameters())
        assert engine.generate_ids(rows, MAX_NEW) == direct[0]
        assert engine.loglikelihood(_requests(w)) == direct[1]  # the same packing of the same weights
        outputs.append(direct[0])
    assert outputs[0] == outputs[3] and outputs[0] != outputs[1]


def test_qkv_biases_are_written_into_the_engine(tmp_path):
    """Qwen2's q / k / v biases: row ranges of vLLM's fused qkv bias, like the weights."""
    from fastmerge.merger import Genome

    w = _family(tmp_path, arch="qwen2")
    merger = _merger(w["models"], (1.0, 0.0))
    assert any(n.endswith("q_proj.bias") for n, _ in merger.module.named_parameters())
    with _engine(w["models"][0], w["tok"]) as engine:
        targets = engine.weight_targets(dict(merger.module.named_parameters()))
        assert targets is not None
        merger.bind(targets)
        hf = HFBackend(merger.module, w["tok"])
        for weights in ((1.0, 0.0), (0.0, 1.0), (0.5, 0.5)):
            merger.merge(Genome(weights=list(weights)))
            engine.weights_written()
            _same_scores(hf, engine, w)


def test_weight_targets_refuse_what_they_do_not_cover(world, engine):
    """Any name, shape or dtype the engine's layout does not account for: None, and the caller
    reloads instead."""
    state = _state(world["models"][0])
    params = {n: t for n, t in state.items() if "rotary" not in n}
    assert engine.weight_targets(params) is not None
    assert engine.weight_targets({**params, "model.extra.weight": torch.zeros(3)}) is None
    name = "model.layers.0.self_attn.k_proj.weight"
    assert engine.weight_targets({**params, name: params[name][:-1]}) is None
    assert engine.weight_targets({**params, name: params[name].double()}) is None
    del params["model.norm.weight"]
    assert engine.weight_targets(params) is None


@pytest.mark.parametrize("evaluator,workers,scale", [("math", 1, "local"), ("loglik", 1, "local"),
                                                     ("loglik", 2, "local"), ("loglik", 2, "ray")])
def test_evolve_on_vllm_gives_the_hf_trial_log(world, tmp_path, evaluator, workers, scale, monkeypatch):
    """workers 2: a spawned pool or two Ray actors (a local cluster the run starts), one engine each.
    Candidates reach the engine by the merge writing into its weights: in this process (workers 1)
    a reload would fail the run."""
    if workers == 1:
        from fastmerge.backends.vllm_engine import VLLMBackend

        def no_reload(self, weights):
            raise AssertionError("a candidate was reloaded, not written into the engine")

        monkeypatch.setattr(VLLMBackend, "load_weights", no_reload)
    if scale == "ray" and os.environ.get("FASTMERGE_REQUIRE_ENGINES") != "1":
        pytest.importorskip("ray")
    base, ft0, ft1 = world["models"]
    ev = {"name": evaluator, "data": str(world["data"]), "batch_size": 4}
    if evaluator == "math":
        ev["max_new_tokens"] = 6
    cfg = {"models": [str(ft0), str(ft1)], "base_model": str(base), "merge_method": "task_arithmetic",
           "evaluator": ev, "metric": "acc" if evaluator == "math" else "loglik", "budget": {"generations": 2},
           "cma": {"popsize": 4, "seed": 1}}
    hf_run = evolve({**cfg, "out": str(tmp_path / "hf")})
    vllm_run = evolve({**cfg, "out": str(tmp_path / "vllm"), "eval_backend": "vllm", "workers": workers,
                       "scale": scale, "vllm": {"max_model_len": 128, "kv_cache_gib": 1}})
    a = read_trials(tmp_path / "hf/ps/trials.jsonl", timings=False)
    b = read_trials(tmp_path / "vllm/ps/trials.jsonl", timings=False)
    assert [r["x"] for r in a] == [r["x"] for r in b]  # same fitness ranking, so the same search
    for ra, rb in zip(a, b):
        assert ra["metrics"].keys() == rb["metrics"].keys()
        for k, v in ra["metrics"].items():
            assert rb["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    if evaluator == "loglik":
        assert len({r["fitness"] for r in a}) == len(a)  # a fitness that tells candidates apart
    assert hf_run.best.best_x == vllm_run.best.best_x
    uploads = [r["upload_s"] for r in read_trials(tmp_path / "vllm/ps/trials.jsonl")]
    assert len(uploads) == 8 and all(u > 0 for u in uploads)
    assert all(r["upload_s"] == 0 for r in read_trials(tmp_path / "hf/ps/trials.jsonl"))


def test_cli_eval_on_vllm_equals_hf(world, capsys):
    from fastmerge.cli import main

    base = world["models"][0]
    args = ["eval", str(base), "--task", "loglik", "--data", str(world["data"]), "--no-progress", "--json"]
    assert main(args) == 0
    hf_metrics = json.loads(capsys.readouterr().out)
    assert main([*args, "--backend", "vllm"]) == 0
    vllm_metrics = json.loads(capsys.readouterr().out)
    assert vllm_metrics.keys() == hf_metrics.keys()
    for k, v in hf_metrics.items():
        assert vllm_metrics[k] == pytest.approx(v, rel=1e-5), k
