"""Recipes: parameter values resolve as mergekit resolves them, scopes and t reach the plan as in
mergekit's planner, and every mistake is a FastmergeError naming the key or model."""

from __future__ import annotations

import re

import pytest
import yaml
from pydantic import TypeAdapter

import fastmerge
from fastmerge import FastmergeError
from fastmerge.engine import open_models
from fastmerge.plan import build_plan
from fastmerge.recipe import VALIDATORS, Setting, evaluate_setting, load_recipe, parse_rescale

try:
    from mergekit.config import ParameterSetting
    from mergekit.config import evaluate_setting as mk_evaluate_setting
except ImportError:  # the hand-computed table below still runs
    mk_evaluate_setting = None

ATTN = "model.layers.1.self_attn.q_proj.weight"
MLP = "model.layers.2.mlp.up_proj.weight"
EMBED = "model.embed_tokens.weight"
NAMES = [ATTN, MLP, EMBED, "lm_head.weight", ""]
TS = [0, 0.1, 0.33, 0.5, 0.99, 1]
FLOAT = VALIDATORS["weight"]
BOOL = VALIDATORS["normalize"]


def _fm(raw, name: str, t: float, validate=FLOAT):
    return evaluate_setting(name, TypeAdapter(Setting).validate_python(raw), t, validate=validate)


# --- evaluate_setting ---------------------------------------------------------------------------

#: (setting as YAML, tensor name, t, validator, expected), computed by hand
HAND = [
    ("0.5", ATTN, 0.7, FLOAT, 0.5),
    ("2", EMBED, 0, FLOAT, 2.0),
    ("1e-3", ATTN, 0, FLOAT, 0.001),  # YAML 1.1 reads 1e-3 as a string; it is a number here
    ("[0, 1]", ATTN, 0.33, FLOAT, 0.33),
    ("[0, 1, 0]", ATTN, 0.5, FLOAT, 1.0),
    ("[0, 1, 0]", ATTN, 0.25, FLOAT, 0.5),
    ("[0, 1, 0]", ATTN, 0.75, FLOAT, 0.5),
    ("[1, 2, 3, 4, 5]", ATTN, 0.1, FLOAT, 1.4),
    ("[1, 2, 3, 4, 5]", ATTN, 0.99, FLOAT, 4.96),
    ("[1, 2, 3, 4, 5]", ATTN, 1, FLOAT, 5.0),
    ("[1e-1, 1]", ATTN, 0.5, FLOAT, 0.55),  # string endpoints that read as numbers interpolate
    ("[true, false]", ATTN, 0.5, BOOL, True),  # bools are picked, not interpolated
    ("[true, false]", ATTN, 1, BOOL, False),
    ("'no'", ATTN, 0, BOOL, False),
    ("[]", ATTN, 0.5, FLOAT, None),
    ("[{filter: mlp, value: 0.1}, {filter: self_attn, value: [0, 1]}, {value: 0.7}]", MLP, 0.5, FLOAT, 0.1),
    ("[{filter: mlp, value: 0.1}, {filter: self_attn, value: [0, 1]}, {value: 0.7}]", ATTN, 0.5, FLOAT, 0.5),
    ("[{filter: mlp, value: 0.1}, {filter: self_attn, value: [0, 1]}, {value: 0.7}]", EMBED, 0.5, FLOAT, 0.7),
    ("[{filter: layers, value: 1}, {filter: mlp, value: 2}]", MLP, 0, FLOAT, 1.0),  # first match wins
    ("[{filter: mlp, value: 1}]", ATTN, 0, FLOAT, None),  # no match
    ("[{filter: '*', value: 3}, {value: 4}]", EMBED, 0, FLOAT, 3.0),
    ("[{filter: mlp, value: 1}, {value: 4}]", "", 0, FLOAT, 4.0),  # no name: only catch-alls match
    ("{filter: mlp, value: [2, 4]}", MLP, 0.5, FLOAT, 3.0),  # a single {filter, value}
    ("{filter: mlp, value: [2, 4]}", ATTN, 0.5, FLOAT, None),
]


@pytest.mark.parametrize("text, name, t, validate, want", HAND)
def test_evaluate_setting_by_hand(text, name, t, validate, want):
    got = _fm(yaml.safe_load(text), name, t, validate)
    assert got == pytest.approx(want) if isinstance(want, float) else got is want


def test_evaluate_setting_without_validator_keeps_values():
    assert evaluate_setting(ATTN, "inverse", 0.5) == "inverse"
    assert evaluate_setting(ATTN, ["a", "b", "c"], 0.5) == "b"
    assert evaluate_setting(ATTN, [0, 2], 0.25) == 0.5


