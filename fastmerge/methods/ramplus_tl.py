"""ramplus_tl: RAM with each model's unique changes amplified by its shared/unique ratio in the
tensor (torch route: ``methods_math.ramplus_tl``)."""

from . import MergeMethod, Param, math_merge

METHOD = MergeMethod(
    "ramplus_tl",
    params=(Param("r", "float", 0.1), Param("alpha", "float", 0.2), Param("epsilon", "float", 1e-5)),
    base="required",
    merge=math_merge("ramplus_tl"),
    pretty_name="Reinforced Agent Merging Plus (Tensor-Local)",
    reference_url="https://arxiv.org/abs/2601.13572",
)
