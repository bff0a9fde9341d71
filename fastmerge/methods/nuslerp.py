"""nuslerp: SLERP of exactly two models at t = w1 / (w0 + w1); with a base, of their task vectors
(torch route: ``methods_math.nuslerp``)."""

from . import REQUIRED, MergeMethod, Param, math_merge

METHOD = MergeMethod(
    "nuslerp",
    params=(
        Param("weight", "float", REQUIRED, per_model=True),
        Param("nuslerp_row_wise", "bool", False),
        Param("nuslerp_flatten", "bool", True),
    ),
    base="optional",
    non_base=(2, 2),
    merge=math_merge("nuslerp"),
    pretty_name="NuSLERP",
)
