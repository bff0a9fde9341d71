"""della_linear: DELLA's MAGPRUNE and l1 rescale without sign election (torch route; Philox draws
as ``della``)."""

from . import MergeMethod, Param, math_merge, ta_params

METHOD = MergeMethod(
    "della_linear",
    params=ta_params(False, True, Param("epsilon", "float", 0.15, per_model=True), rescale_kind="bool"),
    base="required",
    merge=math_merge("della_linear"),
    pretty_name="Linear DELLA",
    reference_url="https://arxiv.org/abs/2406.11617",
)
