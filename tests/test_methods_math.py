"""fastmerge.methods_math against mergekit 0.1.5's own implementations, called on the same tensors.

mergekit's methods take a ``TensorGroup`` directly (``merge_methods.get(name)([group], parameters=...)``),
the lowest level at which its parameter binding and math run, so no full merge is needed.
Deterministic methods agree within ATOL (fp32). DELLA's random mask agrees exactly when mergekit's
``torch.bernoulli`` is replaced by our Philox draw, exactly at density 1, and by statistics (keep
rate overall and per magnitude-rank quintile, mean kept |delta|) with mergekit's own bernoulli.
"""

from __future__ import annotations

import pytest
import torch

from fastmerge import methods_math as mm

mergekit_methods = pytest.importorskip("mergekit.merge_methods")
from mergekit.merge_methods.base import MISSING, TensorGroup  # noqa: E402

pytestmark = [pytest.mark.mergekit, pytest.mark.usefixtures("one_thread")]

#: fp32 agreement of the deterministic methods (values are O(1))
ATOL = 1e-6
SHAPES = [(7, 13), (37,), (3, 5, 4)]
MIXED = [0.7, -0.3, 1.2, 0.4, 0.9]  # per-model weights, one of them negative


def family(shape, k: int, seed: int = 0, scale: float = 0.05, sparsity: float = 0.0):
    """A N(0,1) base and k fine-tunes base + N(0, scale^2), a ``sparsity`` fraction of each
    fine-tune's deltas exactly zero."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = []
    for _ in range(k):
        d = scale * torch.randn(shape, generator=g)
        if sparsity:
            d = d * (torch.rand(shape, generator=g) >= sparsity)
        models.append(base + d)
    return base, models


def mergekit(method: str, base, tensors, **params) -> torch.Tensor:
    """mergekit's result for one tensor group (base first, then the models in order)."""
    params = {("lambda" if k == "lambda_" else k): v for k, v in params.items()}
    inputs = ([] if base is None else [base]) + list(tensors)
    group = TensorGroup.from_tensors(inputs, base_index=None if base is None else 0, name="t")
    (out,) = mergekit_methods.get(method)([group], parameters=params)
    return out


def ours(method: str, base, tensors, **params) -> torch.Tensor:
    out = mm.METHODS[method](base, tensors, name=params.pop("name", "t"), **params)
    assert out.dtype == torch.float32 and out.shape == tensors[0].shape
    return out


def assert_agree(method: str, base, tensors, **params) -> float:
    a = ours(method, base, tensors, **params)
    b = mergekit(method, base, tensors, **params)
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    assert diff <= ATOL, f"{method} {params}: max |diff| {diff:.3g}"
    return diff


# ---------------------------------------------------------------------------------------------
# the parameter table is mergekit's
# ---------------------------------------------------------------------------------------------


def test_params_table_is_mergekits():
    """Every parameter mergekit declares for the 13 methods, with its scope, type and default."""
    scope = {"shared": "global", "non_base": "per_model"}
    assert set(mm.PARAMS) == set(mm.METHODS) == set(mm.FUSION)
    for method, table in mm.PARAMS.items():
        spec = mergekit_methods.get(method).spec
        theirs = {p.name: (scope[p.scope.value], p.value_type, mm.REQUIRED if p.default is MISSING else p.default)
                  for p in spec.parameters}
        assert table == theirs, method


def test_every_parameter_is_a_keyword():
    """The functions take mergekit's parameter names (``lambda`` as ``lambda_``) and name/seed."""
    import inspect

    for method, fn in mm.METHODS.items():
        names = set(inspect.signature(fn).parameters)
        for param in mm.PARAMS[method]:
            assert mm.PYARG.get(param, param) in names, (method, param)
        assert {"name", "seed"} <= names


# ---------------------------------------------------------------------------------------------
# breadcrumbs / breadcrumbs_ties (deterministic)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("opts", [
    dict(),  # all defaults (density 1: no sparsification)
    dict(density=[0.6, 0.3, 0.9], gamma=[0.1, 0.02, 0.3], rescale=True, normalize=True, lambda_=0.8),
    dict(density=0.5, gamma=0.6, int8_mask=True),  # gamma + density > 1: outlier removal shrinks
    dict(density=[0.0, 0.2, 0.95], gamma=0.0, rescale=True),
])
def test_breadcrumbs(method, shape, opts):
    base, models = family(shape, 3, seed=1)
    assert_agree(method, base, models, weight=MIXED[:3], **opts)


