"""The 13 torch-route methods (issue 15, part 2) run from recipes and merge what mergekit merges.

Each recipe below goes through ``fastmerge.merge`` and mergekit's own ``run_merge`` on tiny fp32
models (Llama, Mistral, Qwen2 with biases); the two checkpoints agree within 1e-6 for every
deterministic method, and ``Merger`` (in memory) equals the on-disk merge. DELLA draws its keep
masks from the Philox stream (DESIGN.md s.3), mergekit from ``torch.bernoulli``: equal at density 1,
equal in distribution otherwise. Every non-default parameter of each method appears in a recipe.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch

import fastmerge
from fastmerge import cli, methods, methods_math
from fastmerge.engine import MergeOptions
from fastmerge.errors import FastmergeError
from fastmerge.merger import Merger
from fastmerge.recipe import load_recipe

from .test_merge import load_dir
from .test_mergekit_agreement import assert_same_statistics

pytestmark = pytest.mark.mergekit
pytest.importorskip("mergekit")

from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402
from mergekit.merge_methods import get as mk_get  # noqa: E402
from mergekit.options import MergeOptions as MKOptions  # noqa: E402

WIRED = ("breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "model_stock", "nuslerp", "multislerp",
         "karcher", "nearswap", "arcee_fusion", "ram", "ramplus_tl")
TOL = dict(rtol=0, atol=1e-6)


def _mw(model, **params):
    return dict(model=model, parameters=params) if params else dict(model=model)


def _recipes(base: str, ft0: str, ft1: str) -> dict[str, dict]:
    """case -> recipe; the method is the case name up to its first ':'."""
    return {
        "breadcrumbs": dict(
            base_model=base,
            models=[_mw(ft0, weight=0.7, density=0.6, gamma=0.05), _mw(ft1, weight=0.4, density=[0.5, 0.9])],
            parameters={"lambda": 1.2, "rescale": True, "normalize": True, "gamma": 0.02, "int8_mask": True}),
        "breadcrumbs_ties": dict(
            base_model=base,
            models=[_mw(base), _mw(ft0, weight=0.6, density=0.5), _mw(ft1, weight=[0.2, 0.8], density=0.7, gamma=0.1)],
            parameters={"int8_mask": True, "normalize": True, "rescale": True, "lambda": 0.9}),
        # density 1: no draws, so the merge is deterministic (and equal to mergekit's)
        "della:dense": dict(
            base_model=base,
            models=[_mw(ft0, weight=0.6, epsilon=0.05), _mw(ft1, weight=-0.3)],
            parameters={"normalize": False, "rescale": False, "lambda": 0.8, "int8_mask": True}),
        "della_linear:dense": dict(
            base_model=base,
            models=[_mw(ft0, weight=0.6), _mw(ft1, weight=0.5, epsilon=0.1)],
            parameters={"normalize": True, "lambda": 1.5, "rescale": False, "int8_mask": True}),
        "sce": dict(base_model=base, models=[_mw(ft0), _mw(ft1)], parameters=dict(select_topk=0.5, int8_mask=True)),
        "sce:default": dict(base_model=base, models=[_mw(base), _mw(ft0), _mw(ft1)]),
        "model_stock": dict(base_model=base, models=[_mw(ft0), _mw(ft1)]),
        "model_stock:filter_wise": dict(base_model=base, models=[_mw(ft1), _mw(base), _mw(ft0)],
                                        parameters=dict(filter_wise=True)),
        "nuslerp": dict(models=[_mw(ft0, weight=0.3), _mw(ft1, weight=0.9)]),  # no base: the models themselves
        "nuslerp:base_rows": dict(
            base_model=base, models=[_mw(ft0, weight=[0.2, 0.7]), _mw(ft1, weight=0.5)],
            parameters=dict(nuslerp_flatten=False, nuslerp_row_wise=True)),
        "nuslerp:base_cols": dict(
            base_model=base, models=[_mw(ft0, weight=0.4), _mw(ft1, weight=0.5)],
            parameters=dict(nuslerp_flatten=False)),
        "multislerp": dict(models=[_mw(base, weight=0.2), _mw(ft0, weight=0.5), _mw(ft1, weight=0.3)]),
        "multislerp:base": dict(
            base_model=base, models=[_mw(ft0, weight=1.0), _mw(ft1, weight=[0.5, 2.0])],
            parameters=dict(normalize_weights=False, eps=1e-6)),
        # a named base not listed is one more input (last), as mergekit's normalize_config adds it
        "karcher": dict(base_model=base, models=[_mw(ft0), _mw(ft1)], parameters=dict(max_iter=3, tol="1e-7")),
        "karcher:default": dict(models=[_mw(ft1), _mw(ft0), _mw(base)]),
        "nearswap": dict(base_model=base, models=[_mw(ft0)],
                         parameters=dict(t=[dict(filter="mlp", value=[0.005, 0.03]), dict(value=0.01)])),
        "arcee_fusion": dict(base_model=base, models=[_mw(base), _mw(ft1)]),
        "ram": dict(base_model=base, models=[_mw(ft0), _mw(ft1)], parameters=dict(epsilon=0.02)),
        "ram:default": dict(base_model=base, models=[_mw(ft0), _mw(ft1)]),
        "ramplus_tl": dict(base_model=base, models=[_mw(ft0), _mw(ft1)],
                           parameters=dict(r=0.5, alpha=0.4, epsilon=0.015)),
    }


#: the architecture each deterministic case runs on (Llama unless named)
ARCH = {"breadcrumbs_ties": "qwen2", "sce": "mistral", "model_stock:filter_wise": "qwen2", "nuslerp:base_rows": "qwen2",
        "multislerp:base": "mistral", "karcher": "qwen2", "nearswap": "mistral", "ram": "qwen2",
        "ramplus_tl": "mistral", "della:dense": "qwen2"}
CASES = list(_recipes("b", "a", "c"))


def _recipe(case: str, paths) -> dict:
    r = _recipes(*map(str, paths))[case]
    return {"merge_method": case.split(":")[0], "dtype": "float32", **r}


def _mergekit(recipe: dict, out: Path, seed: int = 0) -> dict:
    run_merge(MergeConfiguration.model_validate(copy.deepcopy(recipe)), str(out),
              MKOptions(device="cpu", quiet=True, copy_tokenizer=False, write_model_card=False, random_seed=seed))
    return load_dir(out)


def _close(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        assert got[name].dtype == w.dtype and got[name].shape == w.shape, name
        torch.testing.assert_close(got[name], w, **TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_every_wired_method_has_a_recipe_and_its_non_defaults_are_exercised():
    assert tuple(methods.METHODS)[7:] == WIRED
    cases = _recipes("b", "a", "c") | {m: _della_recipe(m, "b", "a", "c") for m in ("della", "della_linear")}
    for name in WIRED:
        used: dict[str, list] = {}
        for case, r in cases.items():
            if case.split(":")[0] != name:
                continue
            for scope in [r.get("parameters") or {}] + [m.get("parameters") or {} for m in r["models"]]:
                for k, v in scope.items():
                    used.setdefault(k, []).append(v)
        for p in methods.get(name).params:
            if p.default is methods.REQUIRED or p.name == "weight":
                continue
            assert any(v != p.default for v in used.get(p.name, [])), (name, p.name)


def test_declarations_follow_methods_math_and_mergekit():
    kinds = {bool: "bool", float: "float", int: "int"}
    for name in WIRED:
        m = methods.get(name)
        assert m.merge is not None and m.executors == ("torch",) and not m.searchable, name
        ours = methods_math.PARAMS[name]
        assert [p.name for p in m.params] == list(ours), name
        theirs = {p.name: p for p in mk_get(name).spec.parameters}
        assert set(theirs) == set(ours), name
        contract = mk_get(name).spec.contract
        assert m.base == contract.base.value, name
        for p in m.params:
            scope, typ, default = ours[p.name]
            assert p.kind == kinds[typ] and p.per_model == (scope == "per_model"), (name, p.name)
            assert (p.default is methods.REQUIRED) == (default is methods_math.REQUIRED) == theirs[p.name].required
            if p.default is not methods.REQUIRED:
                assert p.default == default == theirs[p.name].default, (name, p.name)
            assert p.per_model == (theirs[p.name].scope.value != "shared"), (name, p.name)
        low, high = m.non_base
        if m.inputs is not None:  # counts the base
            assert contract.min_inputs == contract.max_inputs == m.inputs, name
        if contract.min_non_base is not None:
            assert (low, high) == (contract.min_non_base, contract.max_non_base), name
        if name == "model_stock":
            assert contract.min_inputs == low + 1 == 3


@pytest.mark.parametrize("case", [c for c in CASES if not c.startswith("della")] + ["della:dense", "della_linear:dense"])
def test_merges_as_mergekit_on_disk_and_in_memory(case, families, tmp_path):
    paths = families(ARCH.get(case, "llama"), layers=2)
    recipe = _recipe(case, paths)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no parameter is another method's
        load_recipe(copy.deepcopy(recipe))
    fastmerge.merge(copy.deepcopy(recipe), tmp_path / "fm")
    disk = load_dir(tmp_path / "fm")
    _close(disk, _mergekit(recipe, tmp_path / "mk"))
    mem = Merger(copy.deepcopy(recipe)).module.state_dict()
    for name, v in disk.items():
        assert torch.equal(mem[name], v), name


# --- DELLA: Philox draws (statistically mergekit's) -----------------------------------------------


def _della_recipe(method: str, base: str, ft0: str, ft1: str) -> dict:
    return dict(merge_method=method, base_model=base, dtype="float32", random_seed=7,
                models=[_mw(ft0, weight=0.7, density=0.4, epsilon=0.2), _mw(ft1, weight=0.5, density=0.6)])


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_is_philox_and_statistically_mergekit(method, families, tmp_path):
    base, ft0, ft1 = map(str, families(hidden=128, layers=1))
    recipe = _della_recipe(method, base, ft0, ft1)
    fastmerge.merge(copy.deepcopy(recipe), tmp_path / "fm")
    fm = load_dir(tmp_path / "fm")
    mk = _mergekit(recipe, tmp_path / "mk", seed=7)
    src = {p: load_dir(p) for p in (base, ft0, ft1)}
    # the same bits as methods_math with the recipe's seed and the tensor's name; in memory too
    mem = Merger(copy.deepcopy(recipe)).module.state_dict()
    fn = methods_math.METHODS[method]
    checked = 0
    for name, got in fm.items():
        want = fn(src[base][name], [src[ft0][name], src[ft1][name]], weight=(0.7, 0.5), density=(0.4, 0.6),
                  epsilon=(0.2, 0.15), name=name, seed=7)
        assert torch.equal(got, want) and torch.equal(mem[name], got), name
        if got.numel() < 10_000:
            continue
        d_mk, d_fm = ((x[name] - src[base][name]).reshape(-1) for x in (mk, fm))
        assert_same_statistics(d_mk, d_fm, name)
        checked += 1
    assert checked >= 4
    # --seed (MergeOptions.seed) overrides random_seed: other draws; the same seed, the same bits
    fastmerge.merge(copy.deepcopy(recipe), tmp_path / "s8", MergeOptions(seed=8))
    fastmerge.merge(copy.deepcopy(recipe) | {"random_seed": 8}, tmp_path / "r8")
    s8, r8 = load_dir(tmp_path / "s8"), load_dir(tmp_path / "r8")
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(s8[name], r8[name]) and not torch.equal(s8[name], fm[name])


# --- recipe validation of the new contracts -------------------------------------------------------

def test_contracts_and_kinds_are_checked(families, tmp_path):
    base, ft0, ft1 = map(str, families(layers=2))
    bad = [
        (dict(merge_method="model_stock", base_model=base, models=[_mw(ft0)]), r"at least 2 models besides"),
        (dict(merge_method="nuslerp", models=[_mw(ft0, weight=1), _mw(ft1, weight=1), _mw(base, weight=1)]),
         r"nuslerp needs exactly 2 models besides the base_model"),
        (dict(merge_method="nuslerp", base_model=base, models=[_mw(ft0, weight=1)]), r"exactly 2 models"),
        (dict(merge_method="nearswap", base_model=base, models=[_mw(ft0), _mw(ft1)], parameters=dict(t=0.1)),
         r"nearswap needs the base_model and exactly one other model"),
        (dict(merge_method="sce", models=[_mw(ft0)]), r"'sce' needs a base_model"),
    ]
    for recipe, match in bad:
        with pytest.raises(FastmergeError, match=match):
            load_recipe(recipe)
    plan_errors = [
        # max_iter is an int, as mergekit declares it; della's rescale is mergekit's bool (no 'inverse')
        (dict(merge_method="karcher", models=[_mw(ft0), _mw(ft1)], parameters=dict(max_iter=2.5)), r"max_iter"),
        (dict(merge_method="della", base_model=base, models=[_mw(ft0, weight=1, density=0.5)],
              parameters=dict(rescale="inverse")), r"rescale.*'inverse'"),
        (dict(merge_method="della", base_model=base, models=[_mw(ft0, weight=1, density=0.1, epsilon=0.2)]),
         r"della: tensor .*density \+/- epsilon"),
        (dict(merge_method="multislerp", base_model=base, models=[_mw(ft0)]), r"missing parameter 'weight'"),
        (dict(merge_method="nuslerp", base_model=base,
              slices=[dict(sources=[dict(model=ft0, layer_range=[0, 2], parameters=dict(weight=1)),
                                    dict(model=ft1, layer_range=[0, 2], parameters=dict(weight=1))])]),
         r"base model .* is not among the sources"),
    ]
    for i, (recipe, match) in enumerate(plan_errors):
        with pytest.raises(FastmergeError, match=match):
            fastmerge.merge(recipe, tmp_path / f"e{i}")
    # karcher's max_iter as an int reaches the math (a YAML "3" string too)
    r = load_recipe(dict(merge_method="karcher", models=[_mw(ft0), _mw(ft1)], parameters=dict(max_iter="3")))
    from fastmerge.engine import open_models
    from fastmerge.plan import build_plan

    plan = build_plan(r, open_models(r))
    assert {type(t.params["max_iter"]) for t in plan.tensors if t.route == "torch"} == {int}


def test_cli_help_lists_the_wired_methods(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["merge", "--help"])
    out = capsys.readouterr().out
    for name in WIRED:
        assert f"  {name} " in out, name


@pytest.mark.parametrize("case", [c for c in CASES if not c.startswith("della")] + ["della:dense", "della_linear:dense"])
def test_merges_as_mergekit_on_gpt2(case, families, tmp_path):
    """GPT-2's layout (``transformer.h.N``, Conv1D weights, biases, tied embeddings) for every method."""
    recipe = _recipe(case, families("gpt2", layers=2))
    fastmerge.merge(copy.deepcopy(recipe), tmp_path / "fm")
    _close(load_dir(tmp_path / "fm"), _mergekit(recipe, tmp_path / "mk"))