#: mergekit compatibility table: raw settings (as YAML would give them) and their validator
NUMERIC = [
    0, 1, 0.25, -1.5, "1e-3", True,
    [0.1, 0.9], [1, 0, 2], [0.5, "2e-1", 1, 0], [1, 2, 3, 4, 5], [-1, 0.5], [3, 3, 3],
    {"filter": "mlp", "value": [0.2, 0.8]},
    [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
     {"value": 0.5}],
    [{"filter": "layers", "value": 1}, {"filter": "mlp", "value": [2, 3]}],
    [{"filter": "up_proj", "value": 0.2}, {"filter": "*", "value": [0.8, 0.5, 0.1]}, {"value": 9}],
    [{"filter": "lm_head", "value": 2}],
    [{"value": [0, 1, 4, 9]}],
    [],
]
DISCRETE = [
    ([True, False], BOOL), ([False, True, False], BOOL), (["yes", "no", "true"], BOOL), ("false", BOOL),
    (["a", "b", "c", "d"], str), ([{"filter": "mlp", "value": ["x", "y"]}, {"value": "z"}], str),
]


@pytest.mark.mergekit
@pytest.mark.skipif(mk_evaluate_setting is None, reason="mergekit is not installed")
@pytest.mark.parametrize("raw, validate", [(s, float) for s in NUMERIC] + DISCRETE, ids=repr)
def test_evaluate_setting_equals_mergekit(raw, validate):
    mk_setting = TypeAdapter(ParameterSetting).validate_python(raw)
    for name in NAMES:
        for t in TS:
            want = mk_evaluate_setting(name, mk_setting, t, validate=validate)
            got = _fm(raw, name, t, validate)
            assert got == want and type(got) is type(want), (name, t, got, want)


def test_fastmerge_validators_read_values_as_mergekit_types():
    # the plan's validators are mergekit's parameter types: a "1e-1" endpoint is a number
    assert _fm(["1e-1", 1], ATTN, 0.5) == pytest.approx(0.55)
    assert _fm("false", ATTN, 0, BOOL) is False
    with pytest.raises(FastmergeError, match="rescale"):
        VALIDATORS["rescale"]("sometimes")


# --- scopes and t, through the plan ---------------------------------------------------------------

@pytest.fixture(scope="module")
def fam(families):
    """base, ft0, ft1: tiny Llama, 4 layers (shared with the mergekit agreement tests)."""
    return [str(p) for p in families(layers=4)]


def _plan(recipe: dict):
    r = load_recipe(recipe)
    return {t.name: t for t in build_plan(r, open_models(r)).tensors}


def _layer(name: str) -> int | None:
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m[1]) if m else None


def test_per_model_over_global_and_filter_fall_through(fam):
    base, ft0, ft1 = fam
    plan = _plan(dict(
        merge_method="task_arithmetic", base_model=base,
        models=[dict(model=ft0, parameters=dict(weight=[dict(filter="mlp", value=0.9)])), dict(model=ft1)],
        parameters=dict(weight=[0.0, 0.3], **{"lambda": 2}),
    ))
    assert len(plan) == 3 + 4 * 9
    for name, task in plan.items():
        i = _layer(name)
        t = 0.0 if i is None else i / 3  # non-layer tensors take t = 0
        glob = 0.3 * t
        want = (0.9 if "mlp" in name else glob, glob)
        assert task.fused.weights == pytest.approx(want), name
        assert task.fused.lambda_ == 2.0
        assert [s.model for s in task.sources] == [base, ft0, ft1]


def test_named_base_joins_linear_inputs(fam):
    base, ft0, ft1 = fam
    plan = _plan(dict(merge_method="linear", base_model=base, parameters=dict(weight=0.5),
                      models=[dict(model=ft0, parameters=dict(weight=0.3)), dict(model=ft1)]))
    for task in plan.values():
        assert [s.model for s in task.sources] == [ft0, ft1, base]
        assert task.fused.weights == pytest.approx((0.3, 0.5, 0.5))
    with pytest.raises(FastmergeError, match=rf"missing parameter 'weight' for model {re.escape(base)}"):
        _plan(dict(merge_method="linear", base_model=base, models=[dict(model=ft0, parameters=dict(weight=1))]))


