"""Side-by-side: mergekit vs fastmerge on identical recipes and identical local models (DESIGN.md 10).

    python bench/compare_mergekit.py [--reps N] [--workdir DIR] [--size 250m|tiny]

What it does:
  1. makes (once, cached in the workdir) a base + 3 fine-tunes of a ~250M-parameter Llama config in
     bf16, sharded safetensors (``--size tiny``: a tiny family for a smoke run);
  2. writes one mergekit-schema recipe per method (dare_ties, ties), run unchanged by both tools;
  3. runs ``mergekit-yaml RECIPE OUT`` and ``fastmerge merge RECIPE OUT --force --no-progress``
     alternately as child processes, ``--reps`` times each, timing the wall clock of each child and
     its peak RSS (the kernel's high-water mark, read by a one-child wrapper process through
     ``getrusage(RUSAGE_CHILDREN)``; plus the process tree's summed RSS polled every 20 ms);
  4. measures the I/O floor: reading every byte of every input tensor of the 4 models through
     safetensors' maps (copied into one reused buffer, as a merge reads them) and writing an output
     of the same size with ``safetensors.torch.save_file``, nothing else; and, for reference, the
     same with every input cloned into fresh memory (``io_floor_alloc``: the simplest safetensors
     code, which also pays ~2 GB of anonymous page faults whose cost varies with the kernel's state),
     and plain file I/O with no framework at all (``io_floor_raw``: every shard read into one
     reused buffer, the base's shards written out again; no torch import, as fastmerge's CPU merge);
  5. writes bench/results/compare_mergekit{.csv,_summary.csv,.png,.md,_machine.txt} and prints a
     Markdown table.

Page cache: the inputs are read right before every timed run, so that every run (both tools and the
floor) finds them in the page cache; caches are never dropped (both tools get a warm cache equally),
and dirty pages are synced before each run (no earlier output's writeback runs during a timed run).
Each run records the MB read from disk meanwhile (``disk_read_mb``, ~0 when the cache held) and the
CPU time other processes used (``other_cpu_s``); before each run the script waits for the CPUs to
go quiet (``--idle-wait``).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
METHODS = ("dare_ties", "ties")
WEIGHTS = (0.5, 0.3, 0.4)
DENSITIES = (0.5, 0.6, 0.7)
SEED = 0


# --------------------------------------------------------------------------------------------
# child-side helpers (run in separate processes so that their memory is theirs, not ours)
# --------------------------------------------------------------------------------------------


def _measure_main(argv: list[str]) -> int:
    """``_measure RESULT_JSON LOG -- CMD...``: run CMD as our only child, record wall time + ru_maxrss."""
    import resource

    result, log = argv[0], argv[1]
    cmd = argv[argv.index("--") + 1 :]
    with open(log, "wb") as f:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)  # only CMD (and whatever it waited for)
    Path(result).write_text(
        json.dumps(
            {
                "rc": proc.returncode,
                "seconds": seconds,
                "maxrss_kb": ru.ru_maxrss,
                "user_s": ru.ru_utime,
                "sys_s": ru.ru_stime,
            }
        )
    )
    return 0


def _iofloor_raw(out: Path, models: list[Path]) -> int:
    """Every byte of every shard read into one reused buffer, the base's shards written out again:
    plain file I/O, no framework to import (what any program must at least do)."""
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    out.mkdir(parents=True, exist_ok=True)
    read = wrote = 0
    for i, m in enumerate(models):
        for shard in sorted(m.glob("*.safetensors")):
            fd = os.open(shard, os.O_RDONLY)
            wfd = os.open(out / shard.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if i == 0 else None
            try:
                while True:
                    got = os.readv(fd, [view])
                    if got == 0:
                        break
                    read += got
                    if wfd is not None:
                        wrote += os.write(wfd, view[:got])
            finally:
                os.close(fd)
                if wfd is not None:
                    os.close(wfd)
    print(f"io floor (raw): read {read / 1e9:.3f} GB, wrote {wrote / 1e9:.3f} GB")
    return 0


def _iofloor_main(argv: list[str]) -> int:
    """``_iofloor reuse|clone|raw OUT MODEL...``: read every tensor of every model, write one
    model-sized output. ``reuse`` copies each input into one reused buffer (the base's tensors stay
    mapped and save_file reads them); ``clone`` copies every input into fresh memory; ``raw`` reads
    and writes the files' bytes without safetensors or torch."""
    if argv[0] == "raw":
        return _iofloor_raw(Path(argv[1]), [Path(m) for m in argv[2:]])
    import torch
    from safetensors.torch import load_file, save_file

    mode, out, models = argv[0], Path(argv[1]), [Path(m) for m in argv[2:]]
    keep = {}
    read = 0
    buf = torch.empty(0, dtype=torch.uint8)
    for i, m in enumerate(models):
        for shard in sorted(m.glob("*.safetensors")):
            # load_file maps the file lazily: a copy makes the read real (every byte through the page
            # cache, as any merge must); without it the fine-tunes' pages would never be touched
            for name, t in load_file(shard).items():
                read += t.numel() * t.element_size()
                if mode == "clone":
                    t = t.clone()
                elif i > 0:
                    b = t.reshape(-1).view(torch.uint8)
                    if buf.numel() < b.numel():
                        buf = torch.empty(b.numel(), dtype=torch.uint8)
                    buf[: b.numel()].copy_(b)
                if i == 0:  # the base's tensors are the output (same names, shapes, dtypes)
                    keep[name] = t
    out.mkdir(parents=True, exist_ok=True)
    save_file(keep, out / "model.safetensors", metadata={"format": "pt"})
    wrote = sum(t.numel() * t.element_size() for t in keep.values())
    print(f"io floor: read {read / 1e9:.3f} GB, wrote {wrote / 1e9:.3f} GB")
    return 0


