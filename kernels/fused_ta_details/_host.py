"""Host -> device copies of small launch tables without a host synchronisation."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` as a tensor on ``device``: staged in pinned memory and copied asynchronously on a
    GPU (a copy from pageable memory waits for the stream), as is on the CPU. The caching host
    allocator keeps the pinned block until the copy has completed."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype).pin_memory().to(device, non_blocking=True)


def device_guard(tensors) -> AbstractContextManager:
    """Triton launches on the current CUDA device and its current stream: make that the device the
    tensors are on (tensors on cuda:1 launched from a process whose current device is cuda:0 would
    run on the wrong GPU)."""
    t = next((x for x in tensors if isinstance(x, torch.Tensor) and x.is_cuda), None)
    return torch.cuda.device(t.device) if t is not None else nullcontext()
