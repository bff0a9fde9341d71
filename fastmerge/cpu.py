"""The fused CPU path: one compiled C loop over K+1 flattened tensors, nothing in between.

Why C and not torch.compile: Inductor (torch 2.13, CPU) miscompiles the uint32 Philox graph
(it infers float types for the xor/shift chain), and eager torch needs ~20 temporaries per
element. A 200-line C file built once per machine with the system compiler (cached under
``$FASTMERGE_CACHE`` or ``~/.cache/fastmerge``) streams base + K sources and writes the output
once, with OpenMP threads. It follows ``fastmerge.reference`` operation by operation.

The loop is built lazily, by the first call that merges with it (``available()``, the only caller
of the compiler): slerp, passthrough and GPU merges never run it. Where it cannot be built or
loaded (no C compiler; one without OpenMP, such as Apple's clang; one without ``_Float16``, such as
gcc < 12 on x86-64; any other failed build or load) every function here falls back to a numpy
path, after a one-line notice (a UserWarning, once per process) saying what failed and how to fix
it; a failed build is not retried in the same process. ``FASTMERGE_NO_C=1`` forces the numpy path:
no build, no notice. ``library()`` still raises for callers that need the C loop itself (benches).

The numpy path does the C loop's fp32 operations in its order (same Philox stream, same exact
TIES threshold, same sign election, same round-to-nearest-even casts, same NaN/Inf counts), so it
writes the same bytes for every method and dtype, with one caveat: the "l1" rescale (dare_ties,
dare_linear) adds its two double sums in another order (the C loop's own order depends on its
thread count), so in rare cases (a sum within ~1e-13, relative, of an fp32 rounding boundary) a
tensor's fp32 scale, and then its values, differ by one ulp. It works on the same raw pointers (no
torch), in pieces of ``NP_PIECE`` elements on a few threads; on a 150M-parameter bf16 model with 2
(busy) cores a merge took about 2x (task_arithmetic) and 5-7x (ties, dare_ties) the C loop's time.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from . import dtypes, rng
from .errors import FastmergeError
from .spec import FusedOptions, inverse_scale, keep_count, l1_scale

if TYPE_CHECKING:
    import torch

MAXK = 32
_SOURCE = Path(__file__).with_name("csrc") / "fused.c"
#: the dtypes the C loop reads and writes, and their codes in fused.c
CODES = {"F32": 0, "BF16": 1, "F16": 2}
_SPARSIFY = {"none": 0, "random": 1, "magnitude": 2}
_CONSENSUS = {"none": 0, "sum": 1, "count": 2}
#: set (to anything but 0 or empty) to skip the C loop: the numpy path, no build, no notice
NO_C_ENV = "FASTMERGE_NO_C"
BUILD_TIMEOUT = 600  # seconds
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failure: str | None = None  # why the C loop is unavailable, once known (a failed build is not retried)
_noticed = False  # the one-line notice has been given


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
        ("tie_end", ctypes.c_int64 * MAXK),
        ("draws", ctypes.c_void_p),
        ("draws_stride", ctypes.c_int64),
        ("draws_mode", ctypes.c_int32),
        ("pad4_", ctypes.c_int32),
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


class _Unavailable(Exception):
    """Why the C loop cannot be built or loaded: one line, saying how to fix it."""


def _disabled() -> bool:
    """``FASTMERGE_NO_C`` set (to anything but 0 or empty): the numpy path, without building."""
    return os.environ.get(NO_C_ENV, "").strip() not in ("", "0")


def _compiler() -> list[str]:
    """The compiler command: ``$CC`` (which may carry words, e.g. ``ccache gcc``), else gcc, else cc."""
    cc = os.environ.get("CC", "").strip()
    if cc:
        argv = shlex.split(cc)
        found = shutil.which(argv[0])
        if found is None:
            raise _Unavailable(f"the C compiler {cc!r} from CC was not found: set CC to an installed compiler "
                               "such as gcc, or unset it")
        return [found, *argv[1:]]
    found = shutil.which("gcc") or shutil.which("cc")
    if found is None:
        raise _Unavailable("no C compiler found: install gcc or set CC")
    return [found]


def _build_failure(cc: str, stderr: str) -> str:
    """The reason a build failed, in one line, with the likely fix."""
    low = stderr.lower()
    if "openmp" in low or "omp.h" in low or "gomp" in low or "-lomp" in low:
        return f"{cc} has no OpenMP (-fopenmp): install gcc, or libomp for clang, and set CC to it"
    if "_float16" in low:
        return f"{cc} has no _Float16 (gcc 12+ or clang 15+ needed on x86-64): set CC to a newer compiler"
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    first = next((ln for ln in lines if "error" in ln.lower()), lines[0] if lines else "no message")
    return f"building fused.c with {cc} failed: {first[:200]}; set CC to a working gcc"


# -ffp-contract=off: no FMA contraction, so every path (numpy twin, Triton, torch) rounds alike.
# -fno-trapping-math lets GCC turn the loops' selects (keep ? v : 0) into blends without AVX-512's
# masks: no value changes (nothing reads the FP flags), and on an AVX2-only CPU the merge loop runs
# about 2x faster than as the scalar branches GCC emits otherwise.
CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math", "-fPIC", "-shared"]


def _build() -> ctypes.CDLL:
    """Build (once per machine, compiler and source version) and load the library, or say why not."""
    cc = _compiler()
    name = os.path.basename(cc[0])
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + _cpu_fingerprint().encode() + " ".join(cc + CFLAGS).encode()).hexdigest()[:16]
    target = _cache_dir() / f"fused-{key}.so"
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / "fused.so"
                # -march=native where the compiler takes it (the loop is written for AVX-512, AVX2
                # and plain vectors alike); some (older clang, other architectures) do not: then without
                for arch in (["-march=native"], []):
                    cmd = [*cc, *CFLAGS, *arch, str(_SOURCE), "-o", str(built), "-lm"]
                    try:
                        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
                    except subprocess.TimeoutExpired:
                        raise _Unavailable(f"{name} did not finish building fused.c in {BUILD_TIMEOUT} s") from None
                    ok = proc.returncode == 0 and built.exists()
                    if ok or "march" not in (proc.stderr or "").lower():
                        break
                if not ok:
                    raise _Unavailable(_build_failure(name, proc.stderr or proc.stdout or ""))
                os.replace(built, target)
        except OSError as e:
            raise _Unavailable(f"cannot build in {target.parent} ({e.strerror or e}): "
                               "set FASTMERGE_CACHE to a writable directory") from None
    # Our OpenMP runtime must not spin-wait between the many short parallel regions: the
    # reader and writer threads need those cycles (spinning made small tensors 25x slower).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        lib = ctypes.CDLL(str(target))
        lib.fm_merge.argtypes = [ctypes.POINTER(_Params)]
        lib.fm_sums.argtypes = [ctypes.POINTER(_Params), ctypes.POINTER(ctypes.c_double),
                                ctypes.POINTER(ctypes.c_double)]
        lib.fm_abs_hist.argtypes = [ctypes.POINTER(_Params), ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        lib.fm_abs_keys.argtypes = [ctypes.POINTER(_Params), ctypes.c_void_p]
        lib.fm_tie_ends.argtypes = [ctypes.POINTER(_Params), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        lib.fm_select.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64)]
        lib.fm_select.restype = ctypes.c_int64
        lib.fm_count_nonfinite.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
        lib.fm_count_nonfinite.restype = ctypes.c_int64
        lib.fm_params_size.argtypes = []
        lib.fm_params_size.restype = ctypes.c_size_t
        lib.fm_isa.argtypes = []
        lib.fm_isa.restype = ctypes.c_char_p
    except (OSError, AttributeError) as e:
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise _Unavailable(f"loading the built {target} failed ({first}): remove it, and check that "
                           f"{name}'s OpenMP runtime is installed") from None
    check_layout(lib)
    return lib


def check_layout(lib: ctypes.CDLL) -> None:
    """Refuse a library whose ``fm_params`` is not the size of its ctypes mirror ``_Params``: the
    two are edited by hand, and a one-sided edit would make the loop read and write the wrong
    fields (silently corrupt memory). Unavailable means the numpy path, with the notice."""
    c_size, py_size = int(lib.fm_params_size()), ctypes.sizeof(_Params)
    if c_size != py_size:
        raise _Unavailable(f"fused.c's fm_params is {c_size} bytes but fastmerge.cpu._Params is {py_size}: "
                           "the two struct definitions disagree; make them match field by field")


def library() -> ctypes.CDLL:
    """The fused C library, built and loaded on the first call; raises ``FastmergeError`` saying why
    when it is unavailable or disabled (``available()`` is the call that falls back instead)."""
    global _lib, _failure
    if _disabled():
        raise FastmergeError(f"the fused C loop is disabled ({NO_C_ENV} is set)")
    with _lock:
        if _lib is None and _failure is None:
            try:
                _lib = _build()
            except _Unavailable as e:
                _failure = str(e)
        if _lib is None:
            raise FastmergeError(f"the fused C loop is unavailable: {_failure}")
        return _lib


def available() -> bool:
    """Whether the fused C loop serves this process. The first call builds it (the only place the
    compiler runs, so only routes that merge with the loop ever run it); False when
    ``FASTMERGE_NO_C`` is set, or when it cannot be built or loaded, then with a one-line notice
    (once per process) of what failed and how to fix it."""
    global _noticed
    if _disabled():
        return False
    if _lib is not None:
        return True
    try:
        library()
        return True
    except FastmergeError:
        with _lock:
            first, _noticed = not _noticed, True
        if first:
            warnings.warn(f"fastmerge: fused C loop unavailable ({_failure}); using the slower numpy path "
                          f"(set {NO_C_ENV}=1 to skip the build and this notice)", stacklevel=3)
        return False


def isa() -> str | None:
    """The vector path the C loop was built for ("avx512", "avx2" or "generic"), building it if
    needed; None where it is unavailable. Benchmarks record it: the loop is several times faster on
    the wider paths."""
    return library().fm_isa().decode() if available() else None


def _loaded() -> ctypes.CDLL | None:
    """The library if it is already loaded and not disabled; never builds."""
    lib = _lib
    return lib if lib is not None and not _disabled() else None


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
    lib = _loaded()  # never builds: slerp and passthrough merges count their inputs too
    if code not in CODES or lib is None:
        import torch

        return int((~torch.isfinite(t)).sum())
    t = t.contiguous()
    return int(lib.fm_count_nonfinite(t.data_ptr(), CODES[code], t.numel()))


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
    """``dtypes.fused_flat(t)`` and its Flat."""
    t = dtypes.fused_flat(t)
    return t, Flat(t.data_ptr(), dtypes.from_torch(t.dtype), t.numel())


def _select(hist: np.ndarray, rank: int) -> tuple[int, int]:
    """(bin, rank within the bin) of the rank-th largest element (1-based) of a histogram row."""
    within = ctypes.c_int64()
    b = library().fm_select(hist.ctypes.data, hist.size, rank, ctypes.byref(within))
    if b < 0:
        raise ValueError(f"rank {rank} beyond the histogram's {int(hist.sum())} elements")
    return int(b), within.value


def key_value(bits: int) -> float:
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


class Cut(NamedTuple):
    """Where TIES magnitude trimming cuts one tensor of one model (DESIGN.md s.3): every element with
    |delta| > tau is kept, and of those with |delta| == tau the ones at flat indices < end, so that
    exactly m = int(rho * n) are kept (ties broken by the lowest index). tau = inf keeps nothing."""

    tau: float
    end: int


def _cut(tau_key: int, m: int, above: int, equal: int, n: int, split: list, i: int) -> Cut:
    """The cut at the key ``tau_key`` with ``above`` keys above it and ``equal`` equal to it; when
    only some ties are kept, (model, ties to keep) goes on ``split`` (end is filled in later)."""
    need = m - above
    if not 1 <= need <= equal:
        raise ValueError(f"inconsistent selection: {m} to keep, {above} above tau, {equal} at tau")
    if need < equal:
        split.append((i, need, equal))
    return Cut(key_value(tau_key), n)


def _tie_ends(p: _Params, split: list[tuple[int, int, int]], cuts: list[Cut]) -> None:
    """Fill in ``end`` for the models whose ties at tau are split (fm_tie_ends: at most about half
    a pass)."""
    if not split:
        return
    q = _Params.from_buffer_copy(p)
    q.k = len(split)
    need = (ctypes.c_int64 * MAXK)()
    equal = (ctypes.c_int64 * MAXK)()
    ends = (ctypes.c_int64 * MAXK)()
    for j, (i, r, e) in enumerate(split):
        q.x[j], q.dtype_x[j], q.tau[j] = p.x[i], p.dtype_x[i], cuts[i].tau
        need[j], equal[j] = r, e
    library().fm_tie_ends(ctypes.byref(q), need, equal, ends)
    for j, (i, _, _) in enumerate(split):
        if ends[j] < 0:
            raise MemoryError("fm_tie_ends could not allocate its per-block counts")
        cuts[i] = Cut(cuts[i].tau, int(ends[j]))


def _radix_cuts(p: _Params, ms: list[int]) -> list[Cut]:
    """Exact m-th largest |x_k - base| by a radix select: one histogram pass over the top 16 bits
    (and a bit for "low 16 bits nonzero"), a second over the low 16 bits only for the models whose
    threshold has nonzero low bits (see fm_abs_hist); a third, partial one only where some of the
    ties at tau must be dropped (fm_tie_ends)."""
    lib = library()
    k, n = p.k, p.n
    cuts = [Cut(float("inf"), 0)] * k
    split: list[tuple[int, int, int]] = []
    buf = _hist_buffer(k)
    hist0 = buf[: k * BINS0].reshape(k, BINS0)
    lib.fm_abs_hist(ctypes.byref(p), 0, None, buf.ctypes.data)
    second: list[tuple[int, int, int, int]] = []  # (model, top 16 bits, rank in the bin, keys above the bin)
    for i, m in enumerate(ms):
        if not m:
            continue
        sub, rank = _select(hist0[i], m)
        if sub & 1:
            second.append((i, sub >> 1, rank, m - rank))
        else:  # every key in the bin is exactly top << 16
            cuts[i] = _cut((sub >> 1) << 16, m, m - rank, int(hist0[i, sub]), n, split, i)
    if second:
        # the second pass reads only the models that need it
        q = _Params.from_buffer_copy(p)
        q.k = len(second)
        prefix = (ctypes.c_uint32 * MAXK)()
        for j, (i, top, _, _) in enumerate(second):
            q.x[j], q.dtype_x[j] = p.x[i], p.dtype_x[i]
            prefix[j] = top
        lib.fm_abs_hist(ctypes.byref(q), 1, prefix, buf.ctypes.data)
        hist1 = buf[: q.k * 65536].reshape(q.k, 65536)
        for j, (i, top, rank, above) in enumerate(second):
            low, within = _select(hist1[j], rank)
            cuts[i] = _cut((top << 16) | low, ms[i], above + rank - within, int(hist1[j, low]), n, split, i)
    _tie_ends(p, split, cuts)
    return cuts


def _keys_cut(keys: np.ndarray, m: int) -> Cut:
    """The cut of one model from all its keys (a partial sort; the ties' end from their positions)."""
    if not m:
        return Cut(float("inf"), 0)
    n = keys.size
    key = keys.dtype.type(np.partition(keys, n - m)[n - m])
    need = m - int(np.count_nonzero(keys > key))
    at = np.flatnonzero(keys == key)
    return Cut(key_value(int(key)), n if need == at.size else int(at[need - 1]) + 1)


def _small_cuts(p: _Params, ms: list[int]) -> list[Cut]:
    """The same selection for a small tensor: all keys in one array, one partial sort per model."""
    keys = np.empty((p.k, p.n), dtype=np.uint32)
    library().fm_abs_keys(ctypes.byref(p), keys.ctypes.data)
    # the keys of non-negative floats order as the floats do
    return [_keys_cut(keys[i], m) for i, m in enumerate(ms)]


def magnitude_threshold(base: torch.Tensor | None, x: torch.Tensor, density: float, threads: int | None = None) -> float:
    """Exact m-th largest |x - base| (m = int(density * n); inf when m = 0)."""
    return fused_thresholds(base, [x], (density,), threads)[0]


def fused_thresholds(base: torch.Tensor | None, models: list[torch.Tensor], densities: tuple[float, ...],
                     threads: int | None = None) -> list[float]:
    """TIES thresholds tau_k (exact m-th largest |x_k - base|, inf where m = 0) of several models
    against one base (torch tensors; see ``cuts``)."""
    return [c.tau for c in fused_cuts(base, models, densities, threads)]


def fused_cuts(base: torch.Tensor | None, models: list[torch.Tensor], densities: tuple[float, ...],
               threads: int | None = None) -> list[Cut]:
    """``cuts`` of torch tensors."""
    held = [_flat(m) for m in models]
    b = _flat(base) if base is not None else None
    return cuts(b[1] if b else None, [f for _, f in held], densities, threads)


def thresholds(base: Flat | None, xs: list[Flat], densities: tuple[float, ...], threads: int | None = None) -> list[float]:
    """The taus of ``cuts``."""
    return [c.tau for c in cuts(base, xs, densities, threads)]


def cuts(base: Flat | None, xs: list[Flat], densities: tuple[float, ...], threads: int | None = None) -> list[Cut]:
    """TIES cuts of flat arrays: one or two streaming passes for all K together (a partial third
    where ties at tau are split), or a selection among the keys when the tensor is too small for a
    histogram pass to pay."""
    n = xs[0].n
    ms = [keep_count(d, n) for d in densities]
    if not any(ms):
        return [Cut(float("inf"), 0)] * len(xs)
    p = _Params()
    p.k = len(xs)
    p.n = n
    p.threads = threads or default_threads()
    p.base = base.ptr if base is not None else None
    p.dtype_base = CODES[base.code] if base is not None else 0
    for i, x in enumerate(xs):
        p.x[i] = x.ptr
        p.dtype_x[i] = CODES[x.code]
    if not available():
        return _np_cuts(base, xs, ms, threads)
    if n <= SMALL_SELECT:
        return _small_cuts(p, ms)
    return _radix_cuts(p, ms)


class DrawCache:
    """DARE's random draws of each tensor, kept between merges of the same tensors (``Merger``).

    A search merges the same tensors with the same seed over and over; only the densities and
    weights change, and the Philox draws do not. The C loop keeps each draw's bucket (one byte per
    element and fine-tuned model: floor(u * 256)) on the first merge and afterwards decides u < rho
    from the byte, drawing again only the 1 in 256 elements in rho's own bucket. The masks are the
    same bits as without it. It saves the Philox draws (~30% of a dare_ties merge on an AVX2 core)
    for a quarter of the fp32 fine-tunes' memory (half of bf16 ones'). Used by the C loop only; the
    numpy path draws every time.
    """

    def __init__(self) -> None:
        self._slots: dict[str, tuple[tuple[int, int, int], np.ndarray]] = {}
        self._ready: set[str] = set()

    def slot(self, name: str, opts: FusedOptions, n: int) -> tuple[np.ndarray, bool]:
        """(the K x n bytes of ``name``, whether they hold its draws); a tensor merged with another
        seed, model count or size gets fresh bytes."""
        key = (opts.seed, opts.k, n)
        held = self._slots.get(name)
        if held is None or held[0] != key:
            self._ready.discard(name)
            held = (key, np.empty((opts.k, n), dtype=np.uint8))
            self._slots[name] = held
        return held[1], name in self._ready

    def filled(self, name: str) -> None:
        self._ready.add(name)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for _, a in self._slots.values())


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
    draws: DrawCache | None = None,
) -> torch.Tensor:
    """Fused task-arithmetic-family merge of one tensor into ``out`` (allocated if None).

    ``piece_elements`` splits the work into pieces (bounded scratch, tests of launch
    independence); the result does not depend on it. ``nonfinite``, when given, receives the
    NaN/Inf counts of the inputs (base first), counted during the merge pass at no extra read.
    ``draws`` keeps DARE's draws for the next merge of the same tensor (``DrawCache``).
    """
    import torch

    if opts.k == 0 or opts.k > MAXK:  # before models[0] is used below
        raise FastmergeError(f"{name}: the fused CPU path merges 1..{MAXK} models, got {opts.k}")
    out_code = _code(out_dtype)
    if out_code not in CODES:
        raise FastmergeError(f"{name}: output dtype {out_dtype} is not supported by the fused path")
    held = [_flat(m) for m in models]
    b = _flat(base) if base is not None else None
    if out is None:
        out = torch.empty(models[0].shape, dtype=out_dtype)
    flat_out = out.view(-1)
    merge_into(b[1] if b else None, [f for _, f in held], opts, name,
               Flat(flat_out.data_ptr(), out_code, flat_out.numel()), threads, piece_elements, nonfinite, draws)
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
    draws: DrawCache | None = None,
) -> None:
    """``fused_merge`` on flat arrays (no torch): base + K inputs -> ``out``, one streaming pass
    (one or two more for TIES thresholds, one for the l1 rescale)."""
    if opts.k == 0 or opts.k > MAXK or len(xs) != opts.k:
        raise FastmergeError(f"{name}: the fused CPU path merges 1..{MAXK} models, got {len(xs)}")
    if out.code not in CODES:
        raise FastmergeError(f"{name}: output dtype {dtypes.torch_name(out.code)} is not supported by the fused path")
    threads = threads or default_threads()
    if not available():
        _np_merge(base, xs, opts, name, out, threads, piece_elements, nonfinite)
        return
    lib = library()
    n = xs[0].n

    p = _Params()
    p.k = opts.k
    p.sparsify = _SPARSIFY[opts.sparsify]
    p.consensus = _CONSENSUS[opts.consensus]
    p.normalize = int(opts.normalize)
    p.threads = threads
    p.dtype_out = CODES[out.code]
    p.lambda_ = opts.lambda_
    p.dtype_base = CODES[base.code] if base is not None else 0
    for k, x in enumerate(xs):
        p.dtype_x[k] = CODES[x.code]
        p.weight[k] = opts.weights[k]
        p.density[k] = opts.densities[k]
        p.scale[k] = 1.0
        p.tau[k] = 0.0
    ends = [0] * opts.k
    if opts.sparsify == "magnitude":
        for k, cut in enumerate(cuts(base, xs, opts.densities, threads)):
            p.tau[k], ends[k] = cut.tau, cut.end

    chunks = rng.chunks(n)
    step = piece_elements or rng.CHUNK_ELEMENTS
    # the l1 rescale needs a pass over the keep masks first: keep them as bits (one byte per
    # element for up to 8 models) instead of drawing Philox twice
    bits = None
    if opts.sparsify == "random" and opts.rescale == "l1" and opts.k <= 8:
        bits = np.empty(n, dtype=np.uint8)
    # the draw cache: written by the first pass that draws, read from then on
    cache, ready = draws.slot(name, opts, n) if draws is not None and opts.sparsify == "random" else (None, False)
    p.draws_stride = n
    p.draws_mode = 0 if cache is None else 2 if ready else 1

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
                for k in range(opts.k):
                    p.tie_end[k] = ends[k] - s
                p.keepbits = bits.ctypes.data + s if bits is not None else None
                p.draws = cache.ctypes.data + s if cache is not None else None
                yield

    def drawn() -> None:
        """After a pass that drew (or read) every element: the cache holds the draws, and later passes
        read them."""
        if p.draws_mode == 1:
            draws.filled(name)
            p.draws_mode = 2

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
        drawn()
        for k in range(opts.k):
            p.scale[k] = l1_scale(total[k], kept[k])
    p.bits_mode = 2 if bits is not None else 0
    counts = (ctypes.c_int64 * (MAXK + 1))()
    p.nonfinite = ctypes.addressof(counts) if nonfinite is not None else None
    for _ in pieces():
        lib.fm_merge(ctypes.byref(p))
    drawn()
    if nonfinite is not None:
        nonfinite[:] = list(counts[: opts.k + 1])


