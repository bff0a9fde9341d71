"""Pure-torch reference of the merge math: slow, small, obviously right.

Every fast path (the fused CPU loop in ``fastmerge.cpu``, the Triton kernels) is tested against
these functions. They follow DESIGN.md section 3 line by line, loop over models in recipe order
and accumulate in the same order as the fast paths, so masks match exactly and values to the ulp.
"""

from __future__ import annotations

import torch

from . import rng
from .spec import FusedOptions, inverse_scale, keep_count, l1_scale


def magnitude_threshold(delta: torch.Tensor, density: float) -> float:
    """tau: the exact m-th largest |delta| (inf when m = 0, so nothing is kept)."""
    flat = delta.reshape(-1).abs().float()
    m = keep_count(density, flat.numel())
    if m == 0:
        return float("inf")
    return float(torch.kthvalue(flat, flat.numel() - m + 1).values)


def magnitude_keep(delta: torch.Tensor, density: float) -> torch.Tensor:
    """The m = int(density * n) largest |delta| of a whole tensor, ties at the threshold broken by
    the lowest flat index: a stable sort by descending |delta| keeps equal values in index order."""
    flat = delta.reshape(-1).abs().float()
    m = keep_count(density, flat.numel())
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.sort(flat, descending=True, stable=True).indices[:m]] = True
    return keep


def _keep_masks(deltas: list[torch.Tensor], opts: FusedOptions, name: str) -> list[torch.Tensor]:
    """keep_k (random or all) for the elements of one 2**31-element chunk (``name`` is the chunk's name)."""
    n = deltas[0].numel()
    if opts.sparsify == "random":
        index = torch.arange(n, dtype=torch.int64)
        return [rng.uniforms(opts.seed, name, k, index) < torch.tensor(opts.densities[k], dtype=torch.float32)
                for k in range(opts.k)]
    return [torch.ones(n, dtype=torch.bool) for _ in range(opts.k)]


def fused_merge(
    base: torch.Tensor | None,
    models: list[torch.Tensor],
    opts: FusedOptions,
    name: str,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The task-arithmetic family (linear when ``base`` is None) for one tensor."""
    shape = models[0].shape
    b = base.reshape(-1).float() if base is not None else torch.zeros(models[0].numel())
    deltas = [m.reshape(-1).float() - b for m in models]
    n = b.numel()
    # TIES trimming is per whole tensor, the DARE stream per 2**31-element chunk
    if opts.sparsify == "magnitude":
        keep = [magnitude_keep(d, r) for d, r in zip(deltas, opts.densities)]
    else:
        chunks = [_keep_masks([d[s:e] for d in deltas], opts, rng.chunk_name(name, c, n))
                  for c, (s, e) in enumerate(rng.chunks(n))]
        keep = [torch.cat([kc[k] for kc in chunks]) for k in range(opts.k)]

    scales = []
    for k, d in enumerate(deltas):
        if opts.sparsify == "none" or opts.rescale == "none":
            scales.append(1.0)
        elif opts.rescale == "inverse":
            scales.append(inverse_scale(opts.densities[k]))
        else:
            a = d.abs().double()
            scales.append(l1_scale(float(a.sum()), float((a * keep[k]).sum())))

    zero = torch.zeros((), dtype=torch.float32)
    v = []
    for k, d in enumerate(deltas):
        scale = torch.tensor(scales[k], dtype=torch.float32)
        weight = torch.tensor(opts.weights[k], dtype=torch.float32)
        v.append(torch.where(keep[k], (d * scale) * weight, zero))

    mixed = torch.zeros(n)
    div = torch.zeros(n)
    if opts.consensus == "none":
        for k in range(opts.k):
            mixed = mixed + v[k]
            div = div + torch.tensor(opts.weights[k], dtype=torch.float32)
        div = torch.where(div.abs() < 1e-8, torch.ones(()), div)
    else:
        s = torch.zeros(n)
        for k in range(opts.k):
            s = s + (v[k] if opts.consensus == "sum" else torch.sign(v[k]))
        positive = s >= 0
        for k in range(opts.k):
            agree = torch.where(positive, v[k] > 0, v[k] < 0)
            mixed = torch.where(agree, mixed + v[k], mixed)
            div = torch.where(agree, div + torch.tensor(opts.weights[k], dtype=torch.float32), div)
        div = torch.where(div == 0, torch.ones(()), div)
    if opts.normalize:
        mixed = mixed / div
    if opts.lambda_ != 1.0:
        mixed = mixed * torch.tensor(opts.lambda_, dtype=torch.float32)
    return (b + mixed).to(out_dtype).reshape(shape)


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, out_dtype: torch.dtype,
          dot_threshold: float = 0.9995, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of whole tensors as mergekit does it (lerp when nearly parallel)."""
    a = v0.reshape(-1).float()
    b = v1.reshape(-1).float()
    na = torch.linalg.vector_norm(a)
    nb = torch.linalg.vector_norm(b)
    na = na if na > eps else torch.ones(())
    nb = nb if nb > eps else torch.ones(())
    dot = float(((a / na) * (b / nb)).sum().clamp(-1, 1))
    if abs(dot) > dot_threshold:
        ca, cb = 1 - t, t
    else:
        theta = torch.acos(torch.tensor(dot, dtype=torch.float32))
        sin_theta = torch.sin(theta)
        ca = float(torch.sin((1 - t) * theta) / sin_theta)
        cb = float(torch.sin(t * theta) / sin_theta)
    return (ca * a + cb * b).to(out_dtype).reshape(v0.shape)


def passthrough(x: torch.Tensor, scale: float | None, out_dtype: torch.dtype) -> torch.Tensor:
    return (x if scale is None else x.float() * scale).to(out_dtype)