# --------------------------------------------------------------------------------------------
# models, recipes, machine
# --------------------------------------------------------------------------------------------


def model_spec(size: str):
    import torch

    from fastmerge.synth import ModelSpec

    if size == "250m":
        spec = ModelSpec(
            arch="llama",
            hidden=1024,
            layers=14,
            intermediate=2816,
            heads=16,
            kv_heads=16,
            vocab=32000,
            dtype=torch.bfloat16,
        )
        return spec, "200MB"
    spec = ModelSpec(
        arch="llama", hidden=128, layers=4, intermediate=352, heads=4, kv_heads=4, vocab=1000, dtype=torch.bfloat16
    )
    return spec, "300KB"


def count_params(model_dir: Path) -> tuple[int, int]:
    """(elements, bytes) of all tensors of a checkpoint, from its safetensors headers."""
    from fastmerge.io import CheckpointReader

    r = CheckpointReader(model_dir)
    return sum(m.numel for m in r.tensors.values()), sum(m.nbytes for m in r.tensors.values())


def ensure_family(workdir: Path, size: str) -> list[Path]:
    spec, shard = model_spec(size)
    root = workdir / f"models-{size}"
    stamp = root / "family.json"
    key = {"spec": {k: str(v) for k, v in vars(spec).items()}, "shard_size": shard, "finetunes": 3, "seed": 0}
    names = ["base", "ft0", "ft1", "ft2"]
    if stamp.exists() and json.loads(stamp.read_text()) == key:
        return [root / n for n in names]
    print(f"generating {size} family under {root} ...", flush=True)
    if root.exists():
        shutil.rmtree(root)
    # in a child process so that the generation's memory never mixes with ours
    code = (
        "import sys, warnings; warnings.filterwarnings('ignore'); sys.path.insert(0, sys.argv[1]);"
        "import bench.compare_mergekit as b; from fastmerge.synth import make_family;"
        "spec, shard = b.model_spec(sys.argv[2]);"
        "make_family(sys.argv[3], spec, finetunes=3, seed=0, shard_size=shard)"
    )
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(REPO), size, str(root)], check=True, cwd=REPO)
    stamp.write_text(json.dumps(key))
    print(f"  made in {time.perf_counter() - t0:.0f} s", flush=True)
    return [root / n for n in names]


