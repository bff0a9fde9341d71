"""task_arithmetic: base + lambda * the weighted sum of the task vectors."""

from . import Fused, MergeMethod, ta_params

METHOD = MergeMethod(
    "task_arithmetic",
    params=ta_params(normalize=False, rescale=False),
    base="required",
    fused=Fused(sparsify="none", consensus="none"),
    pretty_name="Task Arithmetic",
    reference_url="https://arxiv.org/abs/2212.04089",
)
