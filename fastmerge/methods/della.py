"""della: MAGPRUNE (keep probability ranked by |delta| per row, density +/- epsilon), l1 rescale,
TIES sign election by sum, weight normalisation (torch route: ``methods_math.della``).

The keep draws are the Philox stream of DESIGN.md s.3 (the tensor's name, the recipe's
``random_seed`` / ``--seed``, the model's position k), as DARE's: the same bits on every path,
statistically (not bit-) equal to mergekit's ``torch.bernoulli``."""

from . import MergeMethod, Param, math_merge, ta_params

METHOD = MergeMethod(
    "della",
    params=ta_params(True, True, Param("epsilon", "float", 0.15, per_model=True), rescale_kind="bool"),
    base="required",
    merge=math_merge("della"),
    pretty_name="DELLA",
    reference_url="https://arxiv.org/abs/2406.11617",
)
