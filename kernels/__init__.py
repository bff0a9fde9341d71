"""Triton kernels, importable as ``fastmerge.kernels``.

``fused_ta.fused_merge`` is the fused task-arithmetic-family kernel (DARE drop, TIES trim, sign
election, weighted sum, normalize, lambda, one cast), the Triton twin of ``fastmerge.cpu``: same
masks bit for bit, tested under ``TRITON_INTERPRET=1``. ``fused_ta_grouped.grouped_fused_merge``
merges many tensors with one launch per group (an int64 pointer table over all tensors). Nothing
here queries a driver or a device at import time.
"""

from __future__ import annotations


def available() -> bool:
    """True when triton imports (GPU or ``TRITON_INTERPRET=1`` on the CPU)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
