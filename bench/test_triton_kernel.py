"""GPU benchmarks of the fused Triton kernel (skipped without a CUDA GPU; nothing here ran yet).

    python -m pytest bench/test_triton_kernel.py --benchmark-disable -q -s

- kernel throughput: K = 2, 3, 4, 8 bf16 sources, 1M..500M elements, dare_ties / ties /
  task_arithmetic with mergekit's default options (dare_ties: the l1 rescale, which needs the sums
  pass; ties: the exact cut, three select passes), and dare_ties with the 1/p rescale;
  ``triton.testing.do_bench`` medians with 20/80% quantiles; GB/s counts (K + 1) inputs read + 1
  output written per merge pass, and is reported as a fraction of the device's measured copy
  bandwidth (a 1 GiB device-to-device copy timed the same way);
- the launch configurations around ``fused_ta.launch_config`` (BLOCK x num_warps) per K and dtype;
- a 3-source 7B-shaped model (Llama-2-7B tensor shapes, random bf16 weights made on the device)
  merged by the grouped launch: the in-memory merge time of DESIGN section 5 (target < 100 ms).
Results go to $FASTMERGE_BENCH_OUT (default bench/results) as triton_kernel_<gpu>.csv and .png.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import triton  # noqa: E402
from fastmerge.kernels import fused_ta  # noqa: E402
from fastmerge.kernels.fused_ta_grouped import grouped_fused_merge  # noqa: E402

from fastmerge.spec import FusedOptions  # noqa: E402

RESULTS = Path(os.environ.get("FASTMERGE_BENCH_OUT") or Path(__file__).resolve().parent / "results")
METHODS = {  # mergekit's defaults, as fastmerge's method declarations give them
    "dare_ties": dict(sparsify="random", consensus="sum", rescale="l1", normalize=False),
    "ties": dict(sparsify="magnitude", consensus="sum", rescale="none", normalize=True),
    "task_arithmetic": dict(sparsify="none", consensus="none", rescale="none", normalize=False),
    "dare_ties_inverse": dict(sparsify="random", consensus="sum", rescale="inverse", normalize=False),
}
SIZES = (1 << 20, 1 << 24, 1 << 27, 500_000_000)
ROWS: list[dict] = []
FIELDS = ["gpu", "what", "method", "k", "elements", "median_ms", "p20_ms", "p80_ms", "gb_per_s", "fraction_of_copy",
          "copy_gb_per_s"]


def gpu_name() -> str:
    return torch.cuda.get_device_name()


def _csv_path() -> Path:
    tag = re.sub(r"[^A-Za-z0-9]+", "_", gpu_name()).strip("_").lower()
    return RESULTS / f"triton_kernel_{tag}.csv"


def record(row: dict) -> None:
    """Keep a measured row, and append it to the CSV at once: a run stopped at its time limit keeps
    what it measured."""
    ROWS.append(row)
    path = _csv_path()
    RESULTS.mkdir(parents=True, exist_ok=True)
    new = len(ROWS) == 1
    with open(path, "w" if new else "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerow(row)


@pytest.fixture(scope="module")
def copy_gbps() -> float:
    n = 1 << 29  # 1 GiB of bf16
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src))
    return 2 * n * 2 / (ms * 1e-3) / 1e9


def _opts(k: int, method: str) -> FusedOptions:
    return FusedOptions(weights=tuple(0.3 + 0.1 * i for i in range(k)), densities=tuple(0.5 for _ in range(k)),
                        seed=0, **METHODS[method])


def _llama7b_shapes() -> list[tuple[str, tuple[int, ...]]]:
    h, inter, vocab = 4096, 11008, 32000
    shapes = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(32):
        p = f"model.layers.{i}."
        shapes += [(p + f"self_attn.{x}_proj.weight", (h, h)) for x in "qkvo"]
        shapes += [(p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
                   (p + "mlp.down_proj.weight", (h, inter))]
        shapes += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    return shapes + [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]


@pytest.mark.parametrize("method", ["dare_ties", "ties", "task_arithmetic"])
def test_grouped_7b_in_memory(method, copy_gbps):
    shapes = _llama7b_shapes()
    numel = sum(int(torch.Size(s).numel()) for _, s in shapes)
    if 5 * numel * 2 > 0.9 * torch.cuda.get_device_properties(0).total_memory:
        pytest.skip("a 3-source 7B-shaped merge does not fit")
    items = []
    for name, shape in shapes:
        base = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        xs = [base + 0.01 * torch.randn_like(base) for _ in range(3)]
        items.append((base, xs, _opts(3, method), name, torch.empty_like(base)))
    ms, lo, hi = triton.testing.do_bench(lambda: grouped_fused_merge(items), quantiles=[0.5, 0.2, 0.8])
    gbps = 5 * numel * 2 / (ms * 1e-3) / 1e9
    record({"gpu": gpu_name(), "what": "grouped_7b", "method": method, "k": 3, "elements": numel,
                 "median_ms": round(ms, 2), "p20_ms": round(lo, 2), "p80_ms": round(hi, 2),
                 "gb_per_s": round(gbps, 1), "fraction_of_copy": round(gbps / copy_gbps, 3),
                 "copy_gb_per_s": round(copy_gbps, 1)})


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("k", [2, 3, 4, 8])
@pytest.mark.parametrize("n", SIZES)
def test_kernel_bandwidth(method, k, n, copy_gbps):
    torch.cuda.empty_cache()  # the previous case's tensors are gone with its frame
    need = (k + 2) * n * 2
    if need > 0.8 * torch.cuda.get_device_properties(0).total_memory:
        pytest.skip("does not fit")
    base = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    xs = [base + 0.01 * torch.randn_like(base) for _ in range(k)]
    out = torch.empty_like(base)
    opts = _opts(k, method)
    ms, lo, hi = triton.testing.do_bench(lambda: fused_ta.fused_merge(base, xs, opts, "w", torch.bfloat16, out=out),
                                         quantiles=[0.5, 0.2, 0.8])
    gbps = (k + 2) * n * 2 / (ms * 1e-3) / 1e9
    record({"gpu": gpu_name(), "what": "kernel", "method": method, "k": k, "elements": n,
                 "median_ms": round(ms, 4), "p20_ms": round(lo, 4), "p80_ms": round(hi, 4),
                 "gb_per_s": round(gbps, 1), "fraction_of_copy": round(gbps / copy_gbps, 3),
                 "copy_gb_per_s": round(copy_gbps, 1)})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("k", [2, 4, 8])
def test_launch_config_sweep(k, dtype, copy_gbps):
    """dare_ties (l1) at 2**27 elements in the default configuration and its neighbours."""
    torch.cuda.empty_cache()
    n = 1 << 27
    base = torch.randn(n, device="cuda", dtype=dtype)
    xs = [base + 0.01 * torch.randn_like(base) for _ in range(k)]
    out = torch.empty_like(base)
    opts = _opts(k, "dare_ties_inverse")  # no sums pass: the merge kernel alone
    default = fused_ta.launch_config(k, dtype)
    size = torch.finfo(dtype).bits // 8
    for block, warps in sorted({default, (512, 4), (1024, 4), (2048, 4), (1024, 8), (2048, 8), (4096, 8)}):
        ms, lo, hi = triton.testing.do_bench(
            lambda b=block, w=warps: fused_ta.fused_merge(base, xs, opts, "w", dtype, out=out, block=b, num_warps=w),
            quantiles=[0.5, 0.2, 0.8])
        gbps = (k + 2) * n * size / (ms * 1e-3) / 1e9
        record({"gpu": gpu_name(), "what": f"config{'*' if (block, warps) == default else ''}",
                     "method": f"dare_ties_inverse {str(dtype)[6:]} block={block} warps={warps}", "k": k,
                     "elements": n, "median_ms": round(ms, 4), "p20_ms": round(lo, 4), "p80_ms": round(hi, 4),
                     "gb_per_s": round(gbps, 1), "fraction_of_copy": round(gbps / copy_gbps, 3),
                     "copy_gb_per_s": round(copy_gbps, 1)})


def test_zz_plot():
    """The PNG beside the CSV (the rows are written as they are measured)."""
    if not ROWS:
        pytest.skip("nothing measured")
    path = _csv_path()
    matplotlib = pytest.importorskip("matplotlib")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for method in METHODS:
        for k in (2, 8):
            pts = [(r["elements"], r["gb_per_s"]) for r in ROWS if r["what"] == "kernel" and r["method"] == method
                   and r["k"] == k]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{method} K={k}")
    ax.axhline(ROWS[0]["copy_gb_per_s"], color="gray", linestyle="--", label="device copy")
    ax.set_xscale("log")
    ax.set_xlabel("elements per tensor")
    ax.set_ylabel("GB/s")
    ax.set_title(f"fused kernel, bf16 ({gpu_name()})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)
