"""Triton kernels, importable as ``fastmerge.kernels``.

The fused DARE/TIES/weighted-sum kernel and its launcher land with the Triton issue; until then
``available()`` says whether Triton can be imported at all. Nothing here queries a driver or a
device at import time.
"""

from __future__ import annotations


def available() -> bool:
    """True when triton imports (GPU or ``TRITON_INTERPRET=1`` on the CPU)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