def test_per_source_over_slice_over_global(fam):
    base, ft0, ft1 = fam
    plan = _plan(dict(
        merge_method="task_arithmetic", base_model=base,
        slices=[
            dict(sources=[dict(model=base, layer_range=[0, 4]),
                          dict(model=ft0, layer_range=[0, 4], parameters=dict(weight=0.3)),
                          dict(model=ft1, layer_range=[0, 4])],
                 parameters=dict(weight=0.2, **{"lambda": 0.5})),
            dict(sources=[dict(model=base, layer_range=[1, 2]), dict(model=ft0, layer_range=[2, 3]),
                          dict(model=ft1, layer_range=[3, 4])]),
        ],
        parameters=dict(weight=[0, 1], **{"lambda": 1.5}),
    ))
    for name, task in plan.items():
        i = _layer(name)
        if i is not None and i < 4 or "embed_tokens" in name:  # first slice (embeddings: t = 0)
            assert task.fused.weights == pytest.approx((0.3, 0.2)), name
            assert task.fused.lambda_ == 0.5
        elif i == 4:  # a one-layer slice: t = 1, the last gradient value
            assert task.fused.weights == pytest.approx((1.0, 1.0)), name
            assert task.fused.lambda_ == 1.5
            rest = name.split(".layers.4.")[1]
            assert [s.name for s in task.sources] == [f"model.layers.{j}.{rest}" for j in (1, 2, 3)]
        else:  # final norm and lm_head: the last slice's scopes at t = 0
            assert name in ("model.norm.weight", "lm_head.weight")
            assert task.fused.weights == pytest.approx((0.0, 0.0)), name
            assert task.fused.lambda_ == 1.5


def test_t_within_slices(fam):
    base, ft0, _ = fam
    plan = _plan(dict(
        merge_method="slerp",
        slices=[
            dict(sources=[dict(model=base, layer_range=[0, 4]), dict(model=ft0, layer_range=[0, 4])],
                 base_model=base, parameters=dict(t=[0.2, 0.8])),
            dict(sources=[dict(model=base, layer_range=[0, 3]), dict(model=ft0, layer_range=[1, 4])],
                 base_model=ft0, parameters=dict(t=[dict(filter="mlp", value=[0, 1, 0]), dict(value=0.4)])),
            dict(sources=[dict(model=base, layer_range=[3, 4]), dict(model=ft0, layer_range=[2, 3])],
                 base_model=base, parameters=dict(t=[0, 1])),
        ],
    ))
    want = {0: 0.2, 1: 0.4, 2: 0.6, 3: 0.8}
    for name, task in plan.items():
        i = _layer(name)
        if i is None:  # embeddings with slice 0, norm and lm_head with slice 2, at t = 0
            assert task.t == pytest.approx(0.2 if "embed" in name else 0.0), name
            continue
        if i < 4:
            assert task.t == pytest.approx(want[i]), name
            assert task.base.model == base
        elif i < 7:
            assert task.t == pytest.approx([0, 1, 0][i - 4] if "mlp" in name else 0.4), name
            assert task.base.model == ft0  # a slice's base_model
        else:
            assert task.t == pytest.approx(1.0), name  # one layer: t = 1
    assert len(plan) == 3 + 8 * 9


def test_rescale_spellings(fam):
    base, ft0, _ = fam
    assert parse_rescale(True) == "l1" and parse_rescale("l1") == "l1"
    assert parse_rescale(False) == "none" and parse_rescale(None) == "none"
    assert parse_rescale("inverse") == "inverse"
    with pytest.raises(FastmergeError, match="rescale.*'maybe'"):
        parse_rescale("maybe")
    for method, value, want in [("dare_ties", None, "l1"), ("dare_linear", True, "l1"), ("dare_ties", "true", "l1"),
                                ("dare_ties", "inverse", "inverse"), ("dare_linear", False, "none"),
                                ("ties", None, "none")]:
        params = {} if value is None else {"rescale": value}
        plan = _plan(dict(merge_method=method, base_model=base, parameters=params,
                          models=[dict(model=ft0, parameters=dict(weight=1, density=0.5))]))
        assert {t.fused.rescale for t in plan.values()} == {want}, (method, value)
    with pytest.raises(FastmergeError, match="rescale.*'sometimes'"):
        _plan(dict(merge_method="dare_ties", base_model=base, parameters=dict(rescale="sometimes"),
                   models=[dict(model=ft0, parameters=dict(weight=1, density=0.5))]))


# --- errors -------------------------------------------------------------------------------------

def _models(*names, **params):
    return [dict(model=n, parameters=dict(params)) for n in names]