# --- the numpy path: the C loop's operations, in its order, where the loop is unavailable -----------

NP_PIECE = 1 << 15  # elements per merge piece: its ~20 fp32 temporaries per model stay in the cache
NP_HIST_PIECE = 1 << 20  # elements per threshold piece: each adds a 1 MB histogram
_NP_DTYPES = {"F32": np.float32, "BF16": np.uint16, "F16": np.float16}  # bf16 as its bits
_F32 = np.float32
_EXP = np.uint32(0x7F800000)


def _np_array(f: Flat, s: int, e: int) -> np.ndarray:
    """Elements [s, e) of a Flat as a numpy array over its memory (bf16 as uint16 bits)."""
    dtype = _NP_DTYPES[f.code]
    if e <= s:
        return np.empty(0, dtype=dtype)
    return np.frombuffer((ctypes.c_char * ((e - s) * dtypes.itemsize(f.code))).from_address(f.at(s)), dtype=dtype)


def _np_load(f: Flat, s: int, e: int) -> np.ndarray:
    """Elements [s, e) upcast to fp32 (load_block): a view for fp32, exact for bf16 and fp16."""
    a = _np_array(f, s, e)
    if f.code == "BF16":
        return (a.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return a if f.code == "F32" else a.astype(np.float32)


def _np_store(f: Flat, s: int, e: int, v: np.ndarray) -> None:
    """One cast on store (store_block): round to nearest even, NaN -> 0x7FC0 for bf16."""
    a = _np_array(f, s, e)
    if f.code == "BF16":
        u = v.view(np.uint32)
        r = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
        a[:] = np.where((u & np.uint32(0x7FFFFFFF)) > _EXP, np.uint16(0x7FC0), r)
    else:
        a[:] = v.astype(a.dtype)


def _np_nonfinite(v: np.ndarray) -> int:
    return v.size - int(np.count_nonzero(np.isfinite(v)))


def _np_philox(seed: int, j: int, cnt: int) -> list[np.ndarray]:
    """The four uniforms of Philox4x32-10 at counters j..j+cnt-1 (philox_block), fp32."""
    a, b, shift, low = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57), np.uint64(32), np.uint64(0xFFFFFFFF)
    c0 = np.arange(j, j + cnt, dtype=np.uint64)
    c1, c2, c3 = np.zeros(cnt, np.uint64), np.zeros(cnt, np.uint64), np.zeros(cnt, np.uint64)
    pa, pb = np.empty(cnt, np.uint64), np.empty(cnt, np.uint64)
    k0, k1 = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    for _ in range(rng.PHILOX_ROUNDS):
        np.multiply(c2, b, out=pb)
        np.multiply(c0, a, out=pa)
        np.right_shift(pb, shift, out=c0)
        c0 ^= c1
        c0 ^= np.uint64(k0)
        np.right_shift(pa, shift, out=c2)
        c2 ^= c3
        c2 ^= np.uint64(k1)
        np.bitwise_and(pb, low, out=c1)
        np.bitwise_and(pa, low, out=c3)
        k0 = (k0 + rng.PHILOX_KEY_A) & 0xFFFFFFFF
        k1 = (k1 + rng.PHILOX_KEY_B) & 0xFFFFFFFF
    out = []
    for c in (c0, c1, c2, c3):
        x = c.astype(np.uint32).view(np.int32)
        x ^= x >> np.int32(31)  # x < 0 -> ~x
        u = x.astype(np.float32)
        u *= _F32(rng.UNIFORM_SCALE)
        out.append(u)
    return out


