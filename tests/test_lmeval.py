"""lm-evaluation-harness tasks as fitness (fastmerge.lmeval): a live Merger candidate scores what
lm-eval's own run scores on the materialized merge; the LM over a fastmerge backend (what vLLM and DFS
path models are scored through) answers as lm-eval's HFLM; the score combines the tasks as configured;
bad tasks, directories and metrics are one-line errors before any model loads; evolve and
``fastmerge eval`` run it end to end. Everything is local: tiny models, a word-level tokenizer, task
YAMLs and JSONL written here."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml

if os.environ.get("FASTMERGE_REQUIRE_ENGINES") != "1":  # make test-engines: a missing lm-eval fails
    pytest.importorskip("lm_eval")

import fastmerge  # noqa: E402
from fastmerge.backends import HFBackend  # noqa: E402
from fastmerge.errors import FastmergeError  # noqa: E402
from fastmerge.evaluate import evaluate_checkpoint, load_evaluator, load_model  # noqa: E402
from fastmerge.lmeval import LMEvalEvaluator, metric_key  # noqa: E402
from fastmerge.synth import ModelSpec, make_family  # noqa: E402

VOCAB = 64
WORDS = "Q: A: what is plus the answer cat dog red blue yes no . ?".split() + [str(i) for i in range(10)]
TASKS = ["arith", "choice", "ll"]

ARITH = """\
task: arith
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/arith.jsonl
test_split: test
output_type: generate_until
doc_to_text: "Q: what is {{a}} plus {{b}} ? A:"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 4
  do_sample: false
filter_list:
  - name: raw
    filter:
      - function: take_first
  - name: number
    filter:
      - function: regex
        regex_pattern: "(\\\\d+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    regexes_to_ignore: [" "]
"""
CHOICE = """\
task: choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/choice.jsonl
test_split: test
fewshot_split: test
output_type: multiple_choice
doc_to_text: "Q: {{question}} A:"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""
LL = """\
task: ll
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/ll.jsonl
test_split: test
output_type: loglikelihood
doc_to_text: "Q: {{question}} A:"
doc_to_target: " {{answer}}"
metric_list:
  - metric: perplexity
  - metric: acc
"""
ROLL = """\
task: roll
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/roll.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
"""
GROUP = """\
group: both
task: [choice, ll]
aggregate_metric_list:
  - metric: acc
    weight_by_size: true
"""
RECIPE = {"merge_method": "task_arithmetic", "dtype": "float32",
          "parameters": {"normalize": False}}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Plain(torch.nn.Module):
    """A module honouring the HF forward contract that is no PreTrainedModel, as the DFS PathModel."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.generation_config = inner.generation_config

    def forward(self, **kwargs):
        return self.inner(**kwargs)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    for i in range(VOCAB - len(vocab)):  # every id the model can emit is a word
        vocab[f"w{i}"] = len(vocab)
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="[PAD]", eos_token="[EOS]", bos_token="[BOS]",
                                   unk_token="[UNK]")


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A family saved with a word-level tokenizer, a recipe over it and its merge on disk, and a task
    directory (YAML + JSONL, data paths relative to the YAMLs) of the four output types. Half of the
    generation targets and log-likelihood answers are the merge's own greedy outputs, so accuracies
    are neither 0 nor 1."""
    import random

    root = tmp_path_factory.mktemp("lmeval-world")
    tok = _tokenizer()
    base, ft0, ft1 = make_family(root / "models", ModelSpec(hidden=32, layers=2, heads=4, kv_heads=2, vocab=VOCAB),
                                 finetunes=2, delta_scale=0.2)
    for p in (base, ft0, ft1):
        tok.save_pretrained(p)
    recipe = {**RECIPE, "base_model": str(base),
              "models": [{"model": str(ft0), "parameters": {"weight": 0.7}},
                         {"model": str(ft1), "parameters": {"weight": 0.4}}]}
    merged = root / "merged"
    fastmerge.merge(recipe, merged)
    model, mtok = load_model(merged)
    backend = HFBackend(model, mtok)

    rnd = random.Random(0)
    tasks = root / "tasks"
    pairs = [(rnd.randrange(5), rnd.randrange(5)) for _ in range(8)]
    outs = backend.generate([f"Q: what is {a} plus {b} ? A:" for a, b in pairs], max_new_tokens=4, stop=["."])
    _jsonl(tasks / "data/arith.jsonl", [{"a": a, "b": b, "answer": o if i % 2 == 0 else "no"}
                                        for i, ((a, b), o) in enumerate(zip(pairs, outs))])
    words = "red blue cat dog yes no".split()
    _jsonl(tasks / "data/choice.jsonl", [{"question": f"what is {i} ?", "choices": rnd.sample(words, 3),
                                          "label": rnd.randrange(3)} for i in range(8)])
    qs = [f"what is {i} plus 1 ?" for i in range(8)]
    nxt = backend.generate_ids(backend.encode([f"Q: {q} A:" for q in qs]), 1)
    _jsonl(tasks / "data/ll.jsonl", [{"question": q, "answer": mtok.decode(n) if i % 2 == 0 else "yes"}
                                     for i, (q, n) in enumerate(zip(qs, nxt))])
    _jsonl(tasks / "data/roll.jsonl", [{"text": " ".join(rnd.choice(WORDS) for _ in range(n))} for n in (3, 9, 20)])
    for name, text in (("arith", ARITH), ("choice", CHOICE + "tag: toy\n"), ("ll", LL + "tag: toy\n"), ("roll", ROLL),
                       ("both", GROUP)):
        (tasks / f"{name}.yaml").write_text(text)
    return {"models": (base, ft0, ft1), "recipe": recipe, "merged": merged, "tasks": tasks}


