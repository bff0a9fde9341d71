"""Shared fixtures: tiny model families made on the spot (no hub), and the device to test on."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

from fastmerge.synth import ModelSpec, make_family

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest-xdist workers on two cores: one thread each (torch with 2 threads
    # beside a busy core runs many times slower), inherited by the subprocesses tests start
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
# Kernel tests run under Triton's interpreter on a machine without a GPU; it must be set before
# triton is first imported (triton.jit reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
warnings.filterwarnings("ignore", message=".*torch_dtype.*")

#: per-dtype tolerances of the fused paths against the reference (relative for bf16/fp16)
TOLERANCES = {
    torch.float32: dict(rtol=1e-6, atol=1e-7),
    torch.float16: dict(rtol=1e-3, atol=1e-5),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-5),
}


def tensor_family(n, k: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base of n N(0,1) values and k "fine-tunes" (base + N(0, 0.05^2)), all cast to dtype."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    models = [(base + 0.05 * torch.randn(n, generator=g)).to(dtype) for _ in range(k)]
    return base.to(dtype), models


@pytest.fixture
def one_thread():
    """torch on one thread for the test (restored after): the reference functions' timing and the
    C loop's comparisons do not depend on what else runs on the machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def families(tmp_path_factory):
    """families(arch="llama", dtype=torch.float32, finetunes=2, **spec) -> [base, ft0, ...] (cached)."""
    cache: dict = {}

    def make(arch: str = "llama", dtype: torch.dtype = torch.float32, finetunes: int = 2,
             vocab_overrides: dict | None = None, **spec) -> list[Path]:
        key = (arch, dtype, finetunes, tuple(sorted((vocab_overrides or {}).items())), tuple(sorted(spec.items())))
        if key not in cache:
            root = tmp_path_factory.mktemp(f"{arch}-{str(dtype).split('.')[-1]}")
            cache[key] = make_family(root, ModelSpec(arch=arch, dtype=dtype, **spec), finetunes=finetunes,
                                     vocab_overrides=vocab_overrides)
        return cache[key]

    return make
