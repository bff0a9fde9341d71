"""nearswap: the model's value where it is within ``t`` of the base, blended beyond; a base and one
model (torch route: ``methods_math.nearswap``)."""

from . import REQUIRED, MergeMethod, Param, math_merge

METHOD = MergeMethod(
    "nearswap",
    params=(Param("t", "float", REQUIRED),),
    base="required",
    inputs=2,
    merge=math_merge("nearswap"),
    pretty_name="NearSwap",
    reference_url="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
)