def spec(world, **over) -> dict:
    return {"name": "lm_eval", "tasks": TASKS, "include_path": str(world["tasks"]), "batch_size": 4,
            "metric": {"arith": "exact_match,raw"}, **over}


def lm_eval_reference(world, tasks: list[str], monkeypatch) -> dict:
    """lm-eval's own run (``simple_evaluate``, model ``hf``) on the merge on disk, as ours names it."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(world["tasks"])  # lm-eval reads relative data files from the working directory
    tm = TaskManager(include_path=str(world["tasks"]), include_defaults=False)
    res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={world['merged']},dtype=float32", tasks=tasks,
                                  task_manager=tm, batch_size=4, device="cpu", bootstrap_iters=0, log_samples=False)
    return {f"{t}/{m}": float(v) for t, row in res["results"].items() for k, v in row.items()
            if (m := metric_key(k)) is not None and isinstance(v, (int, float))}


def assert_same(ours: dict, ref: dict) -> None:
    """Accuracies exactly, log-likelihood metrics (and a score made of them) to float32 rounding."""
    assert set(ref) <= set(ours), (sorted(ref), sorted(ours))
    for k, v in ref.items():
        if "/acc" in k or "/exact_match" in k:
            assert ours[k] == v, k
        else:
            assert ours[k] == pytest.approx(v, rel=1e-5), k


# ----------------------------------------------------------------------------------------- (1) = lm-eval


def test_live_merger_candidate_scores_what_lm_eval_scores_on_the_checkpoint(world, monkeypatch):
    """A Merger's module after .merge(candidate), scored in memory (HFLM over the live module), gives
    the numbers of lm-eval's own run over the same recipe merged to disk, every task type."""
    ev = load_evaluator(spec(world, tasks=[*TASKS, "roll"]))
    base, ft0, ft1 = world["models"]
    start = {**world["recipe"], "models": [{"model": str(ft0), "parameters": {"weight": 1.0}},
                                           {"model": str(ft1), "parameters": {"weight": 1.0}}]}
    merger = fastmerge.Merger(start)
    from fastmerge.evaluate import load_model as _load

    _, tok = _load(world["merged"])
    first = ev(merger.module, tok)
    merger.merge(world["recipe"])  # the candidate, in place: the evaluator's HFLM sees the new weights
    ours = ev(merger.module, tok)
    assert ours != first
    ref = lm_eval_reference(world, [*TASKS, "roll"], monkeypatch)
    assert 0 < ref["arith/exact_match,raw"] < 1 and 0 < ref["ll/acc"] < 1  # the comparison means something
    assert {k: ours[k] for k in ref} == ref  # the same code over the same weights: to the last bit
    assert ev(merger.module, tok) == ours  # a second call of the same weights: the same numbers


