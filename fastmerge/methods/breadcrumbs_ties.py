"""breadcrumbs_ties: breadcrumbs sparsification, then TIES sign election by sum (torch route)."""

from . import MergeMethod, Param, math_merge, ta_params

METHOD = MergeMethod(
    "breadcrumbs_ties",
    params=ta_params(False, False, Param("gamma", "float", 0.01, per_model=True), rescale_kind="bool"),
    base="required",
    merge=math_merge("breadcrumbs_ties"),
    pretty_name="Model Breadcrumbs with TIES",
    reference_url="https://arxiv.org/abs/2312.06795",
)
