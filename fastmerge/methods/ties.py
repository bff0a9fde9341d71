"""ties: magnitude sparsification (exact top-m), sign election by sum, normalized by default."""

from . import Fused, MergeMethod, ta_params

METHOD = MergeMethod(
    "ties",
    params=ta_params(normalize=True, rescale=False),
    base="required",
    fused=Fused(sparsify="magnitude", consensus="sum"),
    pretty_name="TIES",
    reference_url="https://arxiv.org/abs/2306.01708",
)
