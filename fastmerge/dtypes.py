"""Tensor dtypes by their safetensors codes, so that headers, plans and the fused CPU path need no torch.

Importing torch costs ~1.5 s of a 2-core machine's CPU; a ``fastmerge merge`` of the task-arithmetic
family on the CPU never needs it (the fused C loop works on raw pointers), so the layers below the
torch-using ones speak in codes and convert to ``torch.dtype`` only on demand.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# safetensors code -> (torch attribute, bytes per element, floating point)
CODES: dict[str, tuple[str, int, bool]] = {
    "F64": ("float64", 8, True),
    "F32": ("float32", 4, True),
    "F16": ("float16", 2, True),
    "BF16": ("bfloat16", 2, True),
    "I64": ("int64", 8, False),
    "I32": ("int32", 4, False),
    "I16": ("int16", 2, False),
    "I8": ("int8", 1, False),
    "U8": ("uint8", 1, False),
    "BOOL": ("bool", 1, False),
}
_BY_TORCH_NAME = {v[0]: k for k, v in CODES.items()}


def itemsize(code: str) -> int:
    return CODES[code][1]


def is_float(code: str) -> bool:
    return CODES[code][2]


def torch_name(code: str) -> str:
    """``bfloat16`` for ``BF16`` (the name transformers' configs use for ``torch_dtype``)."""
    return CODES[code][0]


def to_torch(code: str) -> torch.dtype:
    import torch

    return getattr(torch, CODES[code][0])


def from_torch(dtype: torch.dtype) -> str:
    name = str(dtype).replace("torch.", "")
    if name not in _BY_TORCH_NAME:
        raise KeyError(f"no safetensors code for {dtype}")
    return _BY_TORCH_NAME[name]


def from_name(name: str) -> str:
    """The code of a torch dtype name (``bfloat16``, ``float32``, ...)."""
    return _BY_TORCH_NAME[name]


#: the dtypes the fused paths (C loop, Triton kernels) read and write as they are
FUSED_CODES = ("F32", "BF16", "F16")


def fused_flat(t: torch.Tensor) -> torch.Tensor:
    """``t`` flattened and contiguous, in its dtype where the fused paths read it, else upcast to
    fp32: how every fused path (C loop, Triton merge and select) takes a tensor."""
    t = t.reshape(-1)
    if str(t.dtype).replace("torch.", "") not in {CODES[c][0] for c in FUSED_CODES}:
        t = t.float()
    return t.contiguous()