# ----------------------------------------------------------------------------------------- (2) BackendLM = HFLM


def test_backend_lm_scores_as_hflm(world):
    """What the vLLM backend and DFS path models go through, over the hf backend, against HFLM over
    the same module: whole tasks, then request by request (an empty context, a context ending in a
    space, contexts and texts longer than the model's length, stop strings)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from fastmerge.lmeval import BackendLM

    model, tok = load_model(world["merged"])
    ev = load_evaluator(spec(world, tasks=[*TASKS, "roll"]))
    via_hflm = ev(model, tok)
    via_backend = ev(BackendLM(HFBackend(model, tok), batch_size=3), tok)
    assert_same(via_backend, via_hflm)
    # a plain nn.Module honouring the forward contract (no PreTrainedModel) goes through BackendLM too
    assert_same(ev(Plain(model), tok), via_hflm)

    hf = HFLM(pretrained=model, tokenizer=tok, batch_size=2, max_length=8)
    ours = BackendLM(HFBackend(model, tok), batch_size=2, max_length=8)
    ll = [("", "what is 1"), ("Q: what is ", "2 plus 3"), ("Q: what is 1 plus 2 ? A:", " 3 ."),
          ("Q: what is 1 plus 2 ? A: the answer is", " 4 . Q: what is"), ("red", " blue")]
    reqs = [Instance("loglikelihood", {}, args, i) for i, args in enumerate(ll)]
    for (a, ga), (b, gb) in zip(hf.loglikelihood(reqs), ours.loglikelihood(reqs)):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-5) and ga == gb
    texts = ["what is 1 plus 2", "Q: what is 1 plus 2 ? A: 3 . Q: what is 4 plus 4 ? A: 8 . the answer"]
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    assert ours.loglikelihood_rolling(reqs) == pytest.approx(hf.loglikelihood_rolling(reqs), rel=1e-5)
    gen = [("Q: what is 1 plus 2 ? A:", {"until": ["."], "max_gen_toks": 3}),
           ("Q: what is", {"until": ["\n\n"], "max_gen_toks": 4, "do_sample": False}),
           ("Q: what is 3", {"until": ["the", "."], "max_gen_toks": 5, "temperature": 0.0})]
    reqs = [Instance("generate_until", {}, args, i) for i, args in enumerate(gen)]
    assert ours.generate_until(reqs) == hf.generate_until(reqs)
    with pytest.raises(FastmergeError, match="greedy"):
        ours.generate_until([Instance("generate_until", {}, ("Q:", {"do_sample": True, "temperature": 1.0}), 0)])


def test_on_the_vllm_backend(world, tmp_path):
    """The vLLM engine through BackendLM gives the hf numbers (where vLLM is installed; its CPU
    attention needs a head size of 64, so a model of its own)."""
    if os.environ.get("FASTMERGE_REQUIRE_ENGINES") != "1":
        pytest.importorskip("vllm")
    from fastmerge.backends.vllm_engine import VLLMBackend

    (path,) = make_family(tmp_path, ModelSpec(hidden=128, layers=2, heads=2, kv_heads=1, vocab=VOCAB), finetunes=0)
    _tokenizer().save_pretrained(path)
    model, tok = load_model(path)
    ev = load_evaluator(spec(world, tasks=[*TASKS, "roll"]))
    want = ev(model, tok)
    with VLLMBackend(path, tok, kv_cache_gib=1) as engine:
        got = ev(engine, tok)
        assert type(ev._cached[2]).__name__ == "BackendLM" and ev._cached[2].max_length == 512
    assert_same(got, want)


# ----------------------------------------------------------------------------------------- (3) score, logging


def test_score_is_the_weighted_mean_and_every_task_is_logged(world, tmp_path, monkeypatch, capfd):
    model, tok = load_model(world["merged"])
    monkeypatch.chdir(tmp_path)  # data paths are the YAMLs'; nothing is written where we run
    capfd.readouterr()
    ev = LMEvalEvaluator(TASKS, include_path=world["tasks"], batch_size=4,
                         metric={"arith": "exact_match,raw", "choice": "acc_norm", "ll": "acc"}, weights=[1, 2, 3])
    m = ev(model, tok)
    err = capfd.readouterr().err
    assert "it/s" not in err and "WARNING" not in err and "Generating" not in err, err  # lm-eval is quiet
    assert list(tmp_path.iterdir()) == []
    assert set(m) == {"arith/exact_match,raw", "arith/exact_match,number", "choice/acc", "choice/acc_norm",
                      "ll/perplexity", "ll/acc", "score"}
    assert all(type(v) is float for v in m.values())
    json.dumps(m, allow_nan=False)
    assert m["score"] == pytest.approx((m["arith/exact_match,raw"] + 2 * m["choice/acc_norm"] + 3 * m["ll/acc"]) / 6)
    assert ev.metric_names == set(m)
    # default: each task's first metric (its first filter), equal weights; lower-is-better enters negated
    ev = LMEvalEvaluator(["choice", "ll"], include_path=world["tasks"], batch_size=4, weights={"ll": 0.5})
    d = ev(model, tok)
    assert d["score"] == pytest.approx((d["choice/acc"] - 0.5 * d["ll/perplexity"]) / 1.5)
    ev = LMEvalEvaluator(["arith"], include_path=world["tasks"], metric="exact_match,number")
    assert ev(model, tok)["score"] == m["arith/exact_match,number"]


def test_data_paths_relative_to_the_yaml_or_to_the_working_directory(world, tmp_path, monkeypatch):
    """lm-eval reads a relative data path from the working directory; fastmerge also from the YAML's."""
    model, tok = load_model(world["merged"])
    want = LMEvalEvaluator(["ll"], include_path=world["tasks"])(model, tok)
    other = tmp_path / "other"
    other.mkdir()
    (other / "ll.yaml").write_text(LL.replace("data/ll.jsonl", "tasks/data/ll.jsonl"))
    monkeypatch.chdir(world["tasks"].parent)  # where lm-eval itself would look
    assert LMEvalEvaluator(["ll"], include_path=other)(model, tok) == want
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FastmergeError, match="cannot load task 'll'"):
        LMEvalEvaluator(["ll"], include_path=other)


