"""CheckpointReader from several threads (the engine's reader thread and the caller's): each shard
is opened and mapped once, however the threads interleave."""

from __future__ import annotations

import mmap
import threading
import time

import numpy as np
import torch
from safetensors.torch import save_file

from fastmerge import io


def test_one_map_and_one_fd_per_shard_under_contention(tmp_path, monkeypatch):
    save_file({"a": torch.arange(4096, dtype=torch.float32), "b": torch.ones(1024)}, tmp_path / "model.safetensors")
    reader = io.CheckpointReader(tmp_path)
    made = []
    real_mmap, real_open = mmap.mmap, io.os.open

    def slow_mmap(*a, **kw):  # widen the check-then-create window
        time.sleep(0.02)
        m = real_mmap(*a, **kw)
        made.append(m)
        return m

    opened = []

    def slow_open(*a, **kw):
        time.sleep(0.02)
        fd = real_open(*a, **kw)
        opened.append(fd)
        return fd

    monkeypatch.setattr(io.mmap, "mmap", slow_mmap)
    monkeypatch.setattr(io.os, "open", slow_open)
    start = threading.Barrier(8)
    got = {}

    def work(i):
        start.wait()
        name = "a" if i % 2 else "b"
        got[i] = (np.array(reader.map_bytes(name)), reader.read(name))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1 and len(opened) == 1
    for i, (raw, t) in got.items():
        assert raw.tobytes() == t.numpy().tobytes()
        assert torch.equal(t, torch.arange(4096, dtype=torch.float32) if i % 2 else torch.ones(1024))
    reader.close()