def test_breadcrumbs_band():
    """The kept band: m = int(density*n) elements just below the int(gamma*n) largest |delta|."""
    d = torch.tensor([5.0, -1.0, 3.0, 0.5, -4.0, 2.0, 0.1, -6.0, 7.0, 0.2])
    keep = mm.breadcrumbs_keep(d, 0.4, 0.2)  # drop 7, -6; keep the next 4: 5, -4, 3, 2
    assert keep.tolist() == [True, False, True, False, True, True, False, False, False, False]
    assert mm.breadcrumbs_keep(d, 1.0, 0.2) is None
    assert mm.breadcrumbs_keep(d, 0.3, 0.9).tolist() == [  # gamma too large: the 3 smallest
        False, False, False, True, False, False, True, False, False, True]


def test_ties_break_by_flat_index():
    """On tied |delta| (quantised deltas, as bf16 fine-tunes give), the breadcrumbs band and the
    SCE selection keep the same number of elements with the same multiset of magnitudes as
    mergekit; which of the equal ones is kept is ours to fix (lowest flat index first, as TIES)."""
    from mergekit.merge_methods.sce import sce_mask
    from mergekit.sparsify import magnitude_outliers

    base, models = family((64, 257), 3, seed=22)
    deltas = [((m - base) * 40).round() / 40 for m in models]
    for d in deltas:
        mine = mm.breadcrumbs_keep(d, 0.3, 0.1)
        # |d| + 1 ranks (and ties) as d does, and no kept element reads as zero
        theirs = magnitude_outliers(d.abs() + 1, 0.3, gamma=0.1) != 0
        assert torch.equal(d.abs()[mine].sort().values, d.abs()[theirs].sort().values)
    tie = mm.breadcrumbs_keep(torch.ones(10), 0.3, 0.2)  # all tied: skip 2, keep the next 3
    assert tie.tolist() == [False, False, True, True, True, False, False, False, False, False]
    tvs = torch.stack(deltas)
    var = torch.var(tvs, dim=0, unbiased=False)
    mine, theirs = mm.sce_select(tvs, 0.3), sce_mask(tvs, 0.3).bool()
    assert torch.equal(var[mine].sort().values, var[theirs].sort().values)
    gamma0 = mm.breadcrumbs_keep(deltas[0], 0.3, 0.0)  # gamma 0 is TIES's top m, ties by index
    order = torch.argsort(deltas[0].reshape(-1).abs(), descending=True, stable=True)
    assert torch.equal(gamma0.reshape(-1).nonzero().squeeze(1).sort().values,
                       order[: int(0.3 * deltas[0].numel())].sort().values)


# ---------------------------------------------------------------------------------------------
# della / della_linear (random: the Philox stream)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("shape", SHAPES)
def test_della_exact_without_randomness(method, shape):
    """density 1 draws nothing: exactly mergekit, whatever epsilon, rescale, normalize, lambda."""
    base, models = family(shape, 3, seed=2)
    assert_agree(method, base, models, weight=MIXED[:3], density=1.0, epsilon=0.4)
    assert_agree(method, base, models, weight=MIXED[:3], density=1.0, epsilon=[0.1, 0.2, 0.3],
                 rescale=False, normalize=not mm.PARAMS[method]["normalize"][2], lambda_=1.5,
                 int8_mask=True)


def _philox_bernoulli(monkeypatch, seed: int, name: str):
    """Replace torch.bernoulli (mergekit's MAGPRUNE draw) by our keep_k = U_k < p, model k being
    the k-th call: then mergekit's DELLA must equal ours exactly."""
    calls = []

    def bernoulli(probs, *args, **kwargs):
        k = len(calls)
        calls.append(k)
        u = mm.uniforms(seed, name, k, probs.numel()).reshape(probs.shape)
        return (u < probs).to(probs.dtype)

    monkeypatch.setattr(torch, "bernoulli", bernoulli)
    return calls


@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("opts", [
    dict(density=0.5),  # default epsilon 0.15, rescale on
    dict(density=[0.3, 0.6, 0.8], epsilon=[0.2, 0.05, 0.15], rescale=False, lambda_=0.7, int8_mask=True),
    dict(density=0.4, epsilon=0.35, normalize=True, rescale=True),
])
def test_della_exact_with_philox_draws(monkeypatch, method, shape, opts):
    base, models = family(shape, 3, seed=3)
    expected = ours(method, base, models, weight=MIXED[:3], seed=11, name="layer.w", **opts)
    calls = _philox_bernoulli(monkeypatch, 11, "layer.w")
    theirs = mergekit(method, base, models, weight=MIXED[:3], **opts)
    assert len(calls) == 3
    assert float((expected - theirs).abs().max()) <= ATOL