def test_a_group_scores_by_its_aggregate_and_a_tag_is_refused(world):
    model, tok = load_model(world["merged"])
    ev = LMEvalEvaluator(["both"], include_path=world["tasks"], batch_size=4)
    assert ev.metric_names is None  # a group's aggregates are known once it has run
    m = ev(model, tok)
    assert m["score"] == m["both/acc"] == pytest.approx((m["choice/acc"] + m["ll/acc"]) / 2)
    with pytest.raises(FastmergeError, match="'toy' is a tag of 2 tasks"):
        LMEvalEvaluator(["toy"], include_path=world["tasks"])


def test_few_shot_examples_are_the_same_for_every_call(world):
    model, tok = load_model(world["merged"])
    ev = LMEvalEvaluator(["choice"], include_path=world["tasks"], num_fewshot=2, batch_size=4)
    assert ev._loaded["tasks"]["choice"].get_config("num_fewshot") == 2
    assert ev(model, tok) == ev(model, tok)


def test_offline_unless_told_otherwise(world, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    LMEvalEvaluator(["ll"], include_path=world["tasks"])
    assert os.environ["HF_DATASETS_OFFLINE"] == os.environ["HF_HUB_OFFLINE"] == "1"
    assert datasets.config.HF_HUB_OFFLINE and huggingface_hub.constants.HF_HUB_OFFLINE
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the user's word stands
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    LMEvalEvaluator(["ll"], include_path=world["tasks"])
    assert os.environ["HF_HUB_OFFLINE"] == "0" and not huggingface_hub.constants.HF_HUB_OFFLINE


# ----------------------------------------------------------------------------------------- (4) errors


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


def test_bad_tasks_directories_and_metrics_are_one_line_errors(world, tmp_path):
    inc = world["tasks"]
    cases = [
        (dict(tasks=["nope"], include_path=inc, include_defaults=False), "no task 'nope' in include_path"),
        (dict(tasks=[], include_path=inc), "non-empty list"),
        (dict(tasks=["ll", "ll"], include_path=inc), "listed twice"),
        (dict(tasks=["ll"], include_path=tmp_path / "missing"), "directory not found"),
        (dict(tasks=["ll"], include_path=inc, metric="accc"), "reports no metric 'accc' (it reports perplexity, acc)"),
        (dict(tasks=["arith"], include_path=inc, metric="exact_match"), "reports no metric 'exact_match'"),
        (dict(tasks=["ll"], include_path=inc, metric={"choice": "acc"}), "'choice' is not one of the tasks"),
        (dict(tasks=["ll", "choice"], include_path=inc, weights=[1]), "1 weights for 2 tasks"),
        (dict(tasks=["ll"], include_path=inc, weights={"ll": -1}), "finite number >= 0"),
        (dict(tasks=["ll"], include_path=inc, batch_size=0), "batch_size"),
        (dict(tasks=["ll"], include_path=inc, limit=0), "limit"),
    ]
    for kwargs, match in cases:
        with pytest.raises(FastmergeError, match=match.replace("(", r"\(").replace(")", r"\)")) as e:
            LMEvalEvaluator(**kwargs)
        _one_line(e)
    # a task whose data are missing fails when it loads, in one line
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "gone.yaml").write_text(LL.replace("task: ll", "task: gone").replace("data/ll.jsonl", "data/none.jsonl"))
    with pytest.raises(FastmergeError, match="cannot load task 'gone'") as e:
        LMEvalEvaluator(["gone"], include_path=broken)
    _one_line(e)
    # without lm-eval: the extra to install
    import sys

    from fastmerge._optional import MissingDependency

    saved = {k: v for k, v in sys.modules.items() if k == "lm_eval" or k.startswith("lm_eval.")}
    try:
        for k in saved:
            sys.modules[k] = None
        with pytest.raises(MissingDependency, match=r"pip install 'fastmerge\[lm-eval\]'") as e:
            LMEvalEvaluator(["ll"], include_path=inc)
        _one_line(e)
    finally:
        sys.modules.update(saved)


