"""The per-tensor parameters of the task-arithmetic family (DESIGN.md section 3).

Shared by the pure-torch reference, the fused CPU path and the Triton kernels: the math takes
tensors plus these values and knows nothing of files or recipes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Sparsify = Literal["none", "random", "magnitude"]
Consensus = Literal["none", "sum", "count"]
Rescale = Literal["none", "l1", "inverse"]

#: mergekit skips the l1 rescale when either norm is below this (avoids 0/0 on empty deltas).
L1_EPS = 1e-7


@dataclass(frozen=True)
class FusedOptions:
    """How one tensor is merged; one entry per non-base model in ``weights``/``densities``."""

    weights: tuple[float, ...]
    densities: tuple[float, ...] = ()
    sparsify: Sparsify = "none"
    consensus: Consensus = "none"
    rescale: Rescale = "none"
    normalize: bool = False
    lambda_: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.densities:
            object.__setattr__(self, "densities", (1.0,) * len(self.weights))
        if len(self.densities) != len(self.weights):
            raise ValueError("weights and densities must have one entry per model")

    @property
    def k(self) -> int:
        return len(self.weights)


def keep_count(density: float, numel: int) -> int:
    """m of the TIES threshold: the m largest |delta| survive (m = 0 keeps nothing)."""
    return min(numel, max(0, int(density * numel)))


def l1_scale(total: float, kept: float) -> float:
    """mergekit's l1 rescale factor, with its guard against near-zero norms."""
    if total < L1_EPS or kept < L1_EPS:
        return 1.0
    return total / kept


def inverse_scale(density: float) -> float:
    return 1.0 / density if density > 0 else 1.0