#: per-model parameters written for each method (mergekit's names); methods not listed take none
PER_MODEL: dict[str, tuple[str, ...]] = {
    "dare_ties": ("weight", "density"), "ties": ("weight", "density"), "della": ("weight", "density"),
    "della_linear": ("weight", "density"), "breadcrumbs": ("weight", "density"),
    "breadcrumbs_ties": ("weight", "density"), "nuslerp": ("weight",), "task_arithmetic": ("weight",),
}
#: global parameters written for each method (sce: select half the elements, so its select runs)
GLOBAL: dict[str, dict[str, float]] = {"della": {"epsilon": 0.05}, "della_linear": {"epsilon": 0.05},
                                       "sce": {"select_topk": 0.5}}
#: how many fine-tunes a method takes (nuslerp: exactly two)
MAX_MODELS = {"nuslerp": 2}


def write_recipes(workdir: Path, models: list[Path], methods: list[str] | tuple[str, ...] = METHODS) -> dict[str, Path]:
    """One mergekit-schema recipe per method over the same models (base + fine-tunes), bf16."""
    base, fts = models[0], models[1:]
    recipes = {}
    for method in methods:
        lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
        values = {"weight": WEIGHTS, "density": DENSITIES}
        for i, m in enumerate(fts[: MAX_MODELS.get(method, len(fts))]):
            lines.append(f"  - model: {m}")
            params = PER_MODEL.get(method, ())
            if params:
                lines.append("    parameters:")
                lines += [f"      {p}: {values[p][i]}" for p in params]
        if GLOBAL.get(method):
            lines.append("parameters:")
            lines += [f"  {k}: {v}" for k, v in GLOBAL[method].items()]
        lines += ["dtype: bfloat16", ""]
        path = workdir / f"recipe-{method}.yaml"
        path.write_text("\n".join(lines))
        recipes[method] = path
    return recipes


def machine_info() -> dict[str, str]:
    import psutil
    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        fam = {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in lscpu.splitlines() if ":" in ln)}
        extra = ", ".join(f"{k} {fam[k]}" for k in ("CPU family", "Model", "Hypervisor vendor") if k in fam)
        if extra:
            cpu = f"{cpu} ({extra})"
    except OSError:
        pass
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        pass
    simd = " ".join(x for x in ("avx2", "avx512f", "avx512_bf16") if f" {x} " in f" {flags.split(':')[-1]} ")

    def version(dist: str) -> str:
        try:
            from importlib.metadata import version as v

            return v(dist)
        except Exception:  # noqa: BLE001
            return "not installed"

    import fastmerge

    gpu = "none"
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    disk = shutil.disk_usage("/tmp")
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "fastmerge", "kernels"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "simd": simd,
        "c_loop": fastmerge_cpu_isa(),
        "cores": f"{psutil.cpu_count(logical=False)} physical / {psutil.cpu_count()} logical "
        f"(affinity {len(os.sched_getaffinity(0))})",
        "ram": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "gpu": gpu,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": str(torch.get_num_threads()),
        "mergekit": version("mergekit"),
        "transformers": version("transformers"),
        "safetensors": version("safetensors"),
        "fastmerge": f"{fastmerge.__version__} (git {git.stdout.strip() or '?'}"
        f"{', fastmerge/ has uncommitted changes' if dirty else ''}; {Path(fastmerge.__file__).parent})",
        "tmp_disk_free": f"{disk.free / 2**30:.0f} GiB",
        "page_cache": (
            "warm for every run: inputs re-read right before each run, never dropped "
            f"(/proc/sys/vm/drop_caches {'writable' if os.access('/proc/sys/vm/drop_caches', os.W_OK) else 'not writable'}, "
            "deliberately unused: both tools get the same warm cache); dirty pages synced before each run"
        ),
        "damon": _damon(),
    }


