"""A frozen copy of ``fastmerge.methods_math``'s sparsifying methods as they were before the C
pre-passes (git main at 05de570): the reference that ``test_sparsify_cpu`` holds the new path to,
bit for bit. Verbatim, except that the imports are absolute. Not a test module (no ``test_`` prefix).
"""
# ruff: noqa

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastmerge import rng
from fastmerge.methods_math import PerModel
from fastmerge.spec import l1_scale


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
    exactly as the DARE masks of the reference draw them."""
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
    ranks = torch.argsort(order, dim=1, stable=True).to(torch.float32)  # 0 .. m-1
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


def sce_select(task_vectors: torch.Tensor, select_topk: float) -> torch.Tensor:
    """Select: the elements of highest cross-model variance (population variance over models),
    int(select_topk * #nonzero-variance) of them; ties by flat index (mergekit's topk leaves the
    order unspecified)."""
    shape = task_vectors.shape[1:]
    if select_topk <= 0:
        return torch.zeros(shape, dtype=torch.bool)
    if select_topk >= 1:
        return torch.ones(shape, dtype=torch.bool)
    var = torch.var(task_vectors, dim=0, unbiased=False).reshape(-1)
    m = int(int(torch.count_nonzero(var)) * select_topk)
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
    tvs = torch.stack([_f32(t) - b for t in tensors])
    if select_topk < 1:
        tvs = tvs * sce_select(tvs, select_topk).to(torch.float32)
    majority = torch.where(tvs.sum(dim=0) >= 0, 1.0, -1.0)
    agree = (torch.sign(tvs) == majority).to(torch.float32)
    energy = tvs.square().reshape(len(tensors), -1).mean(dim=1)
    total = float(energy.sum())
    w = torch.full_like(energy, 1.0 / len(tensors)) if abs(total) < 1e-6 else energy / total
    w = w.reshape(-1, *([1] * b.dim())) * agree
    return b + (tvs * w).sum(dim=0) / w.sum(dim=0).clamp(min=1e-6)


METHODS = {"breadcrumbs": breadcrumbs, "breadcrumbs_ties": breadcrumbs_ties, "della": della,
           "della_linear": della_linear, "sce": sce}
