"""Pure-torch math of mergekit's remaining merge methods, one tensor at a time (issue 15, part 2).

Each function takes one tensor's inputs -- the base (``None`` where a method allows no base) and
the non-base models' tensors in recipe order -- then mergekit's parameters under mergekit's own
names (``lambda`` is spelled ``lambda_``; see ``PYARG``), then ``name``/``seed``. Per-model
parameters take one value per non-base model or a scalar that applies to all. Every function
upcasts to fp32 on entry and returns fp32; the caller casts once to the output dtype.

The functions reproduce the semantics of mergekit 0.1.5's ``merge_methods`` (read, not copied),
with two kinds of deliberate difference, both documented where they occur:

* Where mergekit draws random numbers (``torch.bernoulli`` in DELLA's MAGPRUNE), we draw from the
  counter-based Philox stream of DESIGN.md section 3 (``fastmerge.rng``): keep_k(j) = U_k(j) < p_k(j),
  so a merge is a pure function of (data, seed, tensor name), like our DARE masks.
* Where mergekit breaks ties by an unspecified sort order, we break them by flat index (a stable
  sort), and where mergekit samples to estimate a statistic (arcee_fusion's quantiles on tensors of
  more than 10**6 elements) we compute it exactly.

``PARAMS`` documents every parameter mergekit declares for these methods with its default, and
``FUSION`` says for each method whether it can join a fused one-pass family.

The sparsifying methods (breadcrumbs, breadcrumbs_ties, della, della_linear, sce) run their
pre-passes and combine in the C loop where it is available (``fastmerge.sparsify_cpu``: the same
bits, without model-sized temporaries); the torch code here is their fallback, and
tests/methods_math_before.py freezes it as it was before, the reference of the bit-identity tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from . import rng
from .spec import l1_scale

#: placeholder default of a parameter that mergekit requires (no default)
REQUIRED = object()

#: recipe parameter name -> Python keyword, where the recipe name is a Python keyword
PYARG = {"lambda": "lambda_"}

PerModel = float | Sequence[float]


def _gta_params(normalize: bool, rescale: bool, extra: dict | None = None) -> dict:
    params = {
        "int8_mask": ("global", bool, False),
        "normalize": ("global", bool, normalize),
        "rescale": ("global", bool, rescale),
        "lambda": ("global", float, 1.0),
        "weight": ("per_model", float, REQUIRED),
        "density": ("per_model", float, 1.0),
    }
    params.update(extra or {})
    return params


_GAMMA = {"gamma": ("per_model", float, 0.01)}
_EPSILON = {"epsilon": ("per_model", float, 0.15)}

#: method -> {parameter: (kind "global" | "per_model", type, default or REQUIRED)}, as mergekit
#: 0.1.5 declares them (its ``MergeMethodSpec.parameters``: SHARED -> global, NON_BASE -> per_model).
PARAMS: dict[str, dict[str, tuple[str, type, object]]] = {
    "breadcrumbs": _gta_params(normalize=False, rescale=False, extra=_GAMMA),
    "breadcrumbs_ties": _gta_params(normalize=False, rescale=False, extra=_GAMMA),
    "della": _gta_params(normalize=True, rescale=True, extra=_EPSILON),
    "della_linear": _gta_params(normalize=False, rescale=True, extra=_EPSILON),
    "sce": {"int8_mask": ("global", bool, False), "select_topk": ("global", float, 1.0)},
    "model_stock": {"filter_wise": ("global", bool, False)},
    "nuslerp": {
        "weight": ("per_model", float, REQUIRED),
        "nuslerp_row_wise": ("global", bool, False),
        "nuslerp_flatten": ("global", bool, True),
    },
    "multislerp": {
        "weight": ("per_model", float, REQUIRED),
        "normalize_weights": ("global", bool, True),
        "eps": ("global", float, 1e-8),
    },
    "karcher": {"max_iter": ("global", int, 10), "tol": ("global", float, 1e-5)},
    "nearswap": {"t": ("global", float, REQUIRED)},
    "arcee_fusion": {},
    "ram": {"epsilon": ("global", float, 1e-5)},
    "ramplus_tl": {
        "r": ("global", float, 0.1),
        "alpha": ("global", float, 0.2),
        "epsilon": ("global", float, 1e-5),
    },
}

#: How each method could run in a fused, streaming engine. "one-pass": elementwise over the K
#: models' values at one element (the fused task-arithmetic loop can take it as is);
#: "pre-pass": elementwise after per-tensor (or per-row) statistics computed in a first pass over
#: the tensor -- the shape of TIES's magnitude threshold, so it can join the fused family with a
#: statistics pass first; "whole-tensor": needs global vector geometry (norms, angles, iterations)
#: of whole tensors before any output element is known.
FUSION: dict[str, str] = {
    # two |delta| order statistics per model (the n_bot-th and (n_bot+m)-th smallest), then a band
    # mask; plus the l1 sums when rescale is on -- TIES's threshold pass with a second threshold
    # (sparsify_cpu: numpy.partition of the |delta| keys, one band pass, one combine pass)
    "breadcrumbs": "pre-pass",
    "breadcrumbs_ties": "pre-pass",
    # per-row rank of |delta| (a per-row sort), then a Philox draw per element against a
    # rank-dependent probability; the l1 rescale needs the kept sum (a second reduction)
    # (sparsify_cpu: one row pass -- radix ranks, Philox, keep bits, l1 sums -- then one combine)
    "della": "pre-pass",
    "della_linear": "pre-pass",
    # per-model mean square of the (top-k-selected) task vectors and, for select_topk < 1, the
    # k-th largest cross-model variance; the rest is elementwise
    "sce": "pre-pass",
    # per tensor (or per row): pairwise cosines of the task vectors
    "model_stock": "whole-tensor",
    "nuslerp": "whole-tensor",
    "multislerp": "whole-tensor",
    # an iterative Karcher mean on the sphere of whole flattened tensors
    "karcher": "whole-tensor",
    # purely elementwise on (base, model)
    "nearswap": "one-pass",
    # per-row softmax KL, then three quantiles of the importance over the whole tensor
    "arcee_fusion": "whole-tensor",
    # elementwise: the count of models with |delta| > epsilon at the element
    "ram": "one-pass",
    # per-model counts of shared / unique elements over the tensor, then elementwise
    "ramplus_tl": "pre-pass",
}


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32)


def _per_model(value: PerModel, k: int, what: str) -> list[float]:
    """A per-model parameter: one value per non-base model, or one scalar for all of them."""
    if isinstance(value, (int, float)):
        return [float(value)] * k
    values = [float(v) for v in value]
    if len(values) != k:
        raise ValueError(f"{what}: expected {k} values (one per non-base model), got {len(values)}")
    return values


def uniforms(seed: int, name: str, k: int, numel: int) -> torch.Tensor:
    """U_k(j) for every element j of a tensor (DESIGN.md s.3): Philox per 2**31-element chunk,
    exactly as the DARE masks of the reference draw them -- by the C loop's vectorized Philox, or
    where it is unavailable by the numpy twin's (``cpu._np_philox``) in pieces; the same bits as
    ``uniforms_reference`` (``rng.uniforms`` over the whole tensor in int64)."""
    import numpy as np

    from . import cpu, sparsify_cpu

    out = np.empty(numel, dtype=np.float32)
    for c, (s, e) in enumerate(rng.chunks(numel)):
        cname = rng.chunk_name(name, c, numel)
        if not sparsify_cpu.uniforms_into(out[s:e], seed, cname, k, 0):
            key = rng.group_seed(seed, cname, k // rng.MODELS_PER_CALL)
            for a in range(s, e, UNIFORM_PIECE):
                b = min(e, a + UNIFORM_PIECE)
                out[a:b] = cpu._np_philox(key, a - s, b - a)[k % rng.MODELS_PER_CALL]
    return torch.from_numpy(out)


#: elements per numpy Philox piece (its uint64 temporaries stay small)
UNIFORM_PIECE = 1 << 16


def uniforms_reference(seed: int, name: str, k: int, numel: int) -> torch.Tensor:
    """``uniforms`` as first written: ``rng.uniforms`` (uint32 emulated in int64 by torch) over the
    whole tensor; the reference of the bit-identity tests."""
    parts = []
    for c, (s, e) in enumerate(rng.chunks(numel)):
        index = torch.arange(e - s, dtype=torch.int64)
        parts.append(rng.uniforms(seed, rng.chunk_name(name, c, numel), k, index))
    return torch.cat(parts)


def _l1_rescaled(delta: torch.Tensor, keep: torch.Tensor, rescale: bool) -> torch.Tensor:
    """Kept values, scaled so the l1 norm of the tensor is preserved (mergekit's ``RescaleNorm.l1``,
    with its 1e-7 guard); the l1 sums are taken in fp64 as in the reference DARE path."""
    masked = torch.where(keep, delta, torch.zeros((), dtype=delta.dtype))
    if not rescale:
        return masked
    a = delta.abs().double()
    scale = l1_scale(float(a.sum()), float(a[keep].sum()))
    return masked if scale == 1.0 else masked * scale


def _combine(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    weights: list[float],
    consensus: bool,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor:
    """Weighted (TIES sum-consensus when ``consensus``) combination of sparsified task vectors:
    mergekit's GeneralizedTaskArithmeticMerge after sparsification (DESIGN.md s.3, from v_k on)."""
    stacked = torch.stack(deltas)
    w = torch.tensor(weights, dtype=torch.float32).reshape(-1, *([1] * base.dim()))
    v = stacked * w
    if consensus:
        majority = torch.where(v.sum(dim=0) >= 0, 1.0, -1.0)
        agree = (torch.sign(v) == majority).to(torch.float32)  # a zero v_k never agrees
        mixed = (v * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor = torch.where(divisor == 0, torch.ones(()), divisor)
    else:
        mixed = v.sum(dim=0)
        divisor = w.sum(dim=0).expand_as(mixed)
        divisor = torch.where(divisor.abs() < 1e-8, torch.ones(()), divisor)
    if normalize:
        mixed = mixed / divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return base + mixed


# ---------------------------------------------------------------------------------------------
# Model Breadcrumbs (https://arxiv.org/abs/2312.06795)
# ---------------------------------------------------------------------------------------------


def breadcrumbs_keep(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor | None:
    """The breadcrumbs band of one task vector: drop the ``gamma`` fraction of largest |delta|
    (outliers) and the smallest, keeping m = int(density*n) elements; ``None`` at density >= 1.

    As mergekit's ``magnitude_outliers``: n_top = int(gamma*n) outliers go first, but never so many
    that fewer than m remain (then the band is the m smallest). Elements are ranked by |delta|
    descending, equal |delta| by ascending flat index -- the tie rule of our TIES threshold
    (DESIGN.md s.3), so gamma = 0 keeps exactly what TIES keeps; mergekit's sort leaves the order
    of ties unspecified, so on tied magnitudes the two may keep different (equal-|delta|) elements.
    """
    if density >= 1:
        return None
    n = delta.numel()
    m = int(density * n)
    start = min(int(gamma * n), n - m)  # outliers skipped: mergekit's n - n_bot - m
    order = torch.argsort(delta.reshape(-1).abs(), descending=True, stable=True)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[start:start + m]] = True
    return keep.reshape(delta.shape)


def _breadcrumbs(base, tensors, consensus, weight, density, gamma, rescale, normalize, lambda_):
    k = len(tensors)
    if tensors:
        from . import sparsify_cpu

        out = sparsify_cpu.breadcrumbs(base, tensors, consensus, _per_model(weight, k, "weight"),
                                       _per_model(density, k, "density"), _per_model(gamma, k, "gamma"),
                                       rescale, normalize, lambda_)
        if out is not None:
            return out
    return _breadcrumbs_reference(base, tensors, consensus, weight, density, gamma, rescale, normalize, lambda_)


def _breadcrumbs_reference(base, tensors, consensus, weight, density, gamma, rescale, normalize, lambda_):
    """breadcrumbs in pure torch (a full argsort per model): the fallback where
    ``sparsify_cpu.breadcrumbs`` does not apply (no C loop, more than 8 models)."""
    b = _f32(base)
    k = len(tensors)
    weights = _per_model(weight, k, "weight")
    densities = _per_model(density, k, "density")
    gammas = _per_model(gamma, k, "gamma")
    if not tensors:
        return b
    deltas = []
    for t, rho, g in zip(tensors, densities, gammas):
        d = _f32(t) - b
        keep = breadcrumbs_keep(d, rho, g)
        deltas.append(d if keep is None else _l1_rescaled(d, keep, rescale))
    return _combine(b, deltas, weights, consensus, normalize, lambda_)


def breadcrumbs(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    weight: PerModel,
    density: PerModel = 1.0,
    gamma: PerModel = 0.01,
    rescale: bool = False,
    normalize: bool = False,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    name: str = "",
    seed: int = 0,
) -> torch.Tensor:
    """Task arithmetic over breadcrumbs-sparsified deltas (no sign consensus).

    ``int8_mask`` only picks the dtype of mergekit's consensus mask (no numerical effect);
    ``name``/``seed`` are unused (the method is deterministic)."""
    return _breadcrumbs(base, tensors, False, weight, density, gamma, rescale, normalize, lambda_)


def breadcrumbs_ties(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    weight: PerModel,
    density: PerModel = 1.0,
    gamma: PerModel = 0.01,
    rescale: bool = False,
    normalize: bool = False,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    name: str = "",
    seed: int = 0,
) -> torch.Tensor:
    """Breadcrumbs sparsification, then TIES sum-consensus (mergekit's ``breadcrumbs_ties``:
    normalize defaults off here, unlike ``ties``)."""
    return _breadcrumbs(base, tensors, True, weight, density, gamma, rescale, normalize, lambda_)


# ---------------------------------------------------------------------------------------------
# DELLA (https://arxiv.org/abs/2406.11617): MAGPRUNE, magnitude-ranked drop probabilities
# ---------------------------------------------------------------------------------------------


def della_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Keep probability of each element: density - eps + 2*eps * r, r in [0, 1] the normalised
    rank of |delta| along dim 1 (each row; a 1-D tensor is one row), as mergekit ranks them.

    The paper's MAGPRUNE (p_i = p_min + (eps / n) * r_i, a spread of eps) as mergekit spells it:
    centred on ``density`` with a spread of 2 * eps, ranks per row rather than per tensor. Ties
    get distinct ranks by flat position (stable sort; mergekit's argsort leaves them unspecified). A row of one element has no rank spread (mergekit divides
    0 by 0 there); it gets the midpoint, p = density.
    """
    x = delta.unsqueeze(0) if delta.dim() < 2 else delta
    order = torch.argsort(x.abs(), dim=1, stable=True)
    # the ranks 0 .. m-1: the inverse permutation of ``order`` (what a second argsort computed)
    positions = torch.arange(x.shape[1]).reshape(1, -1, *([1] * (x.dim() - 2))).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, positions)
    ranks = ranks.to(torch.float32)
    m = x.shape[1]
    if m == 1:
        r = torch.full_like(ranks, 0.5)
    else:
        r = (ranks / float(m - 1)).clamp(0, 1)
    probs = (density - epsilon) + r * 2 * epsilon
    return probs.reshape(delta.shape)


def della_keep(delta: torch.Tensor, density: float, epsilon: float, *, name: str, seed: int, k: int
               ) -> torch.Tensor | None:
    """MAGPRUNE mask of model k: keep_k(j) = U_k(j) < p_k(j) (Philox, DESIGN.md s.3) where mergekit
    draws ``torch.bernoulli(p)``; ``None`` at density >= 1 (untouched, not rescaled)."""
    if density >= 1:
        return None
    if density <= 0:
        return torch.zeros(delta.shape, dtype=torch.bool)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError("della: epsilon must be chosen such that density +/- epsilon is in (0, 1)")
    probs = della_probabilities(delta, density, epsilon).reshape(-1)
    u = uniforms(seed, name, k, delta.numel())
    return (u < probs).reshape(delta.shape)


def _della(base, tensors, consensus, weight, density, epsilon, rescale, normalize, lambda_, name, seed):
    k = len(tensors)
    if tensors:
        from . import sparsify_cpu

        out = sparsify_cpu.della(base, tensors, consensus, _per_model(weight, k, "weight"),
                                 _per_model(density, k, "density"), _per_model(epsilon, k, "epsilon"),
                                 rescale, normalize, lambda_, name, seed)
        if out is not None:
            return out
    return _della_reference(base, tensors, consensus, weight, density, epsilon, rescale, normalize, lambda_,
                            name, seed)


def _della_reference(base, tensors, consensus, weight, density, epsilon, rescale, normalize, lambda_, name, seed):
    """DELLA in torch over whole tensors: the fallback where ``sparsify_cpu.della`` does not apply
    (no C loop, more than 8 models, a tensor of 3+ dims). tests/methods_math_before.py keeps the
    version before the C path, which the bit-identity tests hold both to."""
    b = _f32(base)
    k = len(tensors)
    weights = _per_model(weight, k, "weight")
    densities = _per_model(density, k, "density")
    epsilons = _per_model(epsilon, k, "epsilon")
    if not tensors:
        return b
    deltas = []
    for i, (t, rho, eps) in enumerate(zip(tensors, densities, epsilons)):
        d = _f32(t) - b
        keep = della_keep(d, rho, eps, name=name, seed=seed, k=i)
        deltas.append(d if keep is None else _l1_rescaled(d, keep, rescale))
    return _combine(b, deltas, weights, consensus, normalize, lambda_)


def della(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    weight: PerModel,
    density: PerModel = 1.0,
    epsilon: PerModel = 0.15,
    rescale: bool = True,
    normalize: bool = True,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    name: str,
    seed: int = 0,
) -> torch.Tensor:
    """DELLA: MAGPRUNE sparsification, l1 rescale (mergekit's; the paper rescales by 1/p_i),
    then TIES sum-consensus with weight normalisation. Random: a pure function of the inputs,
    ``seed`` and the tensor ``name`` (model k draws U_k)."""
    return _della(base, tensors, True, weight, density, epsilon, rescale, normalize, lambda_, name, seed)


def della_linear(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    weight: PerModel,
    density: PerModel = 1.0,
    epsilon: PerModel = 0.15,
    rescale: bool = True,
    normalize: bool = False,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    name: str,
    seed: int = 0,
) -> torch.Tensor:
    """DELLA without sign consensus (plain weighted sum of the MAGPRUNE'd deltas)."""
    return _della(base, tensors, False, weight, density, epsilon, rescale, normalize, lambda_, name, seed)


# ---------------------------------------------------------------------------------------------
# SCE (https://arxiv.org/abs/2408.07990): Select, Calculate, Erase
# ---------------------------------------------------------------------------------------------


def sce_select(task_vectors: torch.Tensor, select_topk: float) -> torch.Tensor:
    """Select: the elements of highest cross-model variance (population variance over models),
    int(select_topk * #nonzero-variance) of them; ties by flat index (mergekit's topk leaves the
    order unspecified)."""
    shape = task_vectors.shape[1:]
    if select_topk <= 0:
        return torch.zeros(shape, dtype=torch.bool)
    if select_topk >= 1:
        return torch.ones(shape, dtype=torch.bool)
    from . import sparsify_cpu

    var = sparsify_cpu.var_models(task_vectors)
    if var is None:
        var = torch.var(task_vectors, dim=0, unbiased=False)
    var = var.reshape(-1)
    m = int(int(torch.count_nonzero(var)) * select_topk)
    if m > 0:
        fast = sparsify_cpu.top_mask(var, m)
        if fast is not None:
            return fast.reshape(shape)
    keep = torch.zeros(var.numel(), dtype=torch.bool)
    if m > 0:
        keep[torch.argsort(var.abs(), descending=True, stable=True)[:m]] = True
    return keep.reshape(shape)


def sce(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    select_topk: float = 1.0,
    int8_mask: bool = False,
    name: str = "",
    seed: int = 0,
) -> torch.Tensor:
    """SCE: select high-variance elements, weight each model by the mean square of its selected
    task vector (Calculate; uniform 1/K when all are ~0), erase elements whose sign disagrees with
    the sum's, and average the rest by those weights. No user weights, as in mergekit.
    Deterministic: ``int8_mask`` (mask dtype only), ``name`` and ``seed`` have no effect."""
    b = _f32(base)
    if not tensors:
        return b
    tvs = torch.empty((len(tensors), *b.shape), dtype=torch.float32)
    for i, t in enumerate(tensors):  # the stack of the task vectors, without a second copy
        torch.sub(_f32(t), b, out=tvs[i])
    if select_topk < 1:
        tvs.mul_(sce_select(tvs, select_topk).to(torch.float32))
    energy = tvs.square().reshape(len(tensors), -1).mean(dim=1)
    total = float(energy.sum())
    w = torch.full_like(energy, 1.0 / len(tensors)) if abs(total) < 1e-6 else energy / total
    from . import sparsify_cpu

    fast = sparsify_cpu.sce_combine(tvs, w, b)
    if fast is not None:
        return fast
    majority = torch.where(tvs.sum(dim=0) >= 0, 1.0, -1.0)
    agree = (torch.sign(tvs) == majority).to(torch.float32)
    w = w.reshape(-1, *([1] * b.dim())) * agree
    return b + (tvs * w).sum(dim=0) / w.sum(dim=0).clamp(min=1e-6)


# ---------------------------------------------------------------------------------------------
# Model Stock (https://arxiv.org/abs/2403.19522)
# ---------------------------------------------------------------------------------------------


def model_stock(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    filter_wise: bool = False,
    name: str = "",
    seed: int = 0,
) -> torch.Tensor:
    """Interpolate between the base and the models' average by t = K cos / (1 + (K-1) cos), cos
    the mean pairwise cosine of the task vectors (whole tensor, or each row of the last dim when
    ``filter_wise``). Needs 2+ models. Where 1 + (K-1) cos ~ 0 (|.| < 1e-6) there is no finite
    estimate and the base is kept (t = 0), as mergekit does."""
    if len(tensors) < 2:
        raise ValueError("model_stock needs a base and at least two models")
    b = _f32(base)
    shape = b.shape
    if filter_wise:
        w0 = b.unsqueeze(0) if b.dim() == 1 else b
        ws = [_f32(t).reshape(w0.shape) for t in tensors]
    else:
        w0 = b.reshape(-1)
        ws = [_f32(t).reshape(-1) for t in tensors]
    offsets = [w - w0 for w in ws]
    norms = [torch.linalg.vector_norm(o, dim=-1) for o in offsets]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            dot = (offsets[i] * offsets[j]).sum(dim=-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos),
                    count * cos / torch.where(singular, torch.ones_like(denominator), denominator))
    average = sum(ws) / count
    return (t * average + (1 - t) * w0).reshape(shape)


# ---------------------------------------------------------------------------------------------
# NuSLERP and Multi-SLERP
# ---------------------------------------------------------------------------------------------


def slerp_rows(t: float, v0: torch.Tensor, v1: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of each vector along the last dim of v0 and v1 (not normalised:
    the result keeps their lengths' mix); linear where the two are colinear (1 - cos^2 <= eps^2)."""
    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos = (unit(v0) * unit(v1)).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    return torch.where(colinear, (1 - t) * v0 + t * v1, spherical)


def nuslerp(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    *,
    weight: PerModel,
    nuslerp_row_wise: bool = False,
    nuslerp_flatten: bool = True,
    name: str = "",
    seed: int = 0,
) -> torch.Tensor:
    """SLERP of exactly two models at t = w1 / (w0 + w1) (0.5 when the weights sum to ~0); with a
    base, of their task vectors (added back to the base). ``nuslerp_flatten`` (default) treats the
    tensor as one vector; otherwise each row is a vector (the last dim), or with
    ``nuslerp_row_wise`` each column (dim 0 swapped with the last)."""
    if len(tensors) != 2:
        raise ValueError("nuslerp needs exactly two non-base models")
    w = _per_model(weight, 2, "weight")
    total = w[0] + w[1]
    t = 0.5 if abs(total) < 1e-6 else w[1] / total
    b = None if base is None else _f32(base)
    v0, v1 = (_f32(x) if b is None else _f32(x) - b for x in tensors)
    shape = v0.shape
    if nuslerp_flatten:
        out = slerp_rows(t, v0.reshape(-1), v1.reshape(-1))
    elif nuslerp_row_wise:
        out = slerp_rows(t, v0.transpose(0, -1), v1.transpose(0, -1)).transpose(0, -1)
    else:
        out = slerp_rows(t, v0, v1)
    out = out.reshape(shape)
    return out if b is None else b + out


def multislerp(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    *,
    weight: PerModel,
    normalize_weights: bool = True,
    eps: float = 1e-8,
    name: str = "",
    seed: int = 0,
) -> torch.Tensor:
    """Barycentric interpolation on the hypersphere (one tangent-space step): project the unit
    (task) vectors onto the tangent space at their weighted mean direction, average there, map
    back with the exponential map and scale by the weighted mean norm. One model: itself.
    Two antipodal models with balancing weights fall back to the weighted sum; more are an error
    (as in mergekit)."""
    if not tensors:
        raise ValueError("multislerp needs at least one model")
    if len(tensors) == 1:
        return _f32(tensors[0])
    w = torch.tensor(_per_model(weight, len(tensors), "weight"), dtype=torch.float32)
    if normalize_weights:
        w = w / w.sum()
    b = None if base is None else _f32(base)
    x = torch.stack([_f32(t) if b is None else _f32(t) - b for t in tensors])
    shape = x.shape[1:]
    flat = x.reshape(len(tensors), -1)
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(dim=0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(tensors) != 2:
            raise ValueError("multislerp: the weighted sum of the input directions is zero "
                             "(antipodal inputs with balancing weights)")
        out = (x[0] * w[0] + x[1] * w[1]).reshape(shape)
        return out if b is None else out + b
    mean = mean / mean_norm
    tangent = units - (units * mean).sum(dim=-1, keepdim=True) * mean
    step = (tangent * w[:, None]).sum(dim=0)
    step_norm = torch.linalg.vector_norm(step) + eps
    out = mean * torch.cos(step_norm) + step * (torch.sin(step_norm) / step_norm)
    out = (out * (norms.squeeze(-1) * w).sum()).reshape(shape)
    return out if b is None else out + b


# ---------------------------------------------------------------------------------------------
# Karcher mean (Riemannian centre of mass on the sphere)
# ---------------------------------------------------------------------------------------------


def karcher(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    *,
    max_iter: int = 10,
    tol: float = 1e-5,
    name: str = "",
    seed: int = 0,
) -> torch.Tensor:
    """Equal-weight Karcher mean of the inputs' directions, scaled by their mean norm.

    mergekit's karcher ignores the base role: the base is just one more input. Pass every input
    in recipe order in ``tensors`` (base=None); a ``base`` given here is appended last, which is
    where mergekit puts a base model that the recipe's ``models`` list does not name. Inputs of
    norm <= ``tol`` do not steer the direction but still count in the mean norm; up to
    ``max_iter`` Riemannian gradient steps, stopping when the tangent norm drops below ``tol``.
    """
    inputs = [_f32(t) for t in tensors] + ([] if base is None else [_f32(base)])
    if not inputs:
        raise ValueError("karcher needs at least one input")
    if len(inputs) == 1:
        return inputs[0]
    alpha = 1.0 / len(inputs)
    norms = [torch.linalg.vector_norm(x) for x in inputs]
    units = [x / nrm if float(nrm) != 0.0 else torch.zeros_like(x) for x, nrm in zip(inputs, norms)]
    valid = [i for i, nrm in enumerate(norms) if float(nrm) > tol]
    if not valid:
        return torch.zeros_like(inputs[0])
    alpha_sum = sum([alpha] * len(valid))
    a = [alpha / alpha_sum] * len(valid)  # equal alphas, renormalised over the valid inputs
    vunits = [units[i] for i in valid]
    mean = torch.zeros_like(vunits[0])
    for ai, u in zip(a, vunits):
        mean = mean + ai * u
    mean_norm = torch.linalg.vector_norm(mean)
    mean = vunits[0].clone() if float(mean_norm) < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for ai, u in zip(a, vunits):
            dot = torch.clamp(torch.dot(mean.reshape(-1), u.reshape(-1)), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent = tangent + ai * (theta / torch.sin(theta)) * (u - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if float(tangent_norm) < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = torch.linalg.vector_norm(mean)
        if float(unit_norm) > tol:
            mean = mean / unit_norm
    scale = sum(alpha * nrm for nrm in norms)
    return scale * mean


# ---------------------------------------------------------------------------------------------
# NearSwap, Arcee Fusion
# ---------------------------------------------------------------------------------------------


def nearswap(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    t: float,
    name: str = "",
    seed: int = 0,
) -> torch.Tensor:
    """Take the model's value where it is close to the base: weight = clamp(t / |a - b|, 0, 1)
    (|a - b| floored at 1e-6), out = weight * model + (1 - weight) * base. One model."""
    if len(tensors) != 1:
        raise ValueError("nearswap needs a base and exactly one model")
    a = _f32(base)
    b = _f32(tensors[0])
    weight = (t / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a


def _quantile_at(sorted_or_flat: torch.Tensor, q: float) -> torch.Tensor:
    """The element at sorted index int(q * (n - 1)) (mergekit's index, no interpolation)."""
    n = sorted_or_flat.numel()
    index = int(torch.tensor(q, dtype=torch.float32) * (n - 1))
    return torch.kthvalue(sorted_or_flat, index + 1).values


def arcee_fusion(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    name: str = "",
    seed: int = 0,
) -> torch.Tensor:
    """Keep the model's change only where it is important: importance = |model - base| times
    KL(softmax(model) || softmax(base)) of the row (last dim); kept where importance >= median +
    1.5 IQR (quantiles at sorted index int(q * (n - 1))).

    mergekit estimates the quantiles from 10**6 random samples (with replacement) on larger
    tensors; we compute them exactly (kthvalue), so the result is deterministic; identical to
    mergekit at up to 10**6 elements."""
    if len(tensors) != 1:
        raise ValueError("arcee_fusion needs a base and exactly one model")
    b = _f32(base)
    p_in = _f32(tensors[0])
    p = torch.softmax(p_in, dim=-1) + 1e-8
    q = torch.softmax(b, dim=-1) + 1e-8
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    importance = (p_in - b).abs() * kl
    flat = importance.reshape(-1)
    q1, median, q3 = (_quantile_at(flat, x) for x in (0.25, 0.5, 0.75))
    keep = (importance >= median + 1.5 * (q3 - q1)).to(torch.float32)
    return b + (p_in - b) * keep


# ---------------------------------------------------------------------------------------------
# RAM / RAM+ (https://arxiv.org/abs/2601.13572), tensor-local
# ---------------------------------------------------------------------------------------------


def _ram_parts(base: torch.Tensor, tensors: Sequence[torch.Tensor], epsilon: float):
    b = _f32(base)
    tv = torch.stack([(_f32(t) - b).reshape(-1) for t in tensors])
    nonzero = tv.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    return b, tv * nonzero, nonzero, counts, counts > 1, counts == 1


def ram(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    epsilon: float = 1e-5,
    name: str = "",
    seed: int = 0,
) -> torch.Tensor:
    """Reinforced Agent Merging: at each element, a task-vector value that only one model changes
    (|delta| > epsilon) is taken whole; values several models change are averaged over those
    models (not over all K, so unique contributions are not diluted)."""
    if not tensors:
        return _f32(base)
    b, tvz, _, counts, overlap, unique = _ram_parts(base, tensors, epsilon)
    merged = (tvz * unique + tvz * overlap / counts.clamp(min=1)).sum(dim=0)
    return b + merged.reshape(b.shape)


def ramplus_tl(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
    name: str = "",
    seed: int = 0,
) -> torch.Tensor:
    """RAM+ (tensor-local): as RAM, but model k's unique values are amplified by
    1 + r * clamp(rho_k, 0, alpha), rho_k = (#k's shared elements) / (#k's unique elements, floored
    at epsilon) in this tensor -- a model whose changes are mostly shared loses more to the
    averaging and gets its unique part boosted."""
    if not tensors:
        return _f32(base)
    b, tvz, nonzero, counts, overlap, unique = _ram_parts(base, tensors, epsilon)
    shared_n = (nonzero & overlap).sum(dim=1)
    unique_n = (nonzero & unique).sum(dim=1)
    rho = shared_n / unique_n.clamp(min=epsilon)
    lam = 1 + r * rho.clamp(min=0, max=alpha)
    merged = (tvz * unique * lam[:, None] + tvz * overlap / counts.clamp(min=1)).sum(dim=0)
    return b + merged.reshape(b.shape)


#: method name -> its function
METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "breadcrumbs": breadcrumbs,
    "breadcrumbs_ties": breadcrumbs_ties,
    "della": della,
    "della_linear": della_linear,
    "sce": sce,
    "model_stock": model_stock,
    "nuslerp": nuslerp,
    "multislerp": multislerp,
    "karcher": karcher,
    "nearswap": nearswap,
    "arcee_fusion": arcee_fusion,
    "ram": ram,
    "ramplus_tl": ramplus_tl,
}

#: methods whose result depends on ``seed`` and ``name`` (the Philox stream)
RANDOM = frozenset({"della", "della_linear"})

__all__ = ["FUSION", "METHODS", "PARAMS", "PYARG", "RANDOM", "REQUIRED"]