def fastmerge_cpu_isa() -> str:
    """The fused C loop's vector path (avx512 / avx2 / generic): it is several times faster on the
    wider ones, so a figure means little without it."""
    from fastmerge import cpu

    return cpu.isa() or f"unavailable ({cpu._failure})"


def _damon() -> str:
    """Whether a DAMON pageout scheme reclaims idle memory (it evicts page cache idle for a minute)."""
    root = Path("/sys/kernel/mm/damon/admin/kdamonds")
    try:
        states = [(d / "state").read_text().strip() for d in root.iterdir() if (d / "state").exists()]
        actions = [a.read_text().strip() for a in root.glob("*/contexts/*/schemes/*/action")]
    except OSError:
        return "unknown"
    if "on" not in states:
        return "off"
    return f"on (schemes: {', '.join(actions) or 'none'}): idle page cache may be paged out"


def prewarm(paths: list[Path]) -> None:
    """Read every input file once so that all timed runs start from the same (warm) page cache."""
    for p in paths:
        for f in sorted(p.iterdir()):
            if f.is_file():
                with open(f, "rb") as fh:
                    while fh.read(1 << 24):
                        pass


# --------------------------------------------------------------------------------------------
# running and measuring children
# --------------------------------------------------------------------------------------------


def _busy_cpu_s() -> float:
    """Non-idle CPU seconds of the whole machine so far (all cores; steal included)."""
    import psutil

    t = psutil.cpu_times()
    return sum(v for k, v in t._asdict().items() if k not in ("idle", "iowait", "guest", "guest_nice"))


def _disk_read_kb() -> int:
    """KiB read from block devices so far (vmstat pgpgin): a run that hit the page cache reads ~0."""
    try:
        with open("/proc/vmstat") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("pgpgin "))
    except (OSError, StopIteration):
        return 0


def wait_idle(limit: float) -> float:
    """Wait (up to ``limit`` s) until other processes leave the CPUs alone; returns the seconds waited.

    Other work on a 2-core machine (a test run, a build) would be charged to whichever tool runs
    beside it; each run also records the CPU time others used during it (``other_cpu_s``).
    """
    import psutil

    t0 = time.perf_counter()
    quiet = 0
    while time.perf_counter() - t0 < limit:
        quiet = quiet + 1 if psutil.cpu_percent(interval=0.5) < 10.0 else 0
        if quiet >= 3:
            break
    return time.perf_counter() - t0


def measured(cmd: list[str], workdir: Path, env: dict[str, str], label: str) -> dict:
    """Run cmd (through the one-child wrapper) and return wall time, peak RSS and its output."""
    import psutil

    res = workdir / f".measure-{label}.json"
    log = workdir / f".measure-{label}.log"
    res.unlink(missing_ok=True)
    busy0 = _busy_cpu_s()
    disk0 = _disk_read_kb()
    wrapper = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "_measure", str(res), str(log), "--", *cmd], env=env, cwd=REPO
    )
    tree_peak = 0
    procs: list = []
    try:
        w = psutil.Process(wrapper.pid)
        polls = 0
        while wrapper.poll() is None:
            # the tool and anything it spawns, not the wrapper; the (costly) tree walk only every
            # 0.5 s, the (cheap) RSS reads every 20 ms, so that polling takes little CPU from the tool
            if polls % 25 == 0:
                try:
                    procs = w.children(recursive=True)
                except psutil.Error:
                    pass
            polls += 1
            total = 0
            for c in procs:
                try:
                    total += c.memory_info().rss
                except psutil.Error:
                    pass
            tree_peak = max(tree_peak, total)
            time.sleep(0.02)
    finally:
        wrapper.wait()
    busy = _busy_cpu_s() - busy0
    out_disk = _disk_read_kb() - disk0
    out = json.loads(res.read_text())
    out["other_cpu_s"] = max(0.0, busy - out["user_s"] - out["sys_s"])
    out["disk_read_mb"] = out_disk / 1024
    out["tree_peak_mb"] = tree_peak / 2**20
    out["peak_rss_mb"] = out["maxrss_kb"] / 1024
    out["log"] = log.read_text(errors="replace")
    if out["rc"] != 0:
        sys.stderr.write(out["log"][-4000:])
        raise SystemExit(f"{label}: {' '.join(cmd)} failed with exit code {out['rc']}")
    return out