def test_della_statistics_against_mergekits_bernoulli():
    """With mergekit's own torch.bernoulli: the keep rate (overall and per |delta|-rank quintile)
    and the mean kept |delta| agree within binomial noise (4 sigma)."""
    rows, cols, density, eps = 60, 320, 0.4, 0.2
    base, (model,) = family((rows, cols), 1, seed=4)
    delta = model - base
    params = dict(weight=[1.0], density=[density], epsilon=[eps], rescale=False)
    mine = (ours("della_linear", base, [model], seed=5, **params) - base) != 0
    torch.manual_seed(0)
    theirs = (mergekit("della_linear", base, [model], **params) - base) != 0
    n = rows * cols
    sigma = (density * (1 - density) / n) ** 0.5
    assert abs(mine.float().mean() - density) < 4 * sigma
    assert abs(theirs.float().mean() - density) < 4 * sigma
    rank = delta.abs().argsort(dim=1).argsort(dim=1)  # per-row rank, as MAGPRUNE ranks
    for q in range(5):
        band = (rank * 5 // cols) == q
        p = density - eps + 2 * eps * (q + 0.5) / 5  # ~ mean keep probability of the band
        s = (2 * p * (1 - p) / int(band.sum())) ** 0.5
        assert abs(float(mine[band].float().mean() - theirs[band].float().mean())) < 4 * s, q
    kept_mine = float(delta.abs()[mine].mean())
    kept_theirs = float(delta.abs()[theirs].mean())
    assert abs(kept_mine / kept_theirs - 1) < 0.03


def test_della_is_a_function_of_seed_and_name():
    base, models = family((9, 11), 5, seed=6)  # 5 models: the second Philox group (k = 4)
    run = dict(weight=MIXED, density=0.5, epsilon=0.1)
    a = mm.della(base, models, name="a", seed=1, **run)
    assert torch.equal(a, mm.della(base, models, name="a", seed=1, **run))
    assert not torch.equal(a, mm.della(base, models, name="b", seed=1, **run))
    assert not torch.equal(a, mm.della(base, models, name="a", seed=2, **run))


def test_della_probabilities_and_errors():
    d = torch.tensor([[0.1, -3.0, 2.0], [5.0, 0.0, -1.0]])
    p = mm.della_probabilities(d, 0.5, 0.2)
    torch.testing.assert_close(p, torch.tensor([[0.3, 0.7, 0.5], [0.7, 0.3, 0.5]]))
    assert torch.equal(mm.della_probabilities(torch.tensor([[2.0], [1.0]]), 0.5, 0.2), torch.full((2, 1), 0.5))
    with pytest.raises(ValueError, match="epsilon"):
        mm.della(d, [d + 1], weight=1.0, density=0.1, epsilon=0.15, name="x")
    assert torch.equal(mm.della_linear(d, [d + 1], weight=1.0, density=0.0, name="x"), d)


# ---------------------------------------------------------------------------------------------
# sce, model_stock (deterministic)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("opts", [dict(), dict(select_topk=0.3), dict(select_topk=0.75, int8_mask=True),
                                  dict(select_topk=0.0)])
@pytest.mark.parametrize("k", [1, 3])
def test_sce(shape, opts, k):
    base, models = family(shape, k, seed=7)
    assert_agree("sce", base, models, **opts)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("k", [2, 3])
def test_model_stock(shape, filter_wise, k):
    base, models = family(shape, k, seed=8)
    assert_agree("model_stock", base, models, filter_wise=filter_wise)


def test_model_stock_singular_keeps_base():
    """Opposite task vectors (cos = -1, K = 2): 1 + cos = 0, no estimate, the base stays."""
    base, (m,) = family((4, 6), 1, seed=9)
    other = 2 * base - m
    assert_agree("model_stock", base, [m, other])
    assert torch.equal(mm.model_stock(base, [m, other]), base)


