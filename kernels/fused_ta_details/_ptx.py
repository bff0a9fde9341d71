"""Compile the fused kernels for a GPU target without a GPU (Triton builds PTX and cubin for any
target), and read what matters for speed from the result: how global memory is accessed (vector
widths) and how many registers a thread takes (``cuobjdump`` from Triton's NVIDIA backend).
Used by tests/test_kernels_ptx.py and bench/gpu_check.sh; must run without ``TRITON_INTERPRET``."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..fused_ta import ALIGN_BYTES, MAX_REGISTERS, l1_launch_config, launch_config
from ._fused_ta import _fused_ta_grouped_kernel, _fused_ta_kernel, _l1_sums_kernel

_TY = {torch.bfloat16: ("bf16", "i16"), torch.float16: ("fp16", "fp16"), torch.float32: ("fp32", "fp32")}


@dataclass
class Build:
    kernel: str
    k: int
    dtype: str
    sparsify: int
    block: int
    num_warps: int
    registers: int | None
    spill_bytes: int | None
    accesses: dict[str, int]

    def count(self, pattern: str) -> int:
        return sum(v for a, v in self.accesses.items() if re.fullmatch(pattern, a))


def _registers(cubin: bytes) -> tuple[int, int] | None:
    """(registers, local memory bytes: spills) per thread."""
    import triton.backends.nvidia as nv

    tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+).*LOCAL:(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def build(kernel: str, k: int, dtype: torch.dtype, sparsify: int, arch: int = 90) -> Build:
    """Compile one variant for sm_{arch} with the launch configuration the launchers use."""
    from triton.compiler import ASTSource

    block, warps = (l1_launch_config if kernel == "l1" else launch_config)(k, dtype)
    x, out = _TY[dtype]
    # the per-tensor kernels' arguments after their output (the merge's out_ptr, the l1 pass's sums_ptr)
    inputs = {"base_ptr": f"*{x}", **{f"x{i}": f"*{x}" for i in range(8)}, "prm_ptr": "*fp32", "seed0": "i64",
              "seed1": "i64", "n": "i64"}
    if kernel == "l1":
        fn = _l1_sums_kernel
        const = dict(K=k, HAS_BASE=True, SPARSIFY=sparsify, BLOCK=block)
        sig = {"sums_ptr": "*fp64", **inputs, "iters": "i32"}
    else:
        const = dict(K=k, HAS_BASE=True, SPARSIFY=sparsify, CONSENSUS=1, NORMALIZE=True, APPLY_LAMBDA=True,
                     OUT_BF16_BITS=dtype == torch.bfloat16, BLOCK=block)
        if kernel == "grouped":
            fn = _fused_ta_grouped_kernel
            size = ALIGN_BYTES // (torch.finfo(dtype).bits // 8)
            const.update(OUT_ALIGN=size, BASE_ALIGN=size, X_ALIGN=size)
            sig = {"block_entry_ptr": "*i32", "starts_ptr": "*i64", "numel_ptr": "*i64", "ptrs_ptr": "*i64",
                   "prm_ptr": "*fp32", "seeds_ptr": "*i64", "out_anchor": f"*{out}", "base_anchor": f"*{x}",
                   "x_anchor": f"*{x}"}
        else:
            fn = _fused_ta_kernel
            sig = {"out_ptr": f"*{out}", **inputs}
    pointers = [i for i, t in enumerate(sig.values()) if t.startswith("*")]
    sig.update({c: "constexpr" for c in const})
    # what the launcher's tensors give Triton's specialisation: 16-byte aligned pointers
    attrs = {(i,): [["tt.divisibility", 16]] for i in pointers}
    compiled = triton.compile(ASTSource(fn, sig, const, attrs=attrs), target=_target(arch),
                              options=dict(enable_fp_fusion=False, num_warps=warps, maxnreg=MAX_REGISTERS))
    accesses = Counter(re.findall(r"(?:ld|st)\.global(?:\.\w+)*", compiled.asm["ptx"]))
    regs = _registers(compiled.asm["cubin"])
    return Build(kernel, k, str(dtype).replace("torch.", ""), sparsify, block, warps,
                 regs[0] if regs else None, regs[1] if regs else None, dict(accesses))


def _target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


def can_compile() -> bool:
    """Whether this Triton has the NVIDIA backend (it compiles without a GPU)."""
    import triton.backends

    return "nvidia" in triton.backends.backends and tl is not None
