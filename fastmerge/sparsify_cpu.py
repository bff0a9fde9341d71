"""The C loop's versions of the torch route's sparsifying methods (della, della_linear, breadcrumbs,
breadcrumbs_ties, sce): the same bits as ``fastmerge.methods_math``'s pure-torch functions (kept
there as ``*_reference``), without their model-sized temporaries.

Where the time and memory went (issue 15; one 1024x4096 bf16 tensor, 3 models, one thread): della
18.4 s, 16.0 s of it the pure-torch Philox (uint32 arithmetic emulated in int64 over the whole tensor,
12.8 s of system time faulting its temporaries in, +620 MB peak for 32 MB of inputs) and 1.3 s two
argsorts per model; breadcrumbs 1.36 s, 1.1 s of it a full argsort per model; sce (select_topk
< 1) 1.5 s, 0.5 s argsort and 0.55 s torch.var.

Here instead:

* della: one pass over rows (``fm_della_bits``): per row and model, the delta, a stable radix
  sort of |delta| (the ranks of torch's stable argsort), the keep probability, one vectorized
  Philox evaluation per group of four models (``philox_block``), the keep bit and the l1 sums;
  then one combine pass (``fm_sp_combine``) that writes the fp32 result. Memory: the fp32 output
  and one byte of keep bits per element.
* breadcrumbs: per model, the |delta| keys of the tensor (4 bytes per element), two order
  statistics by ``numpy.partition`` (linear time, not a sort) and one pass that keeps the band of
  ranks with the same tie rule (equal |delta|: lower flat index first); then the same combine.
* sce: the select's argsort becomes the same exact top-m selection.

Each function returns None where it does not apply (C loop unavailable or disabled, a dtype the
loop does not read, a tensor of 0 or more than 2 dims for della, more than 8 models, parameters
outside the usual ranges); the caller then runs the reference.

Bit-identity caveat (as the fused path's numpy twin): the l1 rescale's double sums are added in
another order than torch's (whose order itself depends on its thread count); the fp32 scale only
differs when a sum lies within ~1e-15 (relative) of an fp32 rounding boundary.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence

import numpy as np
import torch

from . import cpu, rng
from .spec import l1_scale

MAXK = 32  # fused.c's FM_MAXK
MAX_BITS_MODELS = 8  # keep bits: one byte per element
MAX_ROW = 1 << 22  # della's longest row in C (each thread holds ~40 bytes per element of a row)
CS_NONE, CS_SUM = 0, 1


class _SpParams(ctypes.Structure):
    _fields_ = [
        ("n", ctypes.c_int64),
        ("rows", ctypes.c_int64),
        ("cols", ctypes.c_int64),
        ("k", ctypes.c_int32),
        ("threads", ctypes.c_int32),
        ("consensus", ctypes.c_int32),
        ("normalize", ctypes.c_int32),
        ("lambda_", ctypes.c_float),
        ("div_none", ctypes.c_float),
        ("base", ctypes.c_void_p),
        ("dtype_base", ctypes.c_int32),
        ("ngroups", ctypes.c_int32),
        ("x", ctypes.c_void_p * MAXK),
        ("dtype_x", ctypes.c_int32 * MAXK),
        ("weight", ctypes.c_float * MAXK),
        ("scale", ctypes.c_float * MAXK),
        ("mode", ctypes.c_int32 * MAXK),
        ("lo", ctypes.c_float * MAXK),
        ("eps", ctypes.c_float * MAXK),
        ("seeds", ctypes.c_void_p),
        ("chunk", ctypes.c_int64),
        ("bits", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("total", ctypes.c_double * MAXK),
        ("kept", ctypes.c_double * MAXK),
    ]


_lock = threading.Lock()
_ready: ctypes.CDLL | None = None


def library() -> ctypes.CDLL | None:
    """The fused library with this module's functions declared, or None (unavailable, disabled)."""
    global _ready
    if not cpu.available():
        return None
    lib = cpu.library()
    with _lock:
        if _ready is not lib:
            P = ctypes.POINTER(_SpParams)
            lib.fm_sp_params_size.argtypes = []
            lib.fm_sp_params_size.restype = ctypes.c_size_t
            if lib.fm_sp_params_size() != ctypes.sizeof(_SpParams):
                raise RuntimeError("fused.c's fm_sp_params and fastmerge.sparsify_cpu._SpParams disagree")
            lib.fm_uniforms.argtypes = [ctypes.c_uint64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                                        ctypes.c_void_p, ctypes.c_int]
            lib.fm_della_bits.argtypes = [P]
            lib.fm_sp_abs_keys.argtypes = [P, ctypes.c_int, ctypes.c_void_p]
            lib.fm_sp_band_bits.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint32, ctypes.c_int64,
                                            ctypes.c_uint32, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p,
                                            ctypes.c_void_p]
            lib.fm_sp_combine.argtypes = [P]
            lib.fm_sp_sce_combine.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                              ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
            lib.fm_sp_var_rows.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                           ctypes.c_int]
            _ready = lib
    return lib