# ---------------------------------------------------------------------------------------------
# nuslerp, multislerp, karcher (deterministic)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("opts", [
    dict(weight=[0.3, 0.9]),
    dict(weight=[1.0, -1.0]),  # weights summing to 0: t = 0.5
    dict(weight=[0.6, 0.2], nuslerp_flatten=False),
    dict(weight=[0.6, 0.2], nuslerp_flatten=False, nuslerp_row_wise=True),
    dict(weight=[0.6, 0.2], nuslerp_row_wise=True),  # flatten wins
])
def test_nuslerp(shape, with_base, opts):
    base, models = family(shape, 2, seed=10, scale=0.5)
    assert_agree("nuslerp", base if with_base else None, models, **opts)


def test_nuslerp_colinear_is_linear():
    base, (m,) = family((5, 3), 1, seed=11)
    assert_agree("nuslerp", base, [m, base + 3 * (m - base)], weight=[0.25, 0.75])
    assert_agree("nuslerp", None, [m, 2 * m], weight=[0.25, 0.75], nuslerp_flatten=False)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("opts", [
    dict(),
    dict(normalize_weights=False),
    dict(eps=1e-3),
])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_multislerp(shape, with_base, opts, k):
    base, models = family(shape, k, seed=12, scale=0.5)
    assert_agree("multislerp", base if with_base else None, models, weight=[0.5, 0.2, 0.9][:k], **opts)


def test_multislerp_antipodal():
    base, (m,) = family((6,), 1, seed=13)
    anti = 2 * base - m
    assert_agree("multislerp", base, [m, anti], weight=[1.0, 1.0])  # linear fallback
    for fn in (mm.METHODS["multislerp"], lambda *a, **kw: mergekit("multislerp", *a, **kw)):
        with pytest.raises(ValueError, match="zero"):
            fn(base, [m, anti, m], weight=[1.0, 1.0, 0.0])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("opts", [dict(), dict(max_iter=2), dict(tol=1e-2), dict(max_iter=0)])
@pytest.mark.parametrize("k", [2, 3])
def test_karcher(shape, opts, k):
    _, models = family(shape, k, seed=14, scale=1.0)
    assert_agree("karcher", None, models, **opts)


def test_karcher_base_is_one_more_input():
    """mergekit feeds the base as an ordinary input (appended after the models when the recipe's
    models list does not name it); a zero input steers nothing but counts in the mean norm."""
    base, models = family((4, 5), 2, seed=15, scale=1.0)
    ref = mergekit("karcher", None, [*models, base])
    assert float((mm.karcher(base, models) - ref).abs().max()) <= ATOL
    assert_agree("karcher", None, [models[0], torch.zeros(4, 5), models[1]])
    assert_agree("karcher", None, [torch.zeros(3), torch.zeros(3)])


# ---------------------------------------------------------------------------------------------
# nearswap, arcee_fusion, ram, ramplus_tl (deterministic)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.01, 0.05, 1.0])
def test_nearswap(shape, t):
    base, models = family(shape, 1, seed=16)
    assert_agree("nearswap", base, models, t=t)


@pytest.mark.parametrize("shape", [*SHAPES, (1,), (64, 257)])
def test_arcee_fusion(shape):
    base, models = family(shape, 1, seed=17, scale=0.3)
    assert_agree("arcee_fusion", base, models)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("opts", [dict(), dict(epsilon=0.03)])
def test_ram(shape, k, opts):
    base, models = family(shape, k, seed=18, sparsity=0.5)
    assert_agree("ram", base, models, **opts)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("opts", [dict(), dict(r=0.5, alpha=0.7), dict(epsilon=0.03, r=1.0, alpha=5.0)])
def test_ramplus_tl(shape, k, opts):
    base, models = family(shape, k, seed=19, sparsity=0.6)
    assert_agree("ramplus_tl", base, models, **opts)


def test_ramplus_tl_without_unique_elements():
    """No unique elements in a model: rho = shared / epsilon, clamped to alpha."""
    base, (m,) = family((3, 4), 1, seed=20)
    assert_agree("ramplus_tl", base, [m, m + 0.01], r=0.3, alpha=0.5)


# ---------------------------------------------------------------------------------------------
# dtypes: upcast on entry, fp32 out
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(mm.METHODS))
def test_bf16_inputs_compute_in_fp32(method):
    base, models = family((6, 10), 2, seed=21, sparsity=0.3)
    params = {"nearswap": dict(t=0.02)}.get(method, {})
    if "weight" in mm.PARAMS[method]:
        params["weight"] = [0.6, 0.4]
    if method in ("nearswap", "arcee_fusion"):
        models = models[:1]
    low = mm.METHODS[method](base.bfloat16(), [m.bfloat16() for m in models], name="t", **params)
    high = mm.METHODS[method](base.bfloat16().float(), [m.bfloat16().float() for m in models], name="t", **params)
    assert low.dtype == torch.float32
    assert torch.equal(low, high)


