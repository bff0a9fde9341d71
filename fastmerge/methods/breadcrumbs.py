"""breadcrumbs: task arithmetic over task vectors with the largest (outliers, ``gamma``) and the
smallest magnitudes dropped, keeping ``density`` of each (torch route: ``methods_math.breadcrumbs``)."""

from . import MergeMethod, Param, math_merge, ta_params

METHOD = MergeMethod(
    "breadcrumbs",
    params=ta_params(False, False, Param("gamma", "float", 0.01, per_model=True), rescale_kind="bool"),
    base="required",
    merge=math_merge("breadcrumbs"),
    pretty_name="Model Breadcrumbs",
    reference_url="https://arxiv.org/abs/2312.06795",
)
