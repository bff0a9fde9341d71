"""Tokenizer sources and output vocabularies (``tokenizer_source``, ``tokenizer:``), as mergekit.

Three tiny Llama models with word-level tokenizers whose vocabularies differ (sizes 12, 14, 12; a
token missing in one model, a token only one model has, the same tokens at other ids). Each case
loads and generates in transformers with embedding rows == len(tokenizer) (or its padded
multiple), and its tensors equal mergekit's ``run_merge`` of the same recipe (rows matched by token
string, since mergekit's union orders the non-base models' tokens by a set).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fastmerge
from fastmerge.errors import FastmergeError
from fastmerge.synth import ModelSpec, make_family

SPECIAL = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
WORDS = {
    "base": ["a", "b", "c", "d", "e", "f", "g", "h"],  # 12
    "ft0": ["a", "b", "c", "d", "e", "f", "g", "h", "x", "y"],  # 14: x, y only here
    "ft1": ["b", "a", "c", "d", "e", "f", "g", "z"],  # 12: a/b swapped, no h, z only here
}


def _tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + words)}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="[PAD]", eos_token="[EOS]", bos_token="[BOS]",
                                   unk_token="[UNK]")


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tok-family")
    paths = make_family(root, ModelSpec(hidden=32, layers=2, heads=4, kv_heads=2, vocab=12), finetunes=2,
                        delta_scale=0.2, vocab_overrides={0: 14})
    out = {}
    for name, p in zip(("base", "ft0", "ft1"), paths):
        _tokenizer(WORDS[name]).save_pretrained(p)
        out[name] = str(p)
    return out


def _state(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _loads_and_generates(out: Path, rows: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == rows
    assert model.get_output_embeddings().weight.shape[0] == rows
    assert rows >= len(tok) and rows - len(tok) < max(1, rows - len(tok) + 1)
    ids = torch.tensor([[tok.convert_tokens_to_ids(t) for t in tok.get_vocab()]])  # every token, the last id included
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] == ids.shape[1] + 3


def _recipe(fam, method="linear", **extra) -> dict:
    r = {"merge_method": method, "dtype": "float32",
         "models": [{"model": fam["base"], "parameters": {"weight": 0.5}},
                    {"model": fam["ft0"], "parameters": {"weight": 0.3}},
                    {"model": fam["ft1"], "parameters": {"weight": 0.2}}]}
    r.update(extra)
    return r


def _run(recipe: dict, tmp_path: Path) -> Path:
    out = tmp_path / "fastmerge"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fastmerge.merge(copy.deepcopy(recipe), out)
    return out


def _compare_mergekit(recipe: dict, fm_out: Path, tmp_path: Path) -> None:
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions as MKOptions
    from transformers import AutoTokenizer

    mk_out = tmp_path / "mergekit"
    run_merge(MergeConfiguration.model_validate(copy.deepcopy(recipe)), str(mk_out),
              MKOptions(device="cpu", quiet=True, write_model_card=False))
    mk, fm = _state(mk_out), _state(fm_out)
    assert sorted(mk) == sorted(fm)
    mk_vocab = AutoTokenizer.from_pretrained(mk_out).get_vocab()
    fm_vocab = AutoTokenizer.from_pretrained(fm_out).get_vocab()
    assert set(mk_vocab) == set(fm_vocab)
    order = sorted(fm_vocab, key=fm_vocab.get)
    for name, want in mk.items():
        got = fm[name]
        assert got.shape == want.shape, name
        if "embed_tokens" in name or "lm_head" in name:
            n = len(order)
            want = torch.cat([want[[mk_vocab[t] for t in order]], want[n:]])
            got = torch.cat([got[[fm_vocab[t] for t in order]], got[n:]])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


CASES = {
    # the bug: a larger tokenizer than the reference's rows (14 tokens over 12 rows)
    "source_ft0": lambda f: _recipe(f, tokenizer_source=f["ft0"]),
    "source_ft1": lambda f: _recipe(f, tokenizer_source=f["ft1"]),
    # mergekit's base without a base_model is the first of a set (any model): name it
    "source_base": lambda f: _recipe(f, tokenizer_source="base", base_model=f["base"]),
    "source_union": lambda f: _recipe(f, tokenizer_source="union"),
    "block_union_pad": lambda f: _recipe(f, tokenizer={"source": "union", "pad_to_multiple_of": 8}),
    "block_default_union": lambda f: _recipe(f, tokenizer={"pad_to_multiple_of": 5}),
    "task_arithmetic_base": lambda f: {
        "merge_method": "task_arithmetic", "base_model": f["base"], "dtype": "float32",
        "tokenizer_source": "union",
        "models": [{"model": f["ft0"], "parameters": {"weight": 0.7}},
                   {"model": f["ft1"], "parameters": {"weight": 0.4}}]},
    # union: mergekit 0.1.5 adds tokens: to the base tokenizer in place with source base (KeyError)
    "tokens": lambda f: _recipe(f, base_model=f["base"], tokenizer={"source": "union", "tokens": {
        "x": {"source": f["ft0"]},
        "q": {"source": {"kind": "zero"}},
        "a": {"source": {"kind": "model_token", "model": f["ft1"], "token": "z"}, "force": True},
        "z": {"source": {"kind": "model_token", "model": f["ft0"], "token_id": 5}}}}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tokenizer_cases(fam, tmp_path, case):
    from transformers import AutoTokenizer

    recipe = CASES[case](fam)
    out = _run(recipe, tmp_path)
    n = len(AutoTokenizer.from_pretrained(out))
    pad = (recipe.get("tokenizer") or {}).get("pad_to_multiple_of")
    rows = -(-n // pad) * pad if pad else n
    expected = {"source_ft0": 14, "source_ft1": 12, "source_base": 12}.get(case)
    if expected:
        assert n == expected
    if "union" in case:
        assert n == 15  # 4 specials + a..h + x, y, z
    _loads_and_generates(out, rows)
    _compare_mergekit(recipe, out, tmp_path)


def test_larger_tokenizer_rows_follow_the_tokenizer(fam, tmp_path):
    """The bug this fixes: 14 tokens were written over 12 rows (token 13 then raised IndexError)."""
    out = _run(_recipe(fam, tokenizer_source=fam["ft0"]), tmp_path)
    state = _state(out)
    assert state["model.embed_tokens.weight"].shape[0] == 14
    assert state["lm_head.weight"].shape[0] == 14
    base, ft0, ft1 = (_state(Path(fam[k])) for k in ("base", "ft0", "ft1"))
    # x (id 12) and y (13) only in ft0: ft0's rows; a: 0.5 base[4] + 0.3 ft0[4] + 0.2 ft1[5] (swapped)
    w = state["model.embed_tokens.weight"]
    torch.testing.assert_close(w[12], ft0["model.embed_tokens.weight"][12])
    e = [s["model.embed_tokens.weight"] for s in (base, ft0, ft1)]
    torch.testing.assert_close(w[4], 0.5 * e[0][4] + 0.3 * e[1][4] + 0.2 * e[2][5])


def test_tokenizer_errors(fam, tmp_path):
    with pytest.raises(FastmergeError, match="directory not found"):
        fastmerge.merge(_recipe(fam, tokenizer_source=str(tmp_path / "nope")), tmp_path / "o1")
    with pytest.raises(FastmergeError, match="disagree"):
        fastmerge.merge(_recipe(fam, tokenizer_source="base", tokenizer={"source": "union"}), tmp_path / "o2")
    with pytest.raises(FastmergeError, match="needs a source"):
        fastmerge.merge(_recipe(fam, tokenizer={"source": "base", "tokens": {"x": {"force": True}}}), tmp_path / "o3")
    assert not (tmp_path / "o3").exists()


@pytest.mark.parametrize("template", ["chatml", "{% for m in messages %}{{ m['content'] }} {% endfor %}"])
def test_chat_template(fam, tmp_path, template):
    """A named template (mergekit's text of that name) or Jinja text, on a copied and a built tokenizer."""
    from transformers import AutoTokenizer

    for where, source in (("copied", fam["ft0"]), ("built", "union")):
        out = _run(_recipe(fam, tokenizer_source=source, chat_template=template), tmp_path / where)
        tok = AutoTokenizer.from_pretrained(out)
        if template == "chatml":
            pytest.importorskip("mergekit")
            import importlib.resources

            from mergekit._data import chat_templates

            want = importlib.resources.files(chat_templates).joinpath("chatml.jinja").read_text()
        else:
            want = template
        assert tok.chat_template == want
        text = tok.apply_chat_template([{"role": "user", "content": "a b"}], tokenize=False)
        assert "a b" in text
    merged = []  # an unknown name is an error before any tensor is merged
    with pytest.raises(FastmergeError, match="unknown template"):
        fastmerge.merge(_recipe(fam, tokenizer_source="union", chat_template="nosuch"), tmp_path / "bad",
                        progress=merged.append)
    assert not (tmp_path / "bad").exists() and merged == []


def test_merger_builds_the_output_vocabulary(fam, tmp_path):
    """``Merger`` (in memory) writes what the streaming merge writes for a union vocabulary."""
    from fastmerge.merger import Merger

    recipe = _recipe(fam, tokenizer={"source": "union", "pad_to_multiple_of": 8})
    out = _run(recipe, tmp_path)
    module = Merger(copy.deepcopy(recipe)).merge()
    state = _state(out)
    got = module.state_dict()
    for name, want in state.items():
        torch.testing.assert_close(got[name], want, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