def commands(tool: str, recipe: Path, out: Path, models: list[Path]) -> list[str]:
    if tool == "mergekit":
        # the script beside this interpreter (a PATH lookup may find a version manager's shim,
        # which would add its own start-up to mergekit's time)
        local = Path(sys.executable).parent / "mergekit-yaml"
        exe = str(local) if local.exists() else shutil.which("mergekit-yaml")
        if exe is None:
            raise SystemExit("mergekit-yaml not found: pip install mergekit")
        # CPU (no --cuda), no tokenizer to copy, same seed; defaults otherwise (what a user runs)
        return [
            exe,
            str(recipe),
            str(out),
            "--no-copy-tokenizer",
            "--lazy-unpickle",
            "--quiet",
            "--random-seed",
            str(SEED),
        ]
    if tool == "fastmerge":
        # the fastmerge CLI of the checkout this script lives in (PYTHONPATH), whatever is installed
        return [
            sys.executable,
            "-m",
            "fastmerge",
            "merge",
            str(recipe),
            str(out),
            "--force",
            "--no-progress",
            "--seed",
            str(SEED),
        ]
    if tool == "startup":
        return [sys.executable, "-c", "import torch, safetensors.torch"]
    mode = {"io_floor_alloc": "clone", "io_floor_raw": "raw"}.get(tool, "reuse")
    return [sys.executable, str(Path(__file__).resolve()), "_iofloor", mode, str(out), *map(str, models)]