def test_evolve_config_checks_the_lm_eval_evaluator(world, tmp_path):
    base, ft0, ft1 = world["models"]
    good = {"models": [str(ft0), str(ft1)], "base_model": str(base), "merge_method": "task_arithmetic",
            "evaluator": spec(world), "metric": "score", "budget": {"generations": 1}, "out": str(tmp_path / "o")}
    fastmerge.EvolveConfig.from_yaml(good)
    fastmerge.EvolveConfig.from_yaml({**good, "metric": "choice/acc"})
    for over, match in [({"metric": "acc"}, "reports 'score'"),
                        ({"evaluator": {**spec(world), "tasks": []}}, "evaluator.tasks"),
                        ({"evaluator": {**spec(world), "tasks": "ll"}}, "evaluator.tasks"),
                        ({"evaluator": {**spec(world), "include_path": str(tmp_path / "no")}}, "directory not found"),
                        ({"evaluator": "lm_eval"}, "needs its tasks")]:
        with pytest.raises(FastmergeError, match=match) as e:
            fastmerge.EvolveConfig.from_yaml({**good, **over})
        _one_line(e)
    # include_path is relative to the config file
    cfg_file = world["tasks"].parent / "evolve.yml"
    cfg_file.write_text(yaml.safe_dump({**good, "evaluator": {**spec(world), "include_path": "tasks"}}))
    assert fastmerge.EvolveConfig.from_yaml(cfg_file).evaluator["include_path"] == str(world["tasks"])
    # a metric the tasks do not report: refused once the tasks are loaded, before a model is
    with pytest.raises(FastmergeError, match="'choice/nope' is not among the evaluator's metrics") as e:
        fastmerge.evolve({**good, "metric": "choice/nope"})
    _one_line(e)


