"""linear: a weighted average of every input (a named base is one more input), normalized by default."""

from . import REQUIRED, Fused, MergeMethod, Param

METHOD = MergeMethod(
    "linear",
    params=(Param("weight", "float", REQUIRED, per_model=True), Param("normalize", "bool", True)),
    base="ignored",
    fused=Fused(),
    pretty_name="Linear",
    reference_url="https://arxiv.org/abs/2203.05482",
)