def compare_outputs(mk: Path, fm: Path, base: Path) -> str:
    """How far apart the two tools' outputs are (a sanity check that both did the same merge)."""
    from safetensors import safe_open

    def tensors(d: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(f, "pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    a, b, z = tensors(mk), tensors(fm), tensors(base)
    if set(a) != set(b):
        return f"tensor names differ: only mergekit {sorted(set(a) - set(b))[:3]}, only fastmerge {sorted(set(b) - set(a))[:3]}"
    n = diff = 0
    num = den = 0.0
    for k in sorted(a):
        with safe_open(a[k], "pt") as h:
            x = h.get_tensor(k).float()
        with safe_open(b[k], "pt") as h:
            y = h.get_tensor(k).float()
        with safe_open(z[k], "pt") as h:
            t0 = h.get_tensor(k).float()
        n += x.numel()
        diff += int((x != y).sum())
        num += float(((x - y) ** 2).sum())
        den += float(((x - t0) ** 2).sum())
    return (
        f"{len(a)} tensors, {diff / n:.2%} of elements differ, "
        f"||fm - mk|| / ||mk - base|| = {(num / max(den, 1e-30)) ** 0.5:.4f}"
    )


# --------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------


def med(rows: list[dict], tool: str, method: str, key: str) -> float:
    vals = [r[key] for r in rows if r["tool"] == tool and r["method"] == method]
    return statistics.median(vals) if vals else float("nan")


def summarize(rows: list[dict], methods: list[str]) -> list[dict]:
    out = []
    for m in methods:
        mk, fm = med(rows, "mergekit", m, "seconds"), med(rows, "fastmerge", m, "seconds")
        io = med(rows, "io_floor", "io", "seconds")
        io_alloc = med(rows, "io_floor_alloc", "io", "seconds")
        io_raw = med(rows, "io_floor_raw", "io", "seconds")
        io_min = min(r["seconds"] for r in rows if r["tool"] == "io_floor")
        mk_rss, fm_rss = med(rows, "mergekit", m, "peak_rss_mb"), med(rows, "fastmerge", m, "peak_rss_mb")
        out.append(
            {
                "method": m,
                "reps": sum(1 for r in rows if r["tool"] == "fastmerge" and r["method"] == m),
                "mergekit_s": round(mk, 3),
                "fastmerge_s": round(fm, 3),
                "fastmerge_internal_s": round(med(rows, "fastmerge", m, "internal_s"), 3),
                "io_floor_s": round(io, 3),
                "io_floor_min_s": round(io_min, 3),
                "io_floor_alloc_s": round(io_alloc, 3),
                "io_floor_raw_s": round(io_raw, 3),
                "speedup_mergekit_over_fastmerge": round(mk / fm, 2),
                "fastmerge_over_io_floor": round(fm / io, 2),
                "fastmerge_over_io_floor_min": round(fm / io_min, 2),
                "mergekit_over_io_floor": round(mk / io, 2),
                "fastmerge_over_io_floor_alloc": round(fm / io_alloc, 2),
                "fastmerge_over_io_floor_raw": round(fm / io_raw, 2),
                "mergekit_rss_mb": round(mk_rss, 1),
                "fastmerge_rss_mb": round(fm_rss, 1),
                "io_floor_rss_mb": round(med(rows, "io_floor", "io", "peak_rss_mb"), 1),
                "startup_s": round(med(rows, "startup", "import", "seconds"), 3),
                "max_other_cpu_frac": max(
                    r["other_cpu_frac"] for r in rows if (r["tool"], r["method"]) in (("mergekit", m), ("fastmerge", m))
                ),
                "rss_ratio_mergekit_over_fastmerge": round(mk_rss / fm_rss, 2),
            }
        )
    return out


def markdown(summary: list[dict]) -> str:
    head = (
        "| method | mergekit s | fastmerge s | speed-up | IO floor s | fastmerge/floor "
        "| floor with fresh copies s | fastmerge/that floor | raw-bytes floor s | fastmerge/that floor "
        "| mergekit RSS MB | fastmerge RSS MB |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summary:
        lines.append(
            f"| {s['method']} | {s['mergekit_s']:.2f} | {s['fastmerge_s']:.2f} | "
            f"{s['speedup_mergekit_over_fastmerge']:.1f}x | {s['io_floor_s']:.2f} | "
            f"{s['fastmerge_over_io_floor']:.2f}x | {s['io_floor_alloc_s']:.2f} | "
            f"{s['fastmerge_over_io_floor_alloc']:.2f}x | {s['io_floor_raw_s']:.2f} | "
            f"{s['fastmerge_over_io_floor_raw']:.2f}x | {s['mergekit_rss_mb']:.0f} | {s['fastmerge_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], summary: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [s["method"] for s in summary]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.2
    series = [
        ("mergekit", "mergekit", "#d62728"),
        ("fastmerge", "fastmerge", "#1f77b4"),
        ("io_floor", "I/O floor (safetensors)", "#7f7f7f"),
        ("io_floor_raw", "raw-bytes floor", "#bdbdbd"),
    ]
    for ax, key, ylabel in (
        (ax1, "seconds", "wall time, s (median; bars: min-max)"),
        (ax2, "peak_rss_mb", "peak RSS, MB (median)"),
    ):
        for i, (tool, label, color) in enumerate(series):
            meds, lo, hi = [], [], []
            for m in methods:
                vals = [
                    r[key] for r in rows if r["tool"] == tool and r["method"] == (m if not tool.startswith("io_") else "io")
                ]
                md = statistics.median(vals)
                meds.append(md)
                lo.append(md - min(vals))
                hi.append(max(vals) - md)
            xs = [j + (i - 1.5) * width for j in range(len(methods))]
            bars = ax.bar(xs, meds, width, label=label, color=color, yerr=[lo, hi], capsize=3)
            ax.bar_label(bars, fmt="%.1f" if key == "seconds" else "%.0f", fontsize=8, padding=2)
        ax.set_xticks(range(len(methods)), methods)
        ax.set_ylabel(ylabel)
        ax.margins(y=0.15)
    ax1.legend(loc="upper right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_measure"]:
        return _measure_main(argv[1:])
    if argv[:1] == ["_iofloor"]:
        return _iofloor_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3, help="runs of each tool per method (default 3)")
    ap.add_argument(
        "--workdir",
        type=Path,
        default=Path("/tmp/fastmerge-bench"),
        help="models, recipes and outputs (default /tmp/fastmerge-bench)",
    )
    ap.add_argument("--size", choices=["250m", "tiny"], default="250m", help="model family (default 250m)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default dare_ties,ties)")
    ap.add_argument(
        "--idle-wait",
        type=float,
        default=120.0,
        help="before each run, wait up to this many seconds for other processes to go quiet (default 120)",
    )
    ap.add_argument(
        "--results",
        type=Path,
        default=None,
        help="where CSV/PNG go (default bench/results for 250m, WORKDIR/results-tiny for tiny)",
    )
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    results = args.results or (HERE / "results" if args.size == "250m" else workdir / "results-tiny")
    results.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))

    models = ensure_family(workdir, args.size)
    params, nbytes = count_params(models[0])
    print(
        f"models: {args.size} Llama, {params / 1e6:.1f}M parameters, {nbytes / 1e6:.0f} MB per model (bf16), "
        f"{len(list(models[0].glob('*.safetensors')))} shards each",
        flush=True,
    )
    recipes = write_recipes(workdir, models, methods)
    info = machine_info()
    info["models"] = (
        f"llama {args.size}: {params / 1e6:.1f}M params, base + 3 fine-tunes, bf16, {nbytes / 1e6:.0f} MB each"
    )
    for k, v in info.items():
        print(f"  {k}: {v}")

    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONWARNINGS"] = "ignore"
    # one-off costs outside the timed runs: fastmerge's C loop build (cached per machine) and the page cache
    subprocess.run([sys.executable, "-c", "from fastmerge import cpu; cpu.library()"], env=env, check=True, cwd=REPO)
    prewarm(models)

    outs = workdir / "out"
    rows: list[dict] = []
    ncpu = len(os.sched_getaffinity(0))
    checks: dict[str, str] = {}

    def run(tool: str, method: str, rep: int) -> None:
        out = outs / f"{tool}-{method}"
        if out.exists():
            shutil.rmtree(out)
        cmd = commands(tool, recipes.get(method, Path()), out, models)
        waited = wait_idle(args.idle_wait)
        prewarm(models)  # right before every run: the kernel may page out cache left idle (e.g. DAMON reclaim)
        os.sync()  # no writeback of an earlier run's output competes with this one
        r = measured(cmd, workdir, env, f"{tool}-{method}")
        internal = float("nan")
        m = re.search(r"in ([0-9.]+) s \(", r["log"])
        if tool == "fastmerge" and m:
            internal = float(m.group(1))
        rows.append(
            {
                "tool": tool,
                "method": method,
                "rep": rep,
                "seconds": round(r["seconds"], 3),
                "peak_rss_mb": round(r["peak_rss_mb"], 1),
                "tree_peak_rss_mb": round(r["tree_peak_mb"], 1),
                "user_s": round(r["user_s"], 2),
                "sys_s": round(r["sys_s"], 2),
                "internal_s": internal,
                "other_cpu_s": round(r["other_cpu_s"], 2),
                "other_cpu_frac": round(r["other_cpu_s"] / (r["seconds"] * ncpu), 3),
                "idle_wait_s": round(waited, 1),
                "disk_read_mb": round(r["disk_read_mb"], 1),
            }
        )
        print(
            f"  rep {rep} {tool:9s} {method:9s} {r['seconds']:8.2f} s  peak RSS {r['peak_rss_mb']:7.0f} MB "
            f"(tree poll {r['tree_peak_mb']:.0f} MB)  user {r['user_s']:.1f} s sys {r['sys_s']:.1f} s  "
            f"others {r['other_cpu_s']:.1f} cpu-s  disk read {r['disk_read_mb']:.0f} MB",
            flush=True,
        )

    print(f"running {args.reps} reps x {methods} (mergekit and fastmerge alternate; order flips each rep)", flush=True)
    for rep in range(args.reps):
        for method in methods:
            order = ("mergekit", "fastmerge") if rep % 2 == 0 else ("fastmerge", "mergekit")
            for tool in order:
                run(tool, method, rep)
            if rep == 0:
                checks[method] = compare_outputs(outs / f"mergekit-{method}", outs / f"fastmerge-{method}", models[0])
                print(f"  check {method}: {checks[method]}", flush=True)
            for tool in order:
                shutil.rmtree(outs / f"{tool}-{method}", ignore_errors=True)
        for floor in ("io_floor", "io_floor_alloc", "io_floor_raw"):
            run(floor, "io", rep)
            shutil.rmtree(outs / f"{floor}-io", ignore_errors=True)
        run("startup", "import", rep)

    summary = summarize(rows, methods)
    table = markdown(summary)
    stem = "compare_mergekit"
    with open(results / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(results / f"{stem}_summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(summary[0]))
        w.writeheader()
        w.writerows(summary)
    info["mergekit_cmd"] = " ".join(commands("mergekit", Path("RECIPE"), Path("OUT"), models))
    info["fastmerge_cmd"] = " ".join(commands("fastmerge", Path("RECIPE"), Path("OUT"), models)).replace(
        sys.executable, "python"
    )
    info["io_floor"] = (
        "safetensors.torch.load_file of every shard of the 4 models, every byte copied into one reused buffer, "
        "+ save_file of one model-sized output"
    )
    info["io_floor_alloc"] = "the same with every input tensor cloned into fresh memory (anonymous page faults)"
    info["io_floor_raw"] = (
        "every shard's bytes read into one reused buffer (os.readv), the base's shards written out again "
        "(os.write): plain file I/O, no safetensors, no torch import"
    )
    info["startup"] = "python -c 'import torch, safetensors.torch' (the interpreter + torch start-up that mergekit and the safetensors floors pay)"
    info["timing"] = (
        "wall clock of each child process, start to exit (interpreter start-up and imports included); "
        f"median of {args.reps}; peak RSS = the child's kernel high-water mark (ru_maxrss); "
        "other_cpu_s = CPU seconds used by other processes on the machine during the run"
    )
    for m, c in checks.items():
        info[f"check_{m}"] = c
    machine_txt = "\n".join(f"{k}: {v}" for k, v in info.items()) + "\n"
    (results / f"{stem}_machine.txt").write_text(machine_txt)
    title = (
        f"mergekit {info['mergekit']} vs fastmerge {info['fastmerge'].split(';')[0]}): {info['models']}\n"
        f"{info['cpu'].split(' (')[0]}, {info['cores']}, {info['ram']}, no GPU, {info['date']}"
    )
    plot(rows, summary, results / f"{stem}.png", title)
    (results / f"{stem}.md").write_text(f"# mergekit vs fastmerge ({args.size})\n\n```\n{machine_txt}```\n\n{table}\n")
    startup = summary[0]["startup_s"]
    others = max(s["max_other_cpu_frac"] for s in summary)
    table += (
        f"\n\nWall time of each child process, median of {args.reps}, warm page cache, start-up included: "
        f"mergekit and the safetensors floors pay the ~{startup:.1f} s Python + torch start-up; fastmerge's "
        "CPU merge and the raw-bytes floor import no torch. Peak RSS: the child's high-water mark. "
        f"CPU used by other processes during the timed runs: at most {others:.0%} of the machine."
    )
    print()
    print(table)
    print(f"\nresults in {results}/{stem}*")
    return 0


if __name__ == "__main__":
    sys.exit(main())
