"""DFS executor vs a materialized model: forward and greedy-decode time, and memory, at a few path
lengths (issue 4's targets: time within 10% of the materialized model's, memory not growing with
repeated hops beyond the KV cache).

Both run the same layers on the same inputs: the materialized model is the path deep-copied into a
plain HF model (``fastmerge.dfs.materialize``). Memory is measured in a fresh subprocess per
(model, path length): peak RSS after building the model and running forward + decode, and the
bytes of distinct parameter storage.

    python bench/bench_dfs.py [--hidden 512 --layers 8 --lengths 8 16 32 --reps 5]
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_evolve import cpu_name  # the bench scripts' one CPU-name reader

RESULTS = Path(__file__).parent / "results"


def _models(hidden: int, layers: int, vocab: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 8 * 8, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=max(hidden // 256, 1), vocab_size=vocab,
                      max_position_embeddings=1024)
    torch.manual_seed(0)
    return [AutoModelForCausalLM.from_config(cfg).eval() for _ in range(2)]


def _path(length: int, layers: int):
    """A path of the given length over two models: both models' layers, repeated, non-unit scales."""
    from fastmerge.dfs import LayerPath

    hops = [(0, 0, 1.0)]
    for i in range(1, length - 1):
        hops.append((i % 2, (i // 2) % layers, 1.0 if i % 3 else 0.9))
    hops.append((0, layers - 1, 1.0))
    return LayerPath(hops[:length])


def _build(kind: str, models, path):
    from fastmerge.dfs import PathModel, materialize

    return PathModel(models, path).eval() if kind == "path" else materialize(models, path)


def _decode(model, ids, steps: int):
    from transformers import DynamicCache

    from fastmerge.hf_compat import cache_kwarg

    cache = DynamicCache()
    kw = {cache_kwarg(type(model).forward): cache}
    out = model(input_ids=ids, use_cache=True, **kw)
    nxt = out.logits[:, -1:].argmax(-1)
    for _ in range(steps - 1):
        out = model(input_ids=nxt, use_cache=True, **kw)
        nxt = out.logits[:, -1:].argmax(-1)
    return cache


def measure_memory(kind: str, hidden: int, layers: int, vocab: int, length: int, batch: int, seq: int,
                   steps: int) -> dict:
    """Run in a fresh process: peak RSS of sources + model + forward + decode."""
    models = _models(hidden, layers, vocab)
    model = _build(kind, models, _path(length, layers))
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(ids)
        cache = _decode(model, ids, steps)
    storage = {p.data_ptr(): p.numel() * p.element_size() for m in [*models, model] for p in m.parameters()}
    kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return {"peak_rss_mb": _peak_rss_mb(),
            "param_storage_mb": sum(storage.values()) / 2**20, "kv_cache_mb": kv / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8, help="layers per source model (two sources)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32, help="greedy decode steps")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--memory-child", nargs=2, metavar=("KIND", "LENGTH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        kind, length = args.memory_child[0], int(args.memory_child[1])
        print(json.dumps(measure_memory(kind, args.hidden, args.layers, args.vocab, length, args.batch, args.seq,
                                        args.steps)))
        return

    models = _models(args.hidden, args.layers, args.vocab)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    rows = []
    for length in args.lengths:
        path = _path(length, args.layers)
        row = {"path_length": length, "unique_layers": len(path.unique_layers())}
        built = {kind: _build(kind, models, path) for kind in ("path", "materialized")}
        # alternate the two models rep by rep, so load changes on the machine hit both alike
        times: dict[str, list[float]] = {f"{k}_{w}": [] for k in built for w in ("forward", "decode")}
        with torch.inference_mode():
            for model in built.values():  # warm-up
                model(ids)
                _decode(model, ids, args.steps)
            for _ in range(args.reps):
                for kind, model in built.items():
                    t = time.perf_counter()
                    model(ids)
                    times[f"{kind}_forward"].append(time.perf_counter() - t)
                    t = time.perf_counter()
                    _decode(model, ids, args.steps)
                    times[f"{kind}_decode"].append(time.perf_counter() - t)
        for key, ts in times.items():
            row[f"{key}_s"] = statistics.median(ts)
        del built
        for kind in ("path", "materialized"):
            child = subprocess.run([sys.executable, __file__, "--memory-child", kind, str(length),
                                    "--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab",
                                    str(args.vocab), "--batch", str(args.batch), "--seq", str(args.seq), "--steps",
                                    str(args.steps)] + (["--threads", str(args.threads)] if args.threads else []),
                                   capture_output=True, text=True, check=True)
            for k, v in json.loads(child.stdout.strip().splitlines()[-1]).items():
                row[f"{kind}_{k}"] = v
        row["forward_ratio"] = row["path_forward_s"] / row["materialized_forward_s"]
        row["decode_ratio"] = row["path_decode_s"] / row["materialized_decode_s"]
        rows.append(row)
        print(f"len {length:3d}: forward {row['path_forward_s'] * 1e3:7.1f} ms vs {row['materialized_forward_s'] * 1e3:7.1f} "
              f"({row['forward_ratio']:.3f}x)  decode {row['path_decode_s'] * 1e3:7.1f} vs "
              f"{row['materialized_decode_s'] * 1e3:7.1f} ms ({row['decode_ratio']:.3f}x)  params "
              f"{row['path_param_storage_mb']:.0f} vs {row['materialized_param_storage_mb']:.0f} MB  peak RSS "
              f"{row['path_peak_rss_mb']:.0f} vs {row['materialized_peak_rss_mb']:.0f} MB  KV "
              f"{row['path_kv_cache_mb']:.1f} MB", flush=True)

    machine = {"cpu": cpu_name(), "cores": torch.get_num_threads(), "torch": torch.__version__,
               "python": platform.python_version()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dfs_cpu.json").write_text(json.dumps({"machine": machine, "args": vars(args), "rows": rows},
                                                     indent=1) + "\n")
    with open(RESULTS / "dfs_cpu.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {RESULTS / 'dfs_cpu.json'} and .csv ({machine['cpu']}, {machine['cores']} threads)")


def _peak_rss_mb() -> float:
    """VmHWM of this process: unlike ru_maxrss, it starts afresh at exec, so a child does not
    inherit the parent's peak (the parent holds the materialized models of earlier rows)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    main()