# ----------------------------------------------------------------------------------------- (5) evolve


def test_evolve_with_lm_eval_fitness_logs_every_task(world, tmp_path):
    from fastmerge.evolve import read_trials

    base, ft0, ft1 = world["models"]
    cfg = {"models": [str(ft0), str(ft1)], "base_model": str(base), "merge_method": "task_arithmetic",
           "evaluator": spec(world), "metric": "score", "budget": {"generations": 2},
           "cma": {"popsize": 4, "seed": 1}, "out": str(tmp_path / "run")}
    res = fastmerge.evolve(cfg, materialize=True)
    (ps,) = res.stages
    trials = read_trials(tmp_path / "run/ps/trials.jsonl")
    assert len(trials) == 8
    keys = {"arith/exact_match,raw", "arith/exact_match,number", "choice/acc", "choice/acc_norm", "ll/perplexity",
            "ll/acc", "score"}
    for t in trials:
        assert set(t["metrics"]) == keys and t["fitness"] == t["metrics"]["score"]
    assert len({t["metrics"]["ll/perplexity"] for t in trials}) > 1  # candidates really differ
    # the materialized best scores what the search scored
    again = evaluate_checkpoint(ps.model_dir, cfg["evaluator"])
    assert again["score"] == pytest.approx(ps.best_fitness, rel=1e-6)


def test_dfs_path_models_are_scored_through_the_backend_lm(world, tmp_path):
    """A PathModel goes through BackendLM (the hf backend's loop); HFLM over the same path model agrees."""
    from lm_eval.models.huggingface import HFLM

    from fastmerge.dfs import LayerPath, PathModel
    from fastmerge.evolve import read_trials

    (base, tok), (ft0, _) = load_model(world["models"][0]), load_model(world["models"][1])
    pm = PathModel([base, ft0], LayerPath([(0, 0), (1, 1, 0.8), (0, 1), (1, 0, 1.2), (0, 1)])).eval()
    ev = load_evaluator(spec(world, tasks=[*TASKS, "roll"]))
    ours = ev(pm, tok)
    assert type(ev._cached[2]).__name__ == "BackendLM"
    assert_same(ours, ev(HFLM(pretrained=pm, tokenizer=tok, batch_size=4), tok))

    base, ft0, _ = world["models"]
    cfg = {"models": [str(base), str(ft0)], "space": "dfs", "dfs": {"repetitions": 1},
           "evaluator": spec(world, tasks=["choice", "ll"], metric=None), "metric": "choice/acc",
           "budget": {"generations": 1}, "cma": {"popsize": 4, "seed": 0}, "out": str(tmp_path / "run")}
    fastmerge.evolve(cfg)
    trials = read_trials(tmp_path / "run/dfs/trials.jsonl")
    assert len(trials) == 4 and all(math.isfinite(t["metrics"]["ll/perplexity"]) for t in trials)


# ----------------------------------------------------------------------------------------- (6) the CLI


def test_cli_eval_with_lm_eval_tasks(world, capsys):
    from fastmerge.cli import main

    args = ["eval", str(world["merged"]), "--task", "lm_eval:choice,ll", "--include-path", str(world["tasks"]),
            "--batch-size", "4", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{world['merged']}:"
    assert out[1].startswith("  choice: acc=") and "acc_norm=" in out[1]
    assert out[2].startswith("  ll: perplexity=") and out[3].startswith("  score=")
    assert main([*args, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    spec_ = {"name": "lm_eval", "tasks": ["choice", "ll"], "include_path": str(world["tasks"]), "batch_size": 4}
    assert got == evaluate_checkpoint(world["merged"], spec_)
    assert main(["eval", str(world["merged"]), "--task", "lm_eval", "--no-progress"]) == 2
    assert "--task lm_eval:TASK" in capsys.readouterr().err
    assert main(["eval", str(world["merged"]), "--task", "math", "--data", "x.jsonl", "--include-path", "."]) == 2
    assert "are for --task lm_eval" in capsys.readouterr().err
