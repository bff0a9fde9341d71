"""fastmerge and mergekit produce the same checkpoint from the same recipe.

Deterministic methods (linear, task_arithmetic, ties, slerp, passthrough, gradients, filters, slices)
are compared tensor by tensor; DARE (mergekit: torch.bernoulli, fastmerge: a Philox mask, DESIGN.md
section 3) is compared in distribution.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fastmerge

pytestmark = pytest.mark.mergekit
pytest.importorskip("mergekit")

from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402
from mergekit.options import MergeOptions as MKOptions  # noqa: E402

#: Both compute in fp32 and differ only in the order of a few operations (mergekit stacks deltas
#: and sums over a new axis, normalizes slerp chunk-wise): a few ulps, hence rtol 1e-5 / atol 1e-6.
TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="session")
def fam(families):
    """base, ft0, ft1: tiny Llama (hidden 64, 4 layers), fp32, sharded."""
    return [str(p) for p in families(layers=4)]


@pytest.fixture(scope="session")
def big(families):
    """base, ft0, ft1 with tensors of 10^4..1.8*10^5 elements, for DARE statistics."""
    return [str(p) for p in families(hidden=256, layers=2)]


def _state(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _merge_both(recipe: dict, tmp_path: Path, seed: int = 0) -> tuple[dict, dict, dict, dict]:
    """(mergekit state, fastmerge state, mergekit config, fastmerge config) of one recipe."""
    mk_out, fm_out = tmp_path / "mergekit", tmp_path / "fastmerge"
    run_merge(MergeConfiguration.model_validate(copy.deepcopy(recipe)), str(mk_out),
              MKOptions(device="cpu", quiet=True, copy_tokenizer=False, write_model_card=False, random_seed=seed))
    fastmerge.merge(copy.deepcopy(recipe), fm_out)
    configs = [json.loads((d / "config.json").read_text()) for d in (mk_out, fm_out)]
    return _state(mk_out), _state(fm_out), configs[0], configs[1]


def _assert_same(mk: dict, fm: dict) -> None:
    assert sorted(fm) == sorted(mk)
    for name, want in mk.items():
        got = fm[name]
        assert got.shape == want.shape, name
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(got, want, **TOL, msg=lambda m, n=name: f"{n}: {m}")


def _deterministic_recipes(base: str, ft0: str, ft1: str) -> dict[str, dict]:
    return {
        "linear": dict(
            merge_method="linear",
            models=[dict(model=base, parameters=dict(weight=0.5)), dict(model=ft0, parameters=dict(weight=0.3)),
                    dict(model=ft1, parameters=dict(weight=0.9))],
        ),
        # a base_model named but not listed joins the inputs (mergekit's normalize_config), and
        # linear averages it in with the global weight
        "linear_base_model": dict(
            merge_method="linear", base_model=base,
            models=[dict(model=ft0, parameters=dict(weight=0.3)), dict(model=ft1, parameters=dict(weight=0.9))],
            parameters=dict(weight=0.5, normalize=True),
        ),
        "task_arithmetic": dict(
            merge_method="task_arithmetic", base_model=base,
            models=[dict(model=ft0, parameters=dict(weight=0.7)), dict(model=ft1, parameters=dict(weight=-0.4))],
            parameters=dict(**{"lambda": 1.3}),
        ),
        # int(density * n) >= 1 for every tensor (the smallest has 64 elements): mergekit keeps
        # max(1, m) by argsort, fastmerge |delta| >= the m-th largest; identical without ties.
        "ties": dict(
            merge_method="ties", base_model=base,
            models=[dict(model=base), dict(model=ft0, parameters=dict(weight=0.6, density=0.5)),
                    dict(model=ft1, parameters=dict(weight=0.4, density=0.7))],
        ),
        "slerp": dict(
            merge_method="slerp", base_model=base,
            models=[dict(model=base), dict(model=ft0)],
            parameters=dict(t=[dict(filter="self_attn", value=[0, 0.5, 0.3, 0.7, 1]),
                               dict(filter="mlp", value=[1, 0.5, 0.7, 0.3, 0]), dict(value=0.5)]),
        ),
        # gradients (lengths 2 and 3) inside filters, per-model and global scopes, a filter that
        # falls through to the next scope, density gradients, and values as YAML 1.1 leaves them:
        # `1e-1` and a quoted "false" are strings, read as the parameter's type
        "ties_gradient_filter": dict(
            merge_method="ties", base_model=base,
            models=[
                dict(model=ft0, parameters=dict(
                    weight=[dict(filter="self_attn", value=[0.2, 0.9]), dict(filter="mlp", value=[1.0, 0.3, 0.6])],
                    density=[0.3, 0.9])),
                dict(model=ft1, parameters=dict(density=[dict(filter="up_proj", value=0.2), dict(value=[0.8, 0.5])])),
            ],
            parameters=dict(weight=["1e-1", 0.5, 1], normalize="false", int8_mask=True),
        ),
        # slices for a non-passthrough method: sources from different layers, a one-layer slice
        # (t = 1), per-source over slice over global parameters
        "task_arithmetic_slices": dict(
            merge_method="task_arithmetic", base_model=base,
            slices=[
                dict(sources=[dict(model=base, layer_range=[0, 2]),
                              dict(model=ft0, layer_range=[0, 2], parameters=dict(weight=[0.1, 0.9])),
                              dict(model=ft1, layer_range=[2, 4])],
                     parameters=dict(weight=0.25)),
                dict(sources=[dict(model=base, layer_range=[3, 4]), dict(model=ft0, layer_range=[3, 4]),
                              dict(model=ft1, layer_range=[1, 2], parameters=dict(weight=[0.0, 2.0]))]),
                dict(sources=[dict(model=base, layer_range=[1, 4]), dict(model=ft0, layer_range=[0, 3]),
                              dict(model=ft1, layer_range=[1, 4])],
                     parameters=dict(weight=[dict(filter="mlp", value=[0.2, 0.6, 1.4])])),
            ],
            parameters=dict(weight=0.6, normalize=True),
        ),
    }


DETERMINISTIC = ["linear", "linear_base_model", "task_arithmetic", "ties", "slerp", "ties_gradient_filter", "task_arithmetic_slices"]


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_methods_match_mergekit(name, fam, tmp_path):
    recipe = _deterministic_recipes(*fam)[name] | {"dtype": "float32"}
    mk, fm, mk_cfg, fm_cfg = _merge_both(recipe, tmp_path)
    _assert_same(mk, fm)
    assert fm_cfg["num_hidden_layers"] == mk_cfg["num_hidden_layers"]


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_methods_match_mergekit_on_gpt2(name, families, tmp_path):
    """The same recipes on GPT-2's layout (``transformer.h.N``, Conv1D weights, biases, tied
    embeddings; filters that name Llama modules match nothing there, as in mergekit)."""
    paths = [str(p) for p in families("gpt2", layers=4)]
    recipe = _deterministic_recipes(*paths)[name] | {"dtype": "float32"}
    mk, fm, mk_cfg, fm_cfg = _merge_both(recipe, tmp_path)
    _assert_same(mk, fm)
    assert fm_cfg["n_layer"] == mk_cfg["n_layer"]


@pytest.mark.parametrize("arch, spec", [("qwen2", {}), ("mistral", {}), ("llama", {"tie_embeddings": True}), ("gpt2", {})],
                         ids=["qwen2-biases", "mistral", "llama-tied", "gpt2"])
def test_other_architectures_match_mergekit(arch, spec, families, tmp_path):
    paths = [str(p) for p in families(arch, layers=2, **spec)]
    recipe = _deterministic_recipes(*paths)["ties_gradient_filter"] | {"dtype": "float32"}
    mk, fm, mk_cfg, fm_cfg = _merge_both(recipe, tmp_path)
    _assert_same(mk, fm)
    assert fm_cfg.get("tie_word_embeddings") == mk_cfg.get("tie_word_embeddings")


def test_passthrough_stacking_matches_mergekit(fam, tmp_path):
    base, ft0, ft1 = fam
    recipe = dict(
        merge_method="passthrough", dtype="float32",
        slices=[
            dict(sources=[dict(model=base, layer_range=[0, 3])]),
            dict(sources=[dict(model=ft0, layer_range=[1, 4],
                               parameters=dict(scale=[dict(filter="o_proj", value=0.5),
                                                      dict(filter="down_proj", value=[2.0, 1.0])]))]),
            dict(sources=[dict(model=ft1, layer_range=[3, 4])]),
        ],
    )
    mk, fm, mk_cfg, fm_cfg = _merge_both(recipe, tmp_path)
    _assert_same(mk, fm)
    assert mk_cfg["num_hidden_layers"] == fm_cfg["num_hidden_layers"] == 7
    assert sum(".layers." in n and n.endswith("q_proj.weight") for n in fm) == 7
    # the stacked layers are the sources' layers, untouched unless scaled
    src = _state(Path(ft0))
    torch.testing.assert_close(fm["model.layers.3.self_attn.q_proj.weight"], src["model.layers.1.self_attn.q_proj.weight"],
                               rtol=0, atol=0)
    torch.testing.assert_close(fm["model.layers.3.self_attn.o_proj.weight"],
                               0.5 * src["model.layers.1.self_attn.o_proj.weight"], rtol=0, atol=0)


# --- DARE: compared in distribution -------------------------------------------------------------

#: every check below is within Z standard errors (a false alarm is ~6e-5 per check; the masks
#: are seeded, so the outcome is fixed for a given torch/mergekit version)
Z = 4.0
DENSITY = 0.3


def _mean_se(x: torch.Tensor) -> tuple[float, float]:
    x = x.double()
    return float(x.mean()), float(x.std() / math.sqrt(x.numel()))


def assert_same_statistics(d_mk: torch.Tensor, d_fm: torch.Tensor, name: str) -> None:
    """Mean, second moment and the fraction of untouched elements of out - base, each within Z
    combined standard errors of the two independent samples (random masks: mergekit's vs ours)."""
    for stat in (lambda d: d, lambda d: d * d, lambda d: (d == 0).double()):
        m1, s1 = _mean_se(stat(d_mk))
        m2, s2 = _mean_se(stat(d_fm))
        assert abs(m1 - m2) < Z * math.hypot(s1, s2), f"{name}: mergekit {m1:.4g} vs fastmerge {m2:.4g}"


def test_dare_linear_keep_rate_matches_mergekit(big, tmp_path):
    base, ft0, _ = big
    recipe = dict(merge_method="dare_linear", base_model=base, dtype="float32",
                  models=[dict(model=ft0, parameters=dict(weight=1.0, density=DENSITY))],
                  parameters=dict(rescale=False, normalize=False))
    mk, fm, _, _ = _merge_both(recipe, tmp_path, seed=1234)
    b, f = _state(Path(base)), _state(Path(ft0))
    assert sorted(fm) == sorted(mk)
    masks = {}
    for name in fm:
        delta = f[name] - b[name]
        live = delta != 0
        n = int(live.sum())
        assert n > 0.99 * delta.numel(), name
        se = math.sqrt(DENSITY * (1 - DENSITY) / n)
        for who, out in (("mergekit", mk), ("fastmerge", fm)):
            diff = out[name] - b[name]
            keep = diff != 0
            # out = base + keep * delta exactly: dropped elements are the base, kept ones base + delta
            torch.testing.assert_close(out[name][keep], f[name][keep], **TOL)
            assert not (keep & ~live).any(), (who, name)
            rate = float(keep[live].float().mean())
            assert abs(rate - DENSITY) < Z * se, f"{who} {name}: keep rate {rate:.4f}, density {DENSITY}, se {se:.2g}"
        masks[name] = (fm[name] - b[name]) != 0
    # the mask depends on the tensor name: same-shaped tensors get independent masks
    a, c = masks["model.layers.0.mlp.up_proj.weight"], masks["model.layers.1.mlp.up_proj.weight"]
    both = float((a & c).float().mean())
    assert abs(both - DENSITY**2) < Z * math.sqrt(DENSITY**2 * (1 - DENSITY**2) / a.numel())


def test_dare_ties_rescaled_moments_match_mergekit(big, tmp_path):
    base, ft0, ft1 = big
    recipe = dict(merge_method="dare_ties", base_model=base, dtype="float32",
                  models=[dict(model=ft0, parameters=dict(weight=0.7, density=DENSITY)),
                          dict(model=ft1, parameters=dict(weight=0.5, density=0.6))],
                  parameters=dict(rescale=True))
    mk, fm, _, _ = _merge_both(recipe, tmp_path, seed=99)
    b = _state(Path(base))
    assert sorted(fm) == sorted(mk)
    checked = 0
    for name in fm:
        if fm[name].numel() < 10_000:
            continue
        d_mk = (mk[name] - b[name]).reshape(-1)
        d_fm = (fm[name] - b[name]).reshape(-1)
        assert_same_statistics(d_mk, d_fm, name)
        checked += 1
    assert checked >= 10
