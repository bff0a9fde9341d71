"""Fused merges on an accelerator for the streaming engine: the Triton kernel, fed from the host.

On a GPU the reader thread stages each tensor group into pinned host memory (torch's caching host
allocator reuses those blocks); here the group is copied to the device on one of two CUDA streams,
merged by the fused kernel and copied back into a pinned output, all asynchronously, and the two
streams alternate so that one tensor's copies overlap the other's kernel. ``ready()`` hands back
the results whose stream has finished, in submission order, to the writer thread.

On CPU tensors (``TRITON_INTERPRET=1``) the same path runs synchronously: that is how the tests
exercise it on machines without a GPU.
"""

from __future__ import annotations

from collections import deque
from contextlib import nullcontext
from typing import Any

import torch

from ._optional import require
from .errors import FastmergeError
from .plan import TensorPlan


class DeviceRunner:
    """Submits fused tasks to one device; results come back through ``ready``."""

    def __init__(self, device: str | torch.device):
        import os

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if not self.cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise FastmergeError("the Triton backend on CPU tensors needs TRITON_INTERPRET=1 (or use backend 'cpu')")
        require("triton", "the Triton backend")
        from .kernels import fused_ta  # imported only here: no device work at import time

        self._fused_ta = fused_ta
        self._streams = [torch.cuda.Stream(self.device) for _ in range(2)] if self.cuda else [None, None]
        self._pending: deque[tuple[Any, Any, tuple]] = deque()
        self._count = 0

    def stage(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Reader-thread side: copy a group into pinned memory so that uploads are asynchronous."""
        return [t.pin_memory() for t in tensors] if self.cuda else tensors

    def submit(self, task: TensorPlan, tensors: list[torch.Tensor], payload: tuple) -> torch.Tensor:
        """Queue the merge of one fused task; returns the host tensor its result will land in."""
        stream = self._streams[self._count % 2]
        self._count += 1
        out_host = torch.empty(task.shape, dtype=task.dtype, pin_memory=self.cuda)
        with torch.cuda.stream(stream) if self.cuda else nullcontext():
            dev = [t.to(self.device, non_blocking=True) for t in tensors]
            base, models = task.split(dev)
            result = self._fused_ta.fused_merge(base, models, task.fused, task.key, task.dtype)
            out_host.copy_(result, non_blocking=True)
            event = None
            if self.cuda:
                event = torch.cuda.Event()
                event.record(stream)
        # the inputs and the device result stay referenced until the event has completed
        self._pending.append((event, (tensors, dev, result), (*payload, out_host)))
        return out_host

    def ready(self, drain: bool = False) -> list[tuple]:
        """Payloads (with their host result appended) whose work has finished, oldest first;
        keeps the newest one in flight unless ``drain``."""
        done = []
        while len(self._pending) > (0 if drain else 1):
            event, _keep, payload = self._pending.popleft()
            if event is not None:
                event.synchronize()
            done.append(payload)
        return done
