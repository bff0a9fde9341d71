"""Host -> device copies of small launch tables without a host synchronisation."""

from __future__ import annotations

import torch


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` as a tensor on ``device``: staged in pinned memory and copied asynchronously on a
    GPU (a copy from pageable memory waits for the stream), as is on the CPU. The caching host
    allocator keeps the pinned block until the copy has completed."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype).pin_memory().to(device, non_blocking=True)
