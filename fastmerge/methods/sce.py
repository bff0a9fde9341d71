"""sce: select (top-variance elements, ``select_topk``), calculate (weights from the task vectors'
energy), erase (sign disagreements); no user weights (torch route: ``methods_math.sce``)."""

from . import MergeMethod, Param, math_merge

METHOD = MergeMethod(
    "sce",
    params=(Param("int8_mask", "bool", False), Param("select_topk", "float", 1.0)),
    base="required",
    merge=math_merge("sce"),
    pretty_name="SCE",
    reference_url="https://arxiv.org/abs/2408.07990",
)