def _np_map(fn, items: list, threads: int) -> list:
    """fn over items, in order; on a few threads (numpy releases the GIL in its loops)."""
    def quiet(item):  # inf * 0 and the like are values here, as in C, not warnings
        with np.errstate(all="ignore"):
            return fn(item)

    if threads <= 1 or len(items) <= 1:
        return [quiet(i) for i in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(threads, len(items))) as pool:
        return list(pool.map(quiet, items))


def _np_ranges(n: int, step: int) -> list[tuple[int, int]]:
    """[start, end) of the pieces of [0, n)."""
    return [(s, min(n, s + step)) for s in range(0, n, step)]


def _np_keys(base: Flat | None, x: Flat, s: int, e: int) -> np.ndarray:
    """Bits of |x - base| as fp32 for [s, e): non-negative, so they order as the values do."""
    d = _np_load(x, s, e)
    if base is not None:
        d = d - _np_load(base, s, e)
    return d.view(np.uint32) & np.uint32(0x7FFFFFFF)


def _np_hist_sum(fn, n: int, threads: int) -> list[np.ndarray]:
    """The sum over pieces of [0, n) of ``fn(start, end)`` (a list of histograms), one contiguous run
    of pieces per thread: a few histograms in memory, not one per piece."""
    pieces = _np_ranges(n, NP_HIST_PIECE)
    per = -(-len(pieces) // max(1, threads))

    def run(group: list[tuple[int, int]]) -> list[np.ndarray]:
        acc = fn(*group[0])
        for s, e in group[1:]:
            for a, h in zip(acc, fn(s, e)):
                a += h
        return acc

    parts = _np_map(run, [pieces[i:i + per] for i in range(0, len(pieces), per)], threads)
    return [sum(hs) for hs in zip(*parts)]


def _np_select(hist: np.ndarray, rank: int) -> tuple[int, int]:
    """``_select`` in numpy: (bin, rank within the bin) of the rank-th largest element."""
    above = np.cumsum(hist[::-1])
    i = int(np.searchsorted(above, rank))
    if i >= hist.size:
        raise ValueError(f"rank {rank} beyond the histogram's {int(hist.sum())} elements")
    return hist.size - 1 - i, rank - (int(above[i - 1]) if i else 0)


def _np_cuts(base: Flat | None, xs: list[Flat], ms: list[int], threads: int | None = None) -> list[Cut]:
    """``cuts`` in numpy: the same exact m-th largest key (a partial sort for small tensors,
    the same two-level radix select by pieces for others) and the same end of the ties kept."""
    n = xs[0].n
    result = [Cut(float("inf"), 0)] * len(xs)
    todo = [i for i, m in enumerate(ms) if m]
    if n <= SMALL_SELECT:
        for i in todo:
            result[i] = _keys_cut(_np_keys(base, xs[i], 0, n), ms[i])
        return result
    threads = threads or default_threads()
    split: list[tuple[int, int, int]] = []

    def level0(s: int, e: int) -> list[np.ndarray]:
        out = []
        for i in todo:
            k = _np_keys(base, xs[i], s, e)
            out.append(np.bincount(((k >> np.uint32(16)) << np.uint32(1)) | ((k & np.uint32(0xFFFF)) != 0),
                                   minlength=BINS0))
        return out

    hist0 = _np_hist_sum(level0, n, threads)
    second = []  # (model, top 16 bits, rank among that bin's keys with nonzero low bits, keys above the bin)
    for i, h in zip(todo, hist0):
        sub, rank = _np_select(h, ms[i])
        if sub & 1:
            second.append((i, sub >> 1, rank, ms[i] - rank))
        else:  # every key in the bin is exactly top << 16
            result[i] = _cut((sub >> 1) << 16, ms[i], ms[i] - rank, int(h[sub]), n, split, i)
    if second:
        def level1(s: int, e: int) -> list[np.ndarray]:
            out = []
            for i, top, _, _ in second:
                k = _np_keys(base, xs[i], s, e)
                low = k[((k >> np.uint32(16)) == top) & ((k & np.uint32(0xFFFF)) != 0)] & np.uint32(0xFFFF)
                out.append(np.bincount(low, minlength=65536))
            return out

        hist1 = _np_hist_sum(level1, n, threads)
        for (i, top, rank, above), h in zip(second, hist1):
            low, within = _np_select(h, rank)
            result[i] = _cut((top << 16) | low, ms[i], above + rank - within, int(h[low]), n, split, i)
    for i, need, _ in split:  # the ties' end: count by pieces, then find it in its piece
        key = np.uint32(struct.unpack("<I", struct.pack("<f", result[i].tau))[0])
        pieces = _np_ranges(n, NP_HIST_PIECE)
        counts = _np_map(lambda r: int(np.count_nonzero(_np_keys(base, xs[i], *r) == key)), pieces, threads)  # noqa: B023
        for (s, e), c in zip(pieces, counts):
            if need <= c:
                at = np.flatnonzero(_np_keys(base, xs[i], s, e) == key)
                result[i] = Cut(result[i].tau, s + int(at[need - 1]) + 1)
                break
            need -= c
    return result


def _np_merge(base: Flat | None, xs: list[Flat], opts: FusedOptions, name: str, out: Flat, threads: int,
              piece_elements: int | None, nonfinite: list[int] | None) -> None:
    """``merge_into`` without the C loop: fm_sums and fm_merge in numpy, operation by operation in
    the same order and in fp32, over pieces of at most ``NP_PIECE`` elements (threaded)."""
    k, n = opts.k, xs[0].n
    weights = [_F32(w) for w in opts.weights]
    dens = [_F32(d) for d in opts.densities]
    scales = [_F32(1.0)] * k
    taus = [_F32(0.0)] * k
    ends = [0] * k
    if opts.sparsify == "magnitude":
        found = _np_cuts(base, xs, [keep_count(d, n) for d in opts.densities], threads)
        taus = [_F32(c.tau) for c in found]
        ends = [c.end for c in found]
    step = min(piece_elements or NP_PIECE, NP_PIECE)
    work = []  # (start, end, index within its chunk, the chunk's Philox keys)
    for c, (cs, ce) in enumerate(rng.chunks(n)):
        cname = rng.chunk_name(name, c, n)
        seeds = [rng.group_seed(opts.seed, cname, g) for g in range((k + 3) // 4)] if opts.sparsify == "random" else []
        work += [(s, min(ce, s + step), s - cs, seeds) for s in range(cs, ce, step)]
    l1 = opts.sparsify != "none" and opts.rescale == "l1"
    # the l1 rescale's pass keeps the DARE masks as bits (bit m for model m), so the merge pass
    # does not draw Philox again (as the C loop's keepbits)
    bits = np.empty(n, np.uint8 if k <= 8 else np.uint16 if k <= 16 else np.uint32) if l1 and opts.sparsify == "random" else None

    def inputs(item, counts: list[int] | None):
        """base (zeros without one), the deltas, the keep masks (None: all kept)."""
        s, e, j, seeds = item
        b = _np_load(base, s, e) if base is not None else np.zeros(e - s, np.float32)
        if counts is not None and base is not None:
            counts[0] += _np_nonfinite(b)
        ds = []
        for m, x in enumerate(xs):
            v = _np_load(x, s, e)
            if counts is not None:
                counts[1 + m] += _np_nonfinite(v)
            ds.append(v - b)
        if opts.sparsify == "random" and bits is not None and counts is not None:  # drawn by the l1 pass
            keep = [(bits[s:e] >> m) & 1 != 0 for m in range(k)]
        elif opts.sparsify == "random":
            keep = []
            for g, seed in enumerate(seeds):
                us = _np_philox(seed, j, e - s)
                keep += [u < dens[4 * g + lane] for lane, u in enumerate(us) if 4 * g + lane < k]
            if bits is not None:
                packed = np.zeros(e - s, bits.dtype)
                for m, kp in enumerate(keep):
                    packed |= kp.astype(bits.dtype) << bits.dtype.type(m)
                bits[s:e] = packed
        elif opts.sparsify == "magnitude":
            index = np.arange(s, e)
            keep = []
            for d, t, end in zip(ds, taus, ends):
                a = np.abs(d)
                keep.append((a > t) | ((a == t) & (index < end)))
        else:
            keep = None
        return b, ds, keep

    if opts.sparsify != "none" and opts.rescale == "inverse":
        scales = [_F32(inverse_scale(d)) for d in opts.densities]
    elif l1:
        def sums(item) -> list[tuple[float, float]]:
            _, ds, keep = inputs(item, None)
            out = []
            for d, kp in zip(ds, keep):
                a = np.abs(d).astype(np.float64)
                out.append((float(a.sum()), float((a * kp).sum())))  # a * 0 is NaN for inf, as in C
            return out

        per_piece = _np_map(sums, work, threads)
        for m in range(k):
            scales[m] = _F32(l1_scale(sum(p[m][0] for p in per_piece), sum(p[m][1] for p in per_piece)))
    lam = _F32(opts.lambda_)
    zero, one = _F32(0.0), _F32(1.0)

    def merge(item) -> list[int]:
        s, e = item[0], item[1]
        counts = [0] * (k + 1)
        b, ds, keep = inputs(item, counts)
        sgn = np.zeros(e - s, np.float32)
        vs = []
        for m, d in enumerate(ds):
            v = d * scales[m]
            v *= weights[m]
            if keep is not None:
                v = np.where(keep[m], v, zero)
            vs.append(v)
            if opts.consensus == "sum":
                sgn += v
            elif opts.consensus == "count":
                sgn += (v > zero).astype(np.float32) - (v < zero).astype(np.float32)
        mixed = np.zeros(e - s, np.float32)
        if opts.consensus == "none":
            div = zero
            for v, w in zip(vs, weights):
                mixed += v
                div = _F32(div + w)
            div = one if abs(div) < _F32(1e-8) else div
        else:
            sigma = np.where(sgn >= zero, one, _F32(-1.0))
            div = np.zeros(e - s, np.float32)
            for v, w in zip(vs, weights):
                agree = (v * sigma) > zero
                # mixed + (agree ? v : 0), as in C: mixed never holds -0, so mixed + 0 == mixed
                np.add(mixed, v, out=mixed, where=agree)
                np.add(div, w, out=div, where=agree)
            div[div == zero] = one
        if opts.normalize:
            mixed /= div
        if lam != one:
            mixed *= lam
        _np_store(out, s, e, b + mixed)
        return counts

    counts = _np_map(merge, work, threads)
    if nonfinite is not None:
        nonfinite[:] = [sum(c[m] for c in counts) for m in range(k + 1)]
