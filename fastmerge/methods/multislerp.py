"""multislerp: barycentric interpolation of 1+ models on the hypersphere; with a base, of their task
vectors (torch route: ``methods_math.multislerp``)."""

from . import REQUIRED, MergeMethod, Param, math_merge

METHOD = MergeMethod(
    "multislerp",
    params=(
        Param("weight", "float", REQUIRED, per_model=True),
        Param("normalize_weights", "bool", True),
        Param("eps", "float", 1e-8),
    ),
    base="optional",
    non_base=(1, None),
    merge=math_merge("multislerp"),
    pretty_name="Multi-SLERP",
    reference_url="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
)
