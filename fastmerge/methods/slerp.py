"""slerp: spherical interpolation between the base and one other model, per whole tensor (torch route)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import REQUIRED, MergeContext, MergeMethod, Param

if TYPE_CHECKING:
    import torch


def merge(tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict, ctx: MergeContext) -> torch.Tensor:
    from ..reference import slerp

    return slerp(params["t"], base, tensors[0], ctx.out_dtype)


METHOD = MergeMethod(
    "slerp",
    params=(Param("t", "float", REQUIRED, low=0.0, high=1.0),),
    base="required",
    inputs=2,
    merge=merge,
    pretty_name="SLERP",
    reference_url="https://en.wikipedia.org/wiki/Slerp",
)
