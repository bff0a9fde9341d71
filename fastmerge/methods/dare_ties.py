"""dare_ties: random (DARE, Philox) sparsification with rescale, sign election by sum."""

from . import Fused, MergeMethod, ta_params

METHOD = MergeMethod(
    "dare_ties",
    params=ta_params(normalize=False, rescale=True),
    base="required",
    fused=Fused(sparsify="random", consensus="sum"),
    pretty_name="DARE TIES",
    reference_url="https://arxiv.org/abs/2311.03099",
)
