"""ram: Reinforced Agent Merging -- a change only one model makes is taken whole, shared ones are
averaged over the models that make them (torch route: ``methods_math.ram``)."""

from . import MergeMethod, Param, math_merge

METHOD = MergeMethod(
    "ram",
    params=(Param("epsilon", "float", 1e-5),),
    base="required",
    merge=math_merge("ram"),
    pretty_name="Reinforced Agent Merging",
    reference_url="https://arxiv.org/abs/2601.13572",
)
