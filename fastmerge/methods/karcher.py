"""karcher: the equal-weight Karcher mean of the inputs' directions, scaled by their mean norm; a
named base is one more input, as in mergekit (torch route: ``methods_math.karcher``)."""

from . import MergeMethod, Param, math_merge

METHOD = MergeMethod(
    "karcher",
    params=(Param("max_iter", "int", 10), Param("tol", "float", 1e-5)),
    base="ignored",
    merge=math_merge("karcher"),
    pretty_name="Karcher Mean",
    reference_url="https://arxiv.org/abs/2603.04972",
)
