"""arcee_fusion: the model's change kept where its KL-weighted importance is an outlier (>= median +
1.5 IQR); a base and one model (torch route: ``methods_math.arcee_fusion``, exact quantiles)."""

from . import MergeMethod, math_merge

METHOD = MergeMethod(
    "arcee_fusion",
    params=(),
    base="required",
    inputs=2,
    merge=math_merge("arcee_fusion"),
    pretty_name="Arcee Fusion",
    reference_url="https://arcee.ai",
)