STATIC_ERRORS = [
    # (recipe, match)
    (dict(merge_method="linear", models=_models("a", weight=1), merge_methd="ties"), r"merge_methd: unknown key"),
    (dict(merge_method="linear", models=[dict(model="a", paramters=dict(weight=1))]), r"models\.0\.paramters: unknown key"),
    (dict(merge_method="frankenmerge", models=_models("a", weight=1)), r"unknown merge_method 'frankenmerge'"),
    (dict(merge_method="della", models=_models("a", weight=1)), r"'della' needs a base_model"),
    (dict(merge_method="ties", base_model="b", models=_models("a", weight=1, densty=0.5)),
     r"models\[0\]\.parameters: unknown parameter 'densty'"),
    # a name no method declares (a typo); one another method declares is a warning (test_methods_registry)
    (dict(merge_method="ties", base_model="b", models=_models("a", weight=1), parameters=dict(lamda=0.5)),
     r"parameters: unknown parameter 'lamda'"),
    (dict(merge_method="ties", models=_models("a", weight=1)), r"'ties' needs a base_model"),
    (dict(merge_method="slerp", base_model="b", models=_models("b", "a", "c"), parameters=dict(t=0.5)),
     r"slerp needs the base_model and exactly one other model.*'c'"),
    (dict(merge_method="passthrough", slices=[dict(sources=[dict(model="a", layer_range=[0, 2]),
                                                            dict(model="b", layer_range=[0, 2])])]),
     r"slices\[0\]: passthrough takes exactly one source"),
    (dict(merge_method="passthrough", slices=[dict(sources=[dict(model="a", layer_range=[2, 1])])]),
     r"slices\.0\.sources\.0\.layer_range"),
    (dict(merge_method="linear", models=_models("a", weight=1), dtype="float8"), r"dtype: unsupported dtype 'float8'"),
    (dict(merge_method="linear"), r"exactly one of models or slices"),
    (dict(merge_method="linear", models=_models("a", weight=1), slices=[dict(sources=[dict(model="a", layer_range=[0, 1])])]),
     r"exactly one of models or slices"),
]


@pytest.mark.parametrize("recipe, match", STATIC_ERRORS, ids=lambda x: x if isinstance(x, str) else None)
def test_recipe_errors(recipe, match):
    with pytest.raises(FastmergeError, match=match):
        load_recipe(recipe)


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: [linear\nmodels: -\n")
    with pytest.raises(FastmergeError, match=rf"{re.escape(str(bad))}: invalid YAML"):
        load_recipe(bad)
    with pytest.raises(FastmergeError, match="invalid YAML"):
        load_recipe("merge_method: [linear\nmodels: x\n")
    with pytest.raises(FastmergeError, match=rf"{re.escape(str(tmp_path / 'nope.yaml'))}: recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(FastmergeError, match="a recipe is a mapping"):
        load_recipe("- just\n- a list\n")


def test_plan_errors_name_the_model(fam, tmp_path):
    base, ft0, ft1 = fam
    cases = [
        (dict(merge_method="task_arithmetic", base_model=base,
              models=[dict(model=ft0, parameters=dict(weight=1)), dict(model=ft1)]),
         rf"missing parameter 'weight' for model {re.escape(ft1)}"),
        (dict(merge_method="linear", models=[dict(model=ft0, parameters=dict(weight=1)), dict(model=ft1)]),
         rf"missing parameter 'weight' for model {re.escape(ft1)}"),
        (dict(merge_method="slerp", base_model=base, models=[dict(model=base), dict(model=ft0)]),
         r"missing parameter 't'"),
        (dict(merge_method="linear", slices=[dict(sources=[dict(model=ft0, layer_range=[0, 2]),
                                                           dict(model=ft1, layer_range=[0, 3])])],
              parameters=dict(weight=1)),
         r"slices\[0\]: all sources must span the same number of layers, got \[2, 3\]"),
        (dict(merge_method="passthrough", slices=[dict(sources=[dict(model=ft0, layer_range=[0, 4])]),
                                                  dict(sources=[dict(model=ft1, layer_range=[2, 6])])]),
         rf"slices\[1\]: {re.escape(ft1)}: layer_range \[2, 6\) beyond its 4 layers"),
        (dict(merge_method="task_arithmetic", base_model=base,
              models=[dict(model=ft0, parameters=dict(weight=[0.5, "heavy"]))]),
         r"parameter weight for .*: .*valid number.*'heavy'"),
        (dict(merge_method="linear", models=[dict(model=ft0), dict(model=str(tmp_path / "missing"))],
              parameters=dict(weight=1)),
         rf"{re.escape(str(tmp_path / 'missing'))}: model not found"),
    ]
    for i, (recipe, match) in enumerate(cases):
        out = tmp_path / f"out{i}"
        with pytest.raises(FastmergeError, match=match):
            fastmerge.merge(recipe, out)
        assert not out.exists()
        assert not list(tmp_path.glob(f".out{i}*"))  # no temporary directory left behind
