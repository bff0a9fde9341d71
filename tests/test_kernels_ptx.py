"""The fused kernels as a GPU would run them, checked without a GPU: every variant (K = 1..8 models;
bf16 / fp16 / fp32; the grouped and the per-tensor kernel; DARE, and TIES at K = 1 and 8) compiled
for sm_90 by Triton's real compiler, in the launch configuration the launchers use. A full block's
global loads and stores must be 16-byte vectors (one per input stream at least; the grouped
kernel's table pointers once lost that and loaded 2 bytes at a time), and a thread must take at
most 128 registers (4 warps of them per 16 K registers: 25% occupancy at worst)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

from fastmerge.kernels.fused_ta import MAX_REGISTERS  # noqa: E402

_SCRIPT = textwrap.dedent("""
    import json, torch
    from fastmerge.kernels.fused_ta_details import _ptx
    if not _ptx.can_compile():
        print("SKIP"); raise SystemExit
    variants = [(kern, k, dt, 1) for kern in ("grouped", "per_tensor") for k in range(1, 9)
                for dt in (torch.bfloat16, torch.float16, torch.float32)]
    variants += [(kern, k, dt, 2) for kern in ("grouped", "per_tensor") for k in (1, 8)
                 for dt in (torch.bfloat16, torch.float32)]
    # the l1 sums pass (dare_ties' default rescale): its own launch configuration
    variants += [("l1", k, dt, 1) for k in (1, 2, 3, 5, 8) for dt in (torch.bfloat16, torch.float32)]
    variants += [("l1", 8, torch.float16, 2)]
    for kern, k, dt, sp in variants:
        b = _ptx.build(kern, k, dt, sp)
        print(json.dumps(b.__dict__), flush=True)
""")


@pytest.fixture(scope="module")
def builds():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if proc.stdout.strip() == "SKIP":
        pytest.skip("triton has no nvidia backend here")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _count(b: dict, prefix: str) -> int:
    return sum(v for a, v in b["accesses"].items() if a.startswith(prefix))


def test_every_variant_compiled(builds):
    assert len(builds) == 2 * 8 * 3 + 2 * 2 * 2 + 11


def _merges(builds):
    return [b for b in builds if b["kernel"] != "l1"]


def test_full_blocks_load_and_store_16_byte_vectors(builds):
    for b in _merges(builds):
        name = f"{b['kernel']} K={b['k']} {b['dtype']} sparsify={b['sparsify']}"
        assert _count(b, "ld.global.v4") >= b["k"] + 1, (name, b["accesses"])  # base + K models
        assert _count(b, "st.global.v4") >= 1, (name, b["accesses"])


def test_l1_full_blocks_load_vectors(builds):
    """The l1 sums pass reads a full block without a mask: one vector per input and thread, as wide
    as the elements a thread holds (l1_launch_config: 16 bytes at K <= 2, 8 bytes at K = 3..5 in
    bf16; 4 bytes, a plain b32 that cannot be told from a scalar fp32 load, at K >= 6)."""
    l1 = [b for b in builds if b["kernel"] == "l1"]
    assert l1
    for b in l1:
        width = b["block"] // (32 * b["num_warps"]) * {"bfloat16": 2, "float16": 2, "float32": 4}[b["dtype"]]
        name = f"l1 K={b['k']} {b['dtype']}"
        if width >= 8:
            assert _count(b, f"ld.global.v{width // 4}") >= b["k"] + 1, (name, width, b["accesses"])


def test_register_ceiling_without_spills(builds):
    """ptxas keeps every variant within ``maxnreg`` (fp16 at K = 8 would take ~155 registers
    uncapped) without spilling to local memory."""
    if any(b["registers"] is None for b in builds):
        pytest.skip("cuobjdump is not shipped with this triton")
    worst = max(builds, key=lambda b: b["registers"])
    assert worst["registers"] <= MAX_REGISTERS, worst
    assert all(b["spill_bytes"] == 0 for b in builds), [b for b in builds if b["spill_bytes"]]
