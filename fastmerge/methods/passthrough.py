"""passthrough: one input per tensor, copied (optionally scaled); stacks layers with ``slices``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import MergeContext, MergeMethod, Param

if TYPE_CHECKING:
    import torch


def merge(tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict, ctx: MergeContext) -> torch.Tensor:
    from ..reference import passthrough

    scale = params["scale"][0]
    return passthrough(tensors[0], scale, ctx.out_dtype)


METHOD = MergeMethod(
    "passthrough",
    params=(Param("scale", "float", None, per_model=True, optional=True),),
    base="ignored",
    inputs=1,
    merge=merge,
    copy_if=lambda params: params["scale"][0] is None,
    pretty_name="Passthrough",
)
