"""The method registry (fastmerge.methods) is the one place a method is declared: recipe validation,
the plan's routes, the PS search space and the CLI's help all follow it; a torch-route method is
one declaration and merges the same through the streaming engine and ``Merger``."""

from __future__ import annotations

import ctypes
import math
import types
import warnings

import numpy as np
import pytest
import torch

import fastmerge
from fastmerge import cli, cpu, evolve_config, methods
from fastmerge.engine import open_models
from fastmerge.errors import FastmergeError
from fastmerge.merger import Genome, Merger
from fastmerge.methods import Fused, MergeMethod, Param
from fastmerge.plan import build_plan
from fastmerge.recipe import load_recipe
from fastmerge.space import PSSpace

from .test_merge import load_dir


def _ta(base, *models, method="ties", **shared) -> dict:
    return {"merge_method": method, "base_model": str(base), "random_seed": 3, "parameters": shared,
            "models": [{"model": str(m), "parameters": {"weight": 0.5 + 0.25 * i, "density": 0.6}}
                       for i, m in enumerate(models)]}


@pytest.fixture
def register():
    """register(method) for the test; unregistered afterwards, whatever happens."""
    added: list[str] = []

    def add(method: MergeMethod) -> MergeMethod:
        methods.register(method)
        added.append(method.name)
        return method

    yield add
    for name in added:
        methods.unregister(name)


# --- the registry drives the recipe schema ------------------------------------------------------

def test_methods_as_mergekit_declares_them():
    # the fused family and slerp/passthrough first, then the torch-route methods (test_methods_wired)
    assert list(methods.METHODS)[:7] == ["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp",
                                         "passthrough"]
    assert len(methods.METHODS) == 20
    from mergekit.merge_methods import get

    for name, m in methods.METHODS.items():
        theirs = {p.name: p for p in get(name).spec.parameters}
        assert set(theirs) == set(m.param), name
        for p in m.params:
            default = theirs[p.name].default
            if p.default is methods.REQUIRED:
                assert default is not None and not isinstance(default, (bool, int, float)), (name, p.name)
            else:
                assert p.default == default, (name, p.name)
            assert p.per_model == (theirs[p.name].scope.value != "shared"), (name, p.name)


def test_parameter_of_another_method_warns_unknown_name_fails():
    base = dict(merge_method="slerp", base_model="b", models=[dict(model="b"), dict(model="a")],
                parameters=dict(t=0.5))
    with pytest.warns(UserWarning, match=r"parameter 'weight' does not apply to merge_method 'slerp'"):
        load_recipe({**base, "parameters": {"t": 0.5, "weight": 1.0}})
    with pytest.warns(UserWarning, match=r"models\[1\]\.parameters: parameter 'density' does not apply"):
        load_recipe({**base, "models": [dict(model="b"), dict(model="a", parameters=dict(density=0.5))]})
    with pytest.raises(FastmergeError, match=r"unknown parameter 'wieght' for merge_method 'slerp'"):
        load_recipe({**base, "parameters": {"t": 0.5, "wieght": 1.0}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_recipe(base)  # its own parameters: no warning


def test_registered_method_parameters_are_known(register):
    register(MergeMethod("toy_scaled", (Param("gain", "float", 1.0),), base="ignored", inputs=1,
                         merge=lambda tensors, base, params, ctx: tensors[0].float() * params["gain"]))
    r = load_recipe(dict(merge_method="toy_scaled", models=[dict(model="a")], parameters=dict(gain="2e-1")))
    assert r.parameters == {"gain": "2e-1"}
    with pytest.warns(UserWarning, match="'gain' does not apply to merge_method 'linear'"):
        load_recipe(dict(merge_method="linear", models=[dict(model="a", parameters=dict(weight=1))],
                         parameters=dict(gain=2)))


# --- ... the evolve search space and the CLI ----------------------------------------------------

def test_ps_methods_and_sparsifying_follow_the_registry(register):
    assert tuple(evolve_config.PS_METHODS) == ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear")
    assert tuple(evolve_config.SPARSIFYING) == ("ties", "dare_ties", "dare_linear")
    assert "slerp" not in evolve_config.PS_METHODS
    register(MergeMethod("toy_count_ties", methods.ta_params(normalize=True, rescale=False), base="required",
                         fused=Fused("magnitude", "count")))
    assert "toy_count_ties" in evolve_config.PS_METHODS and "toy_count_ties" in evolve_config.SPARSIFYING
    assert PSSpace("toy_count_ties", ["a"], "b", 4).searches_density


def test_cli_help_lists_the_registry(register, capsys):
    register(MergeMethod("toy_help", (Param("gain", "float", 1.0),), base="ignored", inputs=1,
                         merge=lambda tensors, base, params, ctx: tensors[0]))
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["merge", "--help"])
    out = capsys.readouterr().out
    for name in methods.METHODS:
        assert f"  {name} " in out, name
    assert "gain" in out


# --- the plan records each tensor's route -------------------------------------------------------

def test_plan_routes(families):
    base, ft0, ft1 = families("llama")

    def routes(r: dict) -> set[str]:
        recipe = load_recipe(r)
        return {t.route for t in build_plan(recipe, open_models(recipe)).tensors}

    assert routes(_ta(base, ft0, ft1)) == {"fused"}
    assert routes({"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 1}}
                                                        for m in (ft0, ft1)]}) == {"fused"}
    assert routes({"merge_method": "slerp", "base_model": str(base), "parameters": {"t": 0.3},
                   "models": [{"model": str(base)}, {"model": str(ft0)}]}) == {"torch"}
    assert routes({"merge_method": "passthrough", "models": [{"model": str(ft0)}]}) == {"copy"}
    assert routes({"merge_method": "passthrough", "models": [{"model": str(ft0), "parameters": {"scale": 0.5}}]}) \
        == {"torch"}
    assert routes({**_ta(base, ft0), "models": [{"model": str(base)}]}) == {"copy"}  # only the base