_local = threading.local()


class thread_limit:
    """``with thread_limit(n):`` the C loop's threads for calls in this thread that name none (the
    torch route's ``MergeContext.threads``, i.e. the merge's ``--threads``); None: the default."""

    def __init__(self, threads: int | None):
        self.threads = threads

    def __enter__(self):
        self.saved = getattr(_local, "threads", None)
        _local.threads = self.threads
        return self

    def __exit__(self, *exc):
        _local.threads = self.saved


def _threads(threads: int | None) -> int:
    return threads or getattr(_local, "threads", None) or cpu.default_threads()


def uniforms_into(out: np.ndarray, seed: int, tensor_name: str, k: int, j0: int, threads: int | None = None
                  ) -> bool:
    """U_k(j) for j in [j0, j0 + out.size) of one chunk (``rng.uniforms``) into the fp32 array
    ``out``, by the C loop's Philox; False (nothing written) where the loop is unavailable."""
    lib = library()
    if lib is None:
        return False
    key = rng.group_seed(seed, tensor_name, k // rng.MODELS_PER_CALL)
    lib.fm_uniforms(key, j0, out.size, k % rng.MODELS_PER_CALL, out.ctypes.data, _threads(threads))
    return True


def _codes(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> list[int] | None:
    codes = []
    for t in (base, *tensors):
        code = cpu._code(t.dtype)
        if code not in cpu.CODES or t.shape != base.shape:
            return None
        codes.append(cpu.CODES[code])
    return codes


def _params(base: torch.Tensor, tensors: Sequence[torch.Tensor], codes: list[int], held: list,
            threads: int | None) -> _SpParams:
    p = _SpParams()
    b = base.contiguous()
    held.append(b)
    p.n = b.numel()
    p.k = len(tensors)
    p.threads = _threads(threads)
    p.base = b.data_ptr()
    p.dtype_base = codes[0]
    for m, t in enumerate(tensors):
        t = t.contiguous()
        held.append(t)
        p.x[m] = t.data_ptr()
        p.dtype_x[m] = codes[1 + m]
        p.scale[m] = 1.0
    return p


#: the most models whose combine the C loop does in torch's order: torch's ``sum(dim=0)`` adds up to
#: four rows in order, but five or more in two orders, by element position (its vectorized body in
#: order, its tail elements as ``((v0 + v4) + v1) + ...``, and where the tail falls depends on its
#: thread count and vector width); beyond, the combine stays torch's own
COMBINE_MAXK = 4


def _combine(lib: ctypes.CDLL, p: _SpParams, shape: torch.Size, bits: np.ndarray, weights: list[float],
             consensus: bool, normalize: bool, lambda_: float, ndim: int, held: list, masked: list[bool]
             ) -> torch.Tensor:
    """methods_math._combine over the kept (and scaled) deltas: the fp32 result. ``masked[m]``:
    model m was sparsified (else its delta is taken whole, as the reference's ``keep is None``)."""
    if p.k > COMBINE_MAXK:
        from .methods_math import _combine as torch_combine

        b = held[0].to(torch.float32)
        flags = torch.from_numpy(bits).reshape(shape)
        deltas = []
        for m, t in enumerate(held[1:]):
            d = t.to(torch.float32) - b
            if masked[m]:
                keep = (flags & (1 << m)) != 0
                d = torch.where(keep, d, torch.zeros((), dtype=d.dtype))
                if p.scale[m] != 1.0:
                    d = d * p.scale[m]
            deltas.append(d)
        return torch_combine(b, deltas, weights, consensus, normalize, lambda_)
    for m, w in enumerate(weights):
        p.weight[m] = w
    p.consensus = CS_SUM if consensus else CS_NONE
    p.normalize = int(normalize)
    p.lambda_ = lambda_
    if not consensus:  # the divisor without consensus: torch's sum of the fp32 weights, guarded
        w = torch.tensor(weights, dtype=torch.float32).reshape(-1, *([1] * ndim))
        div = w.sum(dim=0)
        p.div_none = float(torch.where(div.abs() < 1e-8, torch.ones(()), div).reshape(-1)[0])
    out = torch.empty(shape, dtype=torch.float32)
    p.bits = bits.ctypes.data
    p.out = out.data_ptr()
    lib.fm_sp_combine(ctypes.byref(p))
    return out


def della(base: torch.Tensor, tensors: Sequence[torch.Tensor], consensus: bool, weights: list[float],
          densities: list[float], epsilons: list[float], rescale: bool, normalize: bool, lambda_: float,
          name: str, seed: int, threads: int | None = None) -> torch.Tensor | None:
    """methods_math._della (per-model parameters already expanded); None where it does not apply."""
    k = len(tensors)
    if not 1 <= k <= MAX_BITS_MODELS or base.dim() not in (1, 2) or base.numel() == 0:
        return None
    codes = _codes(base, tensors)
    if codes is None:
        return None
    modes = []
    for rho, eps in zip(densities, epsilons):
        if rho >= 1:
            modes.append(0)
        elif rho <= 0:
            modes.append(1)
        elif rho + eps >= 1 or rho - eps <= 0:
            raise ValueError("della: epsilon must be chosen such that density +/- epsilon is in (0, 1)")
        else:
            modes.append(2)
    lib = library()
    if lib is None:
        return None
    held: list = []
    p = _params(base, tensors, codes, held, threads)
    n = p.n
    p.rows, p.cols = (1, n) if base.dim() == 1 else (base.shape[0], base.shape[1])
    if p.cols > MAX_ROW:
        return None
    groups = (k + rng.MODELS_PER_CALL - 1) // rng.MODELS_PER_CALL
    chunks = rng.chunks(n)
    seeds = np.array([rng.group_seed(seed, rng.chunk_name(name, c, n), g)
                      for c in range(len(chunks)) for g in range(groups)], dtype=np.uint64)
    p.ngroups = groups
    p.seeds = seeds.ctypes.data
    p.chunk = rng.CHUNK_ELEMENTS
    for m, (mode, rho, eps) in enumerate(zip(modes, densities, epsilons)):
        p.mode[m] = mode
        p.lo[m] = rho - eps
        p.eps[m] = eps
    bits = np.empty(n, dtype=np.uint8)
    p.bits = bits.ctypes.data
    lib.fm_della_bits(ctypes.byref(p))
    if p.rows < 0:  # a thread could not allocate its row buffers
        return None
    for m, mode in enumerate(modes):
        if mode == 2 and rescale:
            p.scale[m] = l1_scale(p.total[m], p.kept[m])
    return _combine(lib, p, base.shape, bits, weights, consensus, normalize, lambda_, base.dim(), held,
                    [mode != 0 for mode in modes])


def _top_threshold(keys: np.ndarray, part: np.ndarray, rank: int) -> tuple[int, int]:
    """(key, how many equal to it are in) of top(rank): the elements of the ``rank`` largest keys,
    equal keys by lower index first; (0, -1) for rank 0 (none). ``part`` is ``keys`` partitioned at
    ``keys.size - rank``."""
    if rank <= 0:
        return 0, -1
    t = part[keys.size - rank]
    return int(t), rank - int(np.count_nonzero(keys > t))


def band_bits(lib: ctypes.CDLL, keys: np.ndarray, start: int, end: int, m: int, bits: np.ndarray,
              sums: bool) -> tuple[float, float]:
    """Set bit m of ``bits`` (m < 0: write 1/0 bytes) at the elements of rank [start, end) by key
    descending, index ascending (a stable descending argsort's positions start..end-1); returns the
    double sums of all and of the kept keys' values when ``sums``."""
    n = keys.size
    kth = sorted({n - r for r in (start, end) if 0 < r <= n})
    part = np.partition(keys, kth) if kth else keys
    t_end, need_end = _top_threshold(keys, part, end)
    t_start, need_start = _top_threshold(keys, part, start)
    del part
    out = (ctypes.c_double * 2)()
    lib.fm_sp_band_bits(keys.ctypes.data, n, t_end, need_end, t_start, need_start, m, bits.ctypes.data,
                        out if sums else None)
    return out[0], out[1]


def breadcrumbs(base: torch.Tensor, tensors: Sequence[torch.Tensor], consensus: bool, weights: list[float],
                densities: list[float], gammas: list[float], rescale: bool, normalize: bool, lambda_: float,
                threads: int | None = None) -> torch.Tensor | None:
    """methods_math._breadcrumbs (per-model parameters already expanded); None where it does not apply."""
    k = len(tensors)
    if not 1 <= k <= MAX_BITS_MODELS or base.numel() == 0:
        return None
    if any(rho < 0 for rho in densities) or any(g < 0 for g in gammas):
        return None
    codes = _codes(base, tensors)
    if codes is None:
        return None
    lib = library()
    if lib is None:
        return None
    held: list = []
    p = _params(base, tensors, codes, held, threads)
    n = p.n
    bits = np.zeros(n, dtype=np.uint8)
    keys = None
    masked = [rho < 1 for rho in densities]
    for m, (rho, gamma) in enumerate(zip(densities, gammas)):
        if rho >= 1:
            bits |= np.uint8(1 << m)
            continue
        kept_n = int(rho * n)
        start = min(int(gamma * n), n - kept_n)
        if keys is None:
            keys = np.empty(n, dtype=np.uint32)
        lib.fm_sp_abs_keys(ctypes.byref(p), m, keys.ctypes.data)
        total, kept = band_bits(lib, keys, start, start + kept_n, m, bits, rescale)
        if rescale:
            p.scale[m] = l1_scale(total, kept)
    del keys
    return _combine(lib, p, base.shape, bits, weights, consensus, normalize, lambda_, base.dim(), held, masked)


def top_mask(values: torch.Tensor, m: int) -> torch.Tensor | None:
    """The m elements of largest |value| (ties: lower flat index), as a bool tensor of values'
    shape: ``argsort(values.abs(), descending=True, stable=True)[:m]``; None without the C loop."""
    lib = library()
    if lib is None:
        return None
    flat = values.detach().reshape(-1).to(torch.float32).contiguous()
    keys = flat.abs().view(torch.int32).numpy().view(np.uint32)
    keys = np.where(keys > np.uint32(0x7F800000), np.uint32(0x7FC00000), keys)
    out = np.empty(keys.size, dtype=np.uint8)
    band_bits(lib, keys, 0, m, -1, out, False)
    return torch.from_numpy(out).view(torch.bool).reshape(values.shape)


def var_models(task_vectors: torch.Tensor, threads: int | None = None) -> torch.Tensor | None:
    """``torch.var(task_vectors, dim=0, unbiased=False)`` of fp32 task vectors [K, ...], bit for bit
    (torch's CPU Welford in double per element, in model order), without torch's generic strided
    reduction (200 ns per element); None without the C loop."""
    lib = library()
    if lib is None or task_vectors.dtype != torch.float32 or task_vectors.dim() < 1:
        return None
    tv = task_vectors.contiguous()
    k = tv.shape[0]
    out = torch.empty(tv.shape[1:], dtype=torch.float32)
    if k == 0:
        return None
    lib.fm_sp_var_rows(tv.data_ptr(), k, out.numel(), out.data_ptr(), _threads(threads))
    return out


def sce_combine(task_vectors: torch.Tensor, weights: torch.Tensor, base: torch.Tensor, threads: int | None = None
                ) -> torch.Tensor | None:
    """sce's erase and weighted mean (methods_math.sce after its energy weights) in one pass over the
    fp32 task vectors [K, ...] (K <= COMBINE_MAXK: torch's sums over models in order), no K-sized
    temporaries; None where it does not apply."""
    k = task_vectors.shape[0]
    if not 1 <= k <= COMBINE_MAXK or task_vectors.dtype != torch.float32 or base.dtype != torch.float32:
        return None
    lib = library()
    if lib is None:
        return None
    tv = task_vectors.contiguous()
    w = weights.to(torch.float32).contiguous()
    b = base.contiguous()
    out = torch.empty(b.shape, dtype=torch.float32)
    lib.fm_sp_sce_combine(tv.data_ptr(), k, b.numel(), w.data_ptr(), b.data_ptr(), cpu.CODES["F32"],
                          out.data_ptr(), _threads(threads))
    return out
