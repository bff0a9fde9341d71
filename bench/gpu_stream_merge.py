"""Streaming merges of the 245M bf16 family on a GPU (``fastmerge merge --device cuda``) against
the same merges on the machine's CPU cores (the fused C loop), alternately, each its own process.

    python bench/gpu_stream_merge.py --out DIR [--reps 3] [--size 250m|tiny] [--devices cuda,cpu]

Writes DIR/stream_merge.csv (one row per run) and prints medians. ``--size tiny --devices cpu``
runs anywhere (how the script is checked without a GPU). Part of bench/gpu_check.sh.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.compare_mergekit import count_params, ensure_family, write_recipes  # noqa: E402

METHODS = ("dare_ties", "ties", "task_arithmetic")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size", choices=["250m", "tiny"], default="250m")
    ap.add_argument("--devices", default="cuda,cpu")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/fastmerge-gpu-bench"))
    args = ap.parse_args(argv)
    if "cuda" in args.devices.split(","):
        import torch

        if not torch.cuda.is_available():
            # `fastmerge merge --device cuda` falls back to the CPU with a warning: a "cuda" row would be a CPU time
            print("gpu_stream_merge: no CUDA GPU here; pass --devices cpu", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    models = ensure_family(args.workdir, args.size)
    elements, nbytes = count_params(models[0])
    recipes = write_recipes(args.workdir, models, METHODS)
    rows = []
    for rep in range(args.reps):
        for method in METHODS:
            for device in args.devices.split(","):
                target = args.workdir / f"out-{method}-{device}"
                cmd = [sys.executable, "-m", "fastmerge", "merge", str(recipes[method]), str(target), "--force",
                       "--device", device]
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"PYTHONWARNINGS": "ignore"})
                seconds = time.perf_counter() - t0
                if proc.returncode:
                    print(proc.stderr[-2000:], file=sys.stderr)
                    return proc.returncode
                rows.append({"method": method, "device": device, "rep": rep, "seconds": round(seconds, 3),
                             "elements_per_model": elements, "bytes_per_model": nbytes, "models_read": len(models)})
                print(f"{method:16s} {device:5s} rep {rep}: {seconds:.2f} s", flush=True)
    with open(args.out / "stream_merge.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    for method in METHODS:
        meds = {d: statistics.median(r["seconds"] for r in rows if r["method"] == method and r["device"] == d)
                for d in args.devices.split(",")}
        print(method, "medians:", ", ".join(f"{d} {s:.2f} s" for d, s in meds.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
