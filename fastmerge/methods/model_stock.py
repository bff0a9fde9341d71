"""model_stock: interpolate between the base and the models' average by their task vectors' mean
cosine (whole tensor, or per row with ``filter_wise``); a base and 2+ models (torch route)."""

from . import MergeMethod, Param, math_merge

METHOD = MergeMethod(
    "model_stock",
    params=(Param("filter_wise", "bool", False),),
    base="required",
    non_base=(2, None),
    merge=math_merge("model_stock"),
    pretty_name="Model Stock",
    reference_url="https://arxiv.org/abs/2403.19522",
)
