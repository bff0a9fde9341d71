"""The fused CPU path: one compiled C loop over K+1 flattened tensors, nothing in between.

Why C and not torch.compile: Inductor (torch 2.13, CPU) miscompiles the uint32 Philox graph
(it infers float types for the xor/shift chain), and eager torch needs ~20 temporaries per
element. A 200-line C file built once per machine with the system compiler (cached under
``$FASTMERGE_CACHE`` or ``~/.cache/fastmerge``) streams base + K sources and writes the output
once, with OpenMP threads. It follows ``fastmerge.reference`` operation by operation.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import dtypes, rng
from .errors import FastmergeError
from .spec import FusedOptions, inverse_scale, keep_count, l1_scale

if TYPE_CHECKING:
    import torch

MAXK = 32
_SOURCE = Path(__file__).with_name("csrc") / "fused.c"
_CODES = {"F32": 0, "BF16": 1, "F16": 2}  # the dtypes the C loop reads and writes
_SPARSIFY = {"none": 0, "random": 1, "magnitude": 2}
_CONSENSUS = {"none": 0, "sum": 1, "count": 2}
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


class _Params(ctypes.Structure):
    _fields_ = [
        ("n", ctypes.c_int64),
        ("k", ctypes.c_int32),
        ("sparsify", ctypes.c_int32),
        ("consensus", ctypes.c_int32),
        ("normalize", ctypes.c_int32),
        ("threads", ctypes.c_int32),
        ("dtype_out", ctypes.c_int32),
        ("lambda_", ctypes.c_float),
        ("pad_", ctypes.c_float),
        ("base", ctypes.c_void_p),
        ("dtype_base", ctypes.c_int32),
        ("pad2_", ctypes.c_int32),
        ("x", ctypes.c_void_p * MAXK),
        ("dtype_x", ctypes.c_int32 * MAXK),
        ("weight", ctypes.c_float * MAXK),
        ("density", ctypes.c_float * MAXK),
        ("scale", ctypes.c_float * MAXK),
        ("tau", ctypes.c_float * MAXK),
        ("seed", ctypes.c_uint64 * (MAXK // 4)),
        ("out", ctypes.c_void_p),
        ("j0", ctypes.c_int64),
        ("keepbits", ctypes.c_void_p),
        ("bits_mode", ctypes.c_int32),
        ("pad3_", ctypes.c_int32),
        ("nonfinite", ctypes.c_void_p),
    ]


def _cache_dir() -> Path:
    root = os.environ.get("FASTMERGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastmerge")
    return Path(root)


def _cpu_fingerprint() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def library() -> ctypes.CDLL:
    """Build (once per machine and source version) and load the fused C library."""
    global _lib
    with _lock:
        if _lib is not None:
            return _lib
        cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
        if cc is None:
            raise FastmergeError("the fused CPU path needs a C compiler (gcc); install gcc or set CC")
        source = _SOURCE.read_bytes()
        key = hashlib.sha256(source + _cpu_fingerprint().encode() + cc.encode()).hexdigest()[:16]
        target = _cache_dir() / f"fused-{key}.so"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / "fused.so"
                cmd = [cc, "-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fPIC", "-shared",
                       str(_SOURCE), "-o", str(built), "-lm"]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise FastmergeError(f"building the fused CPU path failed: {' '.join(cmd)}\n{proc.stderr}")
                os.replace(built, target)
        # Our OpenMP runtime must not spin-wait between the many short parallel regions: the
        # reader and writer threads need those cycles (spinning made small tensors 25x slower).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        lib = ctypes.CDLL(str(target))
        lib.fm_merge.argtypes = [ctypes.POINTER(_Params)]
        lib.fm_sums.argtypes = [ctypes.POINTER(_Params), ctypes.POINTER(ctypes.c_double), ctypes.POINTER(ctypes.c_double)]
        lib.fm_abs_hist.argtypes = [ctypes.POINTER(_Params), ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        lib.fm_abs_keys.argtypes = [ctypes.POINTER(_Params), ctypes.c_void_p]
        lib.fm_select.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64)]
        lib.fm_select.restype = ctypes.c_int64
        lib.fm_count_nonfinite.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
        lib.fm_count_nonfinite.restype = ctypes.c_int64
        _lib = lib
        return lib


@dataclass(frozen=True)
class Flat:
    """A flat, contiguous array the C loop reads or writes: its address, dtype code and length.
    Whoever makes one keeps the memory alive for the call."""

    ptr: int
    code: str
    n: int

    def at(self, start: int) -> int:
        """The address of element ``start``."""
        return self.ptr + start * dtypes.itemsize(self.code)


def count_nonfinite(t: torch.Tensor) -> int:
    """NaN/Inf elements in a float tensor (0 for other dtypes), in one vectorized pass."""
    if not t.is_floating_point():
        return 0
    code = _code(t.dtype)
    if code not in _CODES:
        import torch

        return int((~torch.isfinite(t)).sum())
    t = t.contiguous()
    return int(library().fm_count_nonfinite(t.data_ptr(), _CODES[code], t.numel()))


def default_threads() -> int:
    """torch's intra-op thread count when torch is loaded (so ``torch.set_num_threads`` is obeyed),
    else OMP_NUM_THREADS, else every CPU this process may run on."""
    if "torch" in sys.modules:
        return max(1, sys.modules["torch"].get_num_threads())
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _code(dtype: torch.dtype) -> str | None:
    try:
        return dtypes.from_torch(dtype)
    except KeyError:
        return None


def _flat(t: torch.Tensor) -> tuple[torch.Tensor, Flat]:
    """A contiguous flat tensor of a dtype the C loop reads (others upcast to fp32), and its Flat."""
    t = t.reshape(-1)
    code = _code(t.dtype)
    if code not in _CODES:
        t, code = t.float(), "F32"
    t = t.contiguous()
    return t, Flat(t.data_ptr(), code, t.numel())


def _select(hist: np.ndarray, rank: int) -> tuple[int, int]:
    """(bin, rank within the bin) of the rank-th largest element (1-based) of a histogram row."""
    within = ctypes.c_int64()
    b = library().fm_select(hist.ctypes.data, hist.size, rank, ctypes.byref(within))
    if b < 0:
        raise ValueError(f"rank {rank} beyond the histogram's {int(hist.sum())} elements")
    return int(b), within.value


def _key_value(bits: int) -> float:
    """The fp32 value whose bits are ``bits``."""
    return struct.unpack("<f", struct.pack("<I", bits & 0xFFFFFFFF))[0]


_scratch = threading.local()
BINS0 = 1 << 17  # level 0: the top 16 bits of a key, and whether its low 16 bits are nonzero


def _hist_buffer(k: int) -> np.ndarray:
    """A reused flat int64 histogram of k * BINS0 counters (fm_abs_hist zeroes what it uses): a fresh
    one per model and call came from mmap and faulted its pages in, for every tensor of a model."""
    buf = getattr(_scratch, "hist", None)
    if buf is None or buf.size < k * BINS0:
        buf = _scratch.hist = np.empty(k * BINS0, dtype=np.int64)
    return buf


SMALL_SELECT = 1 << 16


def _radix_thresholds(p: _Params, ms: list[int]) -> list[float]:
    """Exact m-th largest |x_k - base| by a radix select: one histogram pass over the top 16 bits
    (and a bit for "low 16 bits nonzero"), a second over the low 16 bits only for the models whose
    threshold has nonzero low bits (see fm_abs_hist)."""
    lib = library()
    k = p.k
    taus = [float("inf")] * k
    buf = _hist_buffer(k)
    hist0 = buf[: k * BINS0].reshape(k, BINS0)
    lib.fm_abs_hist(ctypes.byref(p), 0, None, buf.ctypes.data)
    second: list[tuple[int, int, int]] = []  # (model, top 16 bits, rank among that bin's nonzero-low keys)
    for i, m in enumerate(ms):
        if not m:
            continue
        sub, rank = _select(hist0[i], m)
        if sub & 1:
            second.append((i, sub >> 1, rank))
        else:  # every key in the bin is exactly top << 16
            taus[i] = _key_value((sub >> 1) << 16)
    if second:
        # the second pass reads only the models that need it
        q = _Params.from_buffer_copy(p)
        q.k = len(second)
        prefix = (ctypes.c_uint32 * MAXK)()
        for j, (i, top, _) in enumerate(second):
            q.x[j], q.dtype_x[j] = p.x[i], p.dtype_x[i]
            prefix[j] = top
        lib.fm_abs_hist(ctypes.byref(q), 1, prefix, buf.ctypes.data)
        hist1 = buf[: q.k * 65536].reshape(q.k, 65536)
        for j, (i, top, rank) in enumerate(second):
            low, _ = _select(hist1[j], rank)
            taus[i] = _key_value((top << 16) | low)
    return taus


def _small_thresholds(p: _Params, ms: list[int]) -> list[float]:
    """The same selection for a small tensor: all keys in one array, one partial sort per model."""
    n = p.n
    keys = np.empty((p.k, n), dtype=np.uint32)
    library().fm_abs_keys(ctypes.byref(p), keys.ctypes.data)
    # the keys of non-negative floats order as the floats do
    return [_key_value(int(np.partition(keys[i], n - m)[n - m])) if m else float("inf") for i, m in enumerate(ms)]


def magnitude_threshold(base: torch.Tensor | None, x: torch.Tensor, density: float, threads: int | None = None) -> float:
    """Exact m-th largest |x - base| (m = int(density * n); inf when m = 0)."""
    return fused_thresholds(base, [x], (density,), threads)[0]


def fused_thresholds(base: torch.Tensor | None, models: list[torch.Tensor], densities: tuple[float, ...],
                     threads: int | None = None) -> list[float]:
    """TIES thresholds tau_k (exact m-th largest |x_k - base|, inf where m = 0) of several models
    against one base (torch tensors; see ``thresholds``)."""
    held = [_flat(m) for m in models]
    b = _flat(base) if base is not None else None
    return thresholds(b[1] if b else None, [f for _, f in held], densities, threads)


def thresholds(base: Flat | None, xs: list[Flat], densities: tuple[float, ...], threads: int | None = None) -> list[float]:
    """TIES thresholds of flat arrays: one or two streaming passes for all K together, or a
    selection among the keys when the tensor is too small for a histogram pass to pay."""
    n = xs[0].n
    ms = [keep_count(d, n) for d in densities]
    if not any(ms):
        return [float("inf")] * len(xs)
    p = _Params()
    p.k = len(xs)
    p.n = n
    p.threads = threads or default_threads()
    p.base = base.ptr if base is not None else None
    p.dtype_base = _CODES[base.code] if base is not None else 0
    for i, x in enumerate(xs):
        p.x[i] = x.ptr
        p.dtype_x[i] = _CODES[x.code]
    if n <= SMALL_SELECT:
        return _small_thresholds(p, ms)
    return _radix_thresholds(p, ms)


def fused_merge(
    base: torch.Tensor | None,
    models: list[torch.Tensor],
    opts: FusedOptions,
    name: str,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
    threads: int | None = None,
    piece_elements: int | None = None,
    nonfinite: list[int] | None = None,
) -> torch.Tensor:
    """Fused task-arithmetic-family merge of one tensor into ``out`` (allocated if None).

    ``piece_elements`` splits the work into pieces (bounded scratch, tests of launch
    independence); the result does not depend on it. ``nonfinite``, when given, receives the
    NaN/Inf counts of the inputs (base first), counted during the merge pass at no extra read.
    """
    import torch

    if opts.k == 0 or opts.k > MAXK:  # before models[0] is used below
        raise FastmergeError(f"{name}: the fused CPU path merges 1..{MAXK} models, got {opts.k}")
    out_code = _code(out_dtype)
    if out_code not in _CODES:
        raise FastmergeError(f"{name}: output dtype {out_dtype} is not supported by the fused path")
    held = [_flat(m) for m in models]
    b = _flat(base) if base is not None else None
    if out is None:
        out = torch.empty(models[0].shape, dtype=out_dtype)
    flat_out = out.view(-1)
    merge_into(b[1] if b else None, [f for _, f in held], opts, name,
               Flat(flat_out.data_ptr(), out_code, flat_out.numel()), threads, piece_elements, nonfinite)
    return out


def merge_into(
    base: Flat | None,
    xs: list[Flat],
    opts: FusedOptions,
    name: str,
    out: Flat,
    threads: int | None = None,
    piece_elements: int | None = None,
    nonfinite: list[int] | None = None,
) -> None:
    """``fused_merge`` on flat arrays (no torch): base + K inputs -> ``out``, one streaming pass
    (one or two more for TIES thresholds, one for the l1 rescale)."""
    if opts.k == 0 or opts.k > MAXK or len(xs) != opts.k:
        raise FastmergeError(f"{name}: the fused CPU path merges 1..{MAXK} models, got {len(xs)}")
    if out.code not in _CODES:
        raise FastmergeError(f"{name}: output dtype {dtypes.torch_name(out.code)} is not supported by the fused path")
    lib = library()
    threads = threads or default_threads()
    n = xs[0].n

    p = _Params()
    p.k = opts.k
    p.sparsify = _SPARSIFY[opts.sparsify]
    p.consensus = _CONSENSUS[opts.consensus]
    p.normalize = int(opts.normalize)
    p.threads = threads
    p.dtype_out = _CODES[out.code]
    p.lambda_ = opts.lambda_
    p.dtype_base = _CODES[base.code] if base is not None else 0
    for k, x in enumerate(xs):
        p.dtype_x[k] = _CODES[x.code]
        p.weight[k] = opts.weights[k]
        p.density[k] = opts.densities[k]
        p.scale[k] = 1.0
        p.tau[k] = 0.0
    if opts.sparsify == "magnitude":
        for k, tau in enumerate(thresholds(base, xs, opts.densities, threads)):
            p.tau[k] = tau

    chunks = rng.chunks(n)
    step = piece_elements or rng.CHUNK_ELEMENTS
    # the l1 rescale needs a pass over the keep masks first: keep them as bits (one byte per
    # element for up to 8 models) instead of drawing Philox twice
    bits = None
    if opts.sparsify == "random" and opts.rescale == "l1" and opts.k <= 8:
        bits = np.empty(n, dtype=np.uint8)

    def pieces():
        for c, (cs, ce) in enumerate(chunks):
            cname = rng.chunk_name(name, c, n)
            for g in range((opts.k + 3) // 4):
                p.seed[g] = rng.group_seed(opts.seed, cname, g)
            for s in range(cs, ce, step):
                e = min(ce, s + step)
                p.n = e - s
                p.j0 = s - cs
                p.base = base.at(s) if base is not None else None
                for k, x in enumerate(xs):
                    p.x[k] = x.at(s)
                p.out = out.at(s)
                p.keepbits = bits.ctypes.data + s if bits is not None else None
                yield

    if opts.sparsify != "none" and opts.rescale == "inverse":
        for k in range(opts.k):
            p.scale[k] = inverse_scale(opts.densities[k])
    elif opts.sparsify != "none" and opts.rescale == "l1":
        total = [0.0] * opts.k
        kept = [0.0] * opts.k
        t_arr = (ctypes.c_double * MAXK)()
        k_arr = (ctypes.c_double * MAXK)()
        p.bits_mode = 1 if bits is not None else 0
        for _ in pieces():
            lib.fm_sums(ctypes.byref(p), t_arr, k_arr)
            for k in range(opts.k):
                total[k] += t_arr[k]
                kept[k] += k_arr[k]
        for k in range(opts.k):
            p.scale[k] = l1_scale(total[k], kept[k])
    p.bits_mode = 2 if bits is not None else 0
    counts = (ctypes.c_int64 * (MAXK + 1))()
    p.nonfinite = ctypes.addressof(counts) if nonfinite is not None else None
    for _ in pieces():
        lib.fm_merge(ctypes.byref(p))
    if nonfinite is not None:
        nonfinite[:] = list(counts[: opts.k + 1])