# --- a torch-route method is one declaration ----------------------------------------------------

def _toy_merge(tensors, base, params, ctx):
    """base + sum_k w_k (x_k - base) + bias, in fp32 (the executor casts once)."""
    b = base.float()
    out = b.clone()
    for w, x in zip(params["weight"], tensors):
        out += w * (x.float() - b)
    return out + params["bias"] + 0.01 * ctx.position


TOY = MergeMethod("toy_task_sum", (Param("weight", "float", per_model=True), Param("bias", "float", 0.0)),
                  base="required", merge=_toy_merge)


def test_torch_route_method_merges_the_same_on_disk_and_in_memory(families, tmp_path, register):
    register(TOY)
    base, ft0, ft1 = families("llama", torch.bfloat16)
    r = {"merge_method": "toy_task_sum", "base_model": str(base), "parameters": {"bias": [0.0, 0.5]},
         "models": [{"model": str(ft0), "parameters": {"weight": 0.3}},
                    {"model": str(ft1), "parameters": {"weight": [0.2, 0.9]}}]}
    fastmerge.merge(r, tmp_path / "out")
    disk = load_dir(tmp_path / "out")
    mem = Merger(r).module.state_dict()
    src = {p: load_dir(p) for p in (base, ft0, ft1)}
    name = "model.layers.1.mlp.up_proj.weight"  # the last of 2 layers: t = 1
    want = (_toy_merge([src[ft0][name], src[ft1][name]], src[base][name], {"weight": (0.3, 0.9), "bias": 0.5},
                       types.SimpleNamespace(position=1.0))).to(torch.bfloat16)
    assert torch.equal(disk[name], want)
    for k, v in disk.items():
        assert torch.equal(mem[k], v), k


# --- one layer-group rule for Genome and PSSpace ------------------------------------------------

@pytest.mark.parametrize("layers,groups", [(10, 4), (5, 2), (4, 2)])
def test_genome_and_ps_space_put_every_tensor_in_the_same_group(families, layers, groups):
    base, ft0, ft1 = families("llama", layers=layers)
    size = math.ceil(layers / groups)
    space = PSSpace("ties", [str(ft0), str(ft1)], str(base), layers, group_size=size)
    assert space.groups == groups
    rows = [[0.1 * (g + 1), 0.2 * (g + 1)] for g in range(groups)]
    genome = Genome(weights=rows, densities=[0.5, 0.5])
    recipe = load_recipe(space.base_recipe())
    plan = build_plan(recipe, open_models(recipe))
    seen = set()
    for task in plan.tensors:
        if task.fused is None:
            continue
        g = space.group_of(task.name)
        seen.add((task.name.split(".")[-2] if "layers" not in task.name else "layer", g))
        assert genome.options(task, plan.num_layers).weights == tuple(rows[g]), task.name
    assert ("embed_tokens", 0) in seen and ("lm_head", groups - 1) in seen and ("norm", groups - 1) in seen


def test_ps_recipe_remerges_what_merger_scored(families, tmp_path):
    base, ft0, ft1 = families("llama", layers=5)
    space = PSSpace("ties", [str(ft0), str(ft1)], str(base), 5, group_size=2, random_seed=1)
    d = space.decode(np.linspace(0.1, 0.9, space.size))
    mem = Merger(space.base_recipe()).merge(space.candidate(d)).state_dict()
    fastmerge.merge(space.recipe(d), tmp_path / "best")
    for k, v in load_dir(tmp_path / "best").items():
        assert torch.equal(mem[k], v), k


# --- the C struct is checked against its ctypes mirror -------------------------------------------

def test_struct_size_mismatch_refuses_the_c_loop(monkeypatch):
    with pytest.raises(cpu._Unavailable, match="struct definitions disagree"):
        cpu.check_layout(types.SimpleNamespace(fm_params_size=lambda: ctypes.sizeof(cpu._Params) + 8))
    cpu.check_layout(types.SimpleNamespace(fm_params_size=lambda: ctypes.sizeof(cpu._Params)))

    class Short(ctypes.Structure):
        _fields_ = [("n", ctypes.c_int64)]

    monkeypatch.delenv(cpu.NO_C_ENV, raising=False)
    for attr, value in (("_lib", None), ("_failure", None), ("_noticed", False), ("_Params", Short)):
        monkeypatch.setattr(cpu, attr, value)
    with pytest.warns(UserWarning, match=r"fm_params is \d+ bytes but fastmerge\.cpu\._Params is 8"):
        assert not cpu.available()
    with pytest.raises(FastmergeError, match="struct definitions disagree"):
        cpu.library()


def test_executors_decide_the_device_route(register):
    from fastmerge.engine import on_device_runner
    from fastmerge.plan import Source, TensorPlan
    from fastmerge.spec import FusedOptions

    register(MergeMethod("toy_c_only", methods.ta_params(normalize=False, rescale=False), base="required",
                         fused=Fused(), executors=("c",)))
    task = TensorPlan("x", (4,), "F32", "fused", [Source("a", "x")], base=Source("b", "x"),
                      fused=FusedOptions(weights=(1.0,)), method="ties")
    assert on_device_runner(task)
    assert not on_device_runner(TensorPlan(**{**task.__dict__, "method": "toy_c_only"}))