def test_arcee_fusion_exact_quantiles_on_large_tensors():
    """Above 10**6 elements mergekit estimates the quantiles from a random sample; ours are exact.
    The kept sets then differ only near the threshold: kept fractions within 0.002, and where
    both keep (or both drop) an element the outputs agree."""
    base, (model,) = family((1001, 1000), 1, seed=23, scale=0.3)
    mine = ours("arcee_fusion", base, [model])
    torch.manual_seed(0)
    theirs = mergekit("arcee_fusion", base, [model])
    kept_mine, kept_theirs = mine != base, theirs != base
    assert 0.01 < float(kept_mine.float().mean()) < 0.5
    assert abs(float(kept_mine.float().mean() - kept_theirs.float().mean())) < 0.002
    same = kept_mine == kept_theirs
    assert float((mine - theirs)[same].abs().max()) <= ATOL


# ---------------------------------------------------------------------------------------------
# through a whole mergekit merge: recipe-level binding and input order
# ---------------------------------------------------------------------------------------------


def _checkpoint(path) -> dict[str, torch.Tensor]:
    from pathlib import Path

    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def tiny(families):
    """A tiny fp32 Llama base and three fine-tunes (paths, then their state dicts)."""
    paths = [str(p) for p in families(finetunes=3, hidden=32, layers=1, vocab=64)]
    return paths, [_checkpoint(p) for p in paths]


@pytest.mark.parametrize("case", ["karcher", "karcher_base_listed", "model_stock", "della_linear", "sce"])
def test_whole_merge_matches_per_tensor_math(tiny, tmp_path, case):
    """mergekit.run_merge on a tiny model family, against the per-tensor functions called with the
    recipe's inputs: karcher takes the base as one more input (listed or not; mergekit appends an
    unlisted base after the models -- the order only changes rounding and the antipodal
    fallback), per-model parameters bind in recipe order, global ones (``lambda``) by name."""
    import copy

    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    (base, *fts), (sb, *sfts) = tiny
    models = [dict(model=p) for p in fts]
    if case == "karcher":
        recipe = dict(merge_method="karcher", base_model=base, models=models[:2], parameters=dict(max_iter=3))
        per_tensor = lambda n: mm.karcher(sb[n], [s[n] for s in sfts[:2]], max_iter=3)  # noqa: E731
    elif case == "karcher_base_listed":
        recipe = dict(merge_method="karcher", base_model=base, models=[models[1], dict(model=base), models[0]])
        per_tensor = lambda n: mm.karcher(None, [sfts[1][n], sb[n], sfts[0][n]])  # noqa: E731
    elif case == "model_stock":
        recipe = dict(merge_method="model_stock", base_model=base, models=models, parameters=dict(filter_wise=True))
        per_tensor = lambda n: mm.model_stock(sb[n], [s[n] for s in sfts], filter_wise=True)  # noqa: E731
    elif case == "della_linear":
        ms = [dict(model=p, parameters=dict(weight=w, density=1.0, epsilon=e))
              for p, w, e in zip(fts, [0.5, -0.2, 0.9], [0.1, 0.2, 0.3])]
        recipe = dict(merge_method="della_linear", base_model=base, models=ms,
                      parameters={"normalize": True, "lambda": 0.8})
        per_tensor = lambda n: mm.della_linear(sb[n], [s[n] for s in sfts], weight=[0.5, -0.2, 0.9],  # noqa: E731
                                               density=1.0, epsilon=[0.1, 0.2, 0.3], normalize=True,
                                               lambda_=0.8, name=n)
    else:
        recipe = dict(merge_method="sce", base_model=base, models=models, parameters=dict(select_topk=0.4))
        per_tensor = lambda n: mm.sce(sb[n], [s[n] for s in sfts], select_topk=0.4)  # noqa: E731
    recipe["dtype"] = "float32"
    run_merge(MergeConfiguration.model_validate(copy.deepcopy(recipe)), str(tmp_path / "out"),
              MergeOptions(device="cpu", quiet=True, copy_tokenizer=False, write_model_card=False))
    merged = _checkpoint(tmp_path / "out")
    assert sorted(merged) == sorted(sb)
    for name, want in merged.items():
        got = per_tensor(name)
        assert float((got - want).abs().max()) <= ATOL, name
