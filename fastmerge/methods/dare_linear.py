"""dare_linear: random (DARE, Philox) sparsification with rescale, no sign election."""

from . import Fused, MergeMethod, ta_params

METHOD = MergeMethod(
    "dare_linear",
    params=ta_params(normalize=False, rescale=True),
    base="required",
    fused=Fused(sparsify="random", consensus="none"),
    pretty_name="Linear DARE",
    reference_url="https://arxiv.org/abs/2311.03099",
)
