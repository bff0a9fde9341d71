"""The fused C loop is optional (issue 13): without a working C compiler, or with FASTMERGE_NO_C=1,
every CPU merge takes the numpy path of ``fastmerge.cpu`` and writes the same bytes, after a
one-line notice; the compiler runs only on the routes that merge with the loop.

Tolerance: none. The numpy path repeats the C loop's fp32 operations in its order, so outputs are
compared bit for bit (NaN, -0 and bf16/fp16 rounding included), for every method and dtype. The one
place where the two may differ is the "l1" rescale: its double-precision sums are added in another
order, so the fp32 scale can differ by one ulp when a sum lies within ~1e-13 (relative) of an fp32
rounding boundary; the seeded data below does not, so dare_ties is compared exactly too.
"""

from __future__ import annotations

import os
import shutil
import stat
import warnings
from pathlib import Path

import pytest
import torch

import fastmerge
from fastmerge import cpu, reference, rng
from fastmerge.merger import Genome, Merger
from fastmerge.spec import FusedOptions, keep_count

from .conftest import TOLERANCES
from .conftest import tensor_family as _family
from .test_math import COMBOS, ODD, _opts
from .test_merge import load_dir

NOTICE = "fused C loop unavailable"
NAME = "model.layers.0.mlp.up_proj.weight"


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor: equal bits, NaN and -0 included."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


@pytest.fixture
def c_loop(monkeypatch):
    """The C loop is built and used (FASTMERGE_NO_C unset); skips where this machine cannot build it."""
    monkeypatch.delenv(cpu.NO_C_ENV, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not cpu.available():
            pytest.skip(f"the fused C loop cannot be built here ({cpu._failure}): nothing to compare against")


def c_and_numpy(monkeypatch, fn):
    """fn() on the C loop, then fn() on the numpy path (forced by FASTMERGE_NO_C)."""
    monkeypatch.delenv(cpu.NO_C_ENV, raising=False)
    want = fn()
    monkeypatch.setenv(cpu.NO_C_ENV, "1")
    try:
        return want, fn()
    finally:
        monkeypatch.delenv(cpu.NO_C_ENV)


def forget_c_loop(mp: pytest.MonkeyPatch, cache: Path) -> None:
    """This process as if the C loop had never been built: nothing loaded, no failure known, no
    notice given, an empty build cache (so a build would have to run the compiler)."""
    mp.setattr(cpu, "_lib", None)
    mp.setattr(cpu, "_failure", None)
    mp.setattr(cpu, "_noticed", False)
    mp.setenv("FASTMERGE_CACHE", str(cache))
    mp.delenv(cpu.NO_C_ENV, raising=False)


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    forget_c_loop(monkeypatch, tmp_path / "empty-cache")


def fake_cc(path: Path, body: str) -> Path:
    """An executable shell script standing in for the C compiler."""
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def notices(record: list) -> list[str]:
    return [str(w.message) for w in record if NOTICE in str(w.message)]


# --- the math: numpy path == C loop, bit for bit ---------------------------------------------------

@pytest.mark.parametrize("n", [ODD, 70001])  # TIES thresholds by a partial sort / by the radix select
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("k", [1, 5])
def test_numpy_path_equals_c_loop(c_loop, monkeypatch, n, dtype, combo, k):
    base, models = _family(n, k, dtype, seed=k)
    opts = _opts(k, combo, lam=1.3)

    def run():
        counts: list[int] = []
        return cpu.fused_merge(base, models, opts, NAME, dtype, nonfinite=counts), counts

    (want, want_counts), (got, got_counts) = c_and_numpy(monkeypatch, run)
    assert got.dtype == dtype
    assert torch.equal(bits(got), bits(want))
    assert got_counts == want_counts == [0] * (k + 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(map(str, c)))
def test_numpy_path_equals_reference(monkeypatch, dtype, combo):
    """Where no C loop exists to compare with, the numpy path still meets the reference, as the
    C loop does in test_math (same tolerances)."""
    monkeypatch.setenv(cpu.NO_C_ENV, "1")
    base, models = _family(ODD, 3, dtype, seed=3)
    opts = _opts(3, combo, lam=1.3)
    want = reference.fused_merge(base, models, opts, NAME, dtype)
    got = cpu.fused_merge(base, models, opts, NAME, dtype)
    torch.testing.assert_close(got, want, **TOLERANCES[dtype])
    assert (got != want).sum() <= 0.001 * ODD


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("with_base", [True, False])
def test_numpy_path_edge_values_pieces_and_chunks(c_loop, monkeypatch, dtype, combo, with_base):
    """NaN/Inf/-0 inputs, no base (linear), six models (two Philox groups), pieces that cut through
    blocks, and tensors of several 2**31-element chunks (shrunk to 1000 here): the same bits and
    the same NaN/Inf counts."""
    n = 4500
    base, models = _family(n, 6, torch.float32, seed=7)
    base[7] = float("nan")
    models[1][[0, 100, n - 1]] = float("inf")
    models[2][5] = -float("inf")
    models[4][9] = float("nan")
    models[3][11], base[11] = -0.0, 0.0
    models[0][12], base[12] = 0.0, -0.0
    base, models = base.to(dtype), [m.to(dtype) for m in models]
    opts = _opts(6, combo, lam=0.7)
    b = base if with_base else None
    for piece, threads in ((None, 1), (333, 3)):  # one piece; many pieces on three threads
        def run(piece=piece, threads=threads):
            counts: list[int] = []
            return cpu.fused_merge(b, models, opts, NAME, dtype, threads=threads, nonfinite=counts,
                                   piece_elements=piece), counts

        (want, want_counts), (got, got_counts) = c_and_numpy(monkeypatch, run)
        assert torch.equal(bits(got), bits(want)), piece
        assert got_counts == want_counts == ([1] if with_base else [0]) + [0, 3, 1, 0, 1, 0]
    monkeypatch.setattr(rng, "CHUNK_ELEMENTS", 1000)
    want, got = c_and_numpy(monkeypatch, lambda: cpu.fused_merge(b, models, opts, NAME, dtype))
    assert torch.equal(bits(got), bits(want))


@pytest.mark.parametrize("case", ["small-f32", "small-bf16", "radix-f32", "radix-bf16", "radix-one-bin"])
def test_numpy_thresholds_are_exact(c_loop, monkeypatch, case):
    """The same exact m-th largest |delta| as the C loop's select: by a partial sort (small), by the
    two-level radix select (others), and in a radix bin holding keys with zero and with nonzero low
    bits (as test_math); NaN deltas count as the largest on both paths."""
    n = ODD if case.startswith("small") else 3 * cpu.SMALL_SELECT + 17
    base, models = _family(n, 3, torch.bfloat16 if case.endswith("bf16") else torch.float32, seed=n)
    if case == "radix-one-bin":
        g = torch.Generator().manual_seed(3)
        vals = torch.where(torch.rand(n, generator=g) < 0.5, torch.ones(n),
                           1.0 + torch.randint(1, 100, (n,), generator=g).float() * 2.0**-20)
        base = torch.randn(n, generator=g).round()  # integers: x - base is exact
        models = [base + vals, base - vals * 0.5, base + vals * 2]
    models[2] = models[2].clone()
    models[2][[3, 4]] = float("nan")
    monkeypatch.setattr(cpu, "NP_HIST_PIECE", 7001)  # histograms of many pieces, summed across threads
    for dens in ((0.3, 0.55, 0.8), (0.0, 1e-4, 1.0), (0.999, 0.5, 0.05)):
        want, got = c_and_numpy(monkeypatch, lambda: cpu.fused_thresholds(base, models, dens, threads=3))  # noqa: B023
        assert got == want, dens
        for x, d, tau in zip(models[:2], dens, got):
            delta = (x.float() - base.float()).abs()
            m = keep_count(d, n)
            assert tau == (float("inf") if m == 0 else torch.sort(delta, descending=True).values[m - 1].item())


@pytest.mark.parametrize("j0", [0, 2**31 - 3000])  # the start and the end of a chunk's counters
def test_numpy_philox_is_the_spec(j0):
    seed = rng.group_seed(11, NAME, 1)
    cnt = 2500
    got = cpu._np_philox(seed, j0, cnt)
    lanes = rng.philox4x32(torch.arange(j0, j0 + cnt, dtype=torch.int64), seed)
    for lane in range(4):
        assert torch.equal(torch.from_numpy(got[lane]), rng.uint_to_uniform(lanes[lane])), lane


# --- end to end: the streaming merge and the in-memory Merger ---------------------------------------

def recipe(method: str, base: Path, ft0: Path, ft1: Path) -> dict:
    models = [{"model": str(ft0), "parameters": {"weight": 0.6, "density": 0.5}},
              {"model": str(ft1), "parameters": {"weight": 0.8, "density": 0.7}}]
    if method == "linear":
        return {"merge_method": "linear", "models": [{"model": m["model"], "parameters": {"weight": m["parameters"]["weight"]}}
                                                     for m in models]}
    return {"merge_method": method, "base_model": str(base), "models": models, "parameters": {"lambda": 1.1},
            "random_seed": 4}


def shard_bytes(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.glob("*.safetensors"))}


METHODS = {  # what each recipe means for the reference: (sparsify, consensus, rescale, normalize, lambda)
    "task_arithmetic": ("none", "none", "none", False, 1.1),
    "ties": ("magnitude", "sum", "none", True, 1.1),
    "dare_ties": ("random", "sum", "l1", False, 1.1),
    "linear": ("none", "none", "none", True, 1.0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", list(METHODS))
def test_forced_fallback_merge_writes_the_same_bytes(families, tmp_path, monkeypatch, method, dtype):
    base, ft0, ft1 = families("llama", dtype)
    r = recipe(method, base, ft0, ft1)
    monkeypatch.setenv(cpu.NO_C_ENV, "1")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fastmerge.merge(r, tmp_path / "numpy")
    assert not notices(record)  # asked for: no notice
    got = load_dir(tmp_path / "numpy")
    src = [load_dir(p) for p in (base, ft0, ft1)]
    sp, cs, rs, norm, lam = METHODS[method]
    opts = FusedOptions(weights=(0.6, 0.8), densities=(0.5, 0.7), sparsify=sp, consensus=cs, rescale=rs,
                        normalize=norm, lambda_=lam, seed=4)
    for name, t in got.items():
        b = src[0][name] if method != "linear" else None
        want = reference.fused_merge(b, [src[1][name], src[2][name]], opts, name, dtype)
        torch.testing.assert_close(t, want, **TOLERANCES[dtype], msg=name)
    monkeypatch.delenv(cpu.NO_C_ENV)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not cpu.available():
            pytest.skip(f"no C loop to compare with ({cpu._failure})")
    fastmerge.merge(r, tmp_path / "c")
    want_bytes, got_bytes = shard_bytes(tmp_path / "c"), shard_bytes(tmp_path / "numpy")
    assert want_bytes.keys() == got_bytes.keys() and want_bytes
    for f in want_bytes:
        assert got_bytes[f] == want_bytes[f], f


def test_forced_fallback_vocab_mismatch_rows(families, tmp_path, monkeypatch, c_loop):
    """The route through torch tensors (a vocabulary mismatch merges the common rows)."""
    base, ft0, ft1 = families("llama", vocab_overrides={0: 250})
    r = recipe("dare_ties", base, ft0, ft1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c_and_numpy(monkeypatch, lambda: fastmerge.merge(r, tmp_path / ("numpy" if cpu._disabled() else "c")))
    assert shard_bytes(tmp_path / "numpy") == shard_bytes(tmp_path / "c")


@pytest.mark.parametrize("method,dtype", [("dare_ties", torch.float32), ("ties", torch.bfloat16)])
def test_merger_falls_back_the_same_way(families, monkeypatch, c_loop, method, dtype):
    base, ft0, ft1 = families("llama", dtype)
    genome = Genome(weights=[[0.3, 1.2], [1.0, 0.2]], densities=[0.4, 0.9])

    def run():
        merger = Merger(recipe(method, base, ft0, ft1))
        first = {k: v.clone() for k, v in merger.module.state_dict().items()}
        return first, dict(merger.merge(genome).state_dict())

    (want0, want1), (got0, got1) = c_and_numpy(monkeypatch, run)
    for want, got in ((want0, got0), (want1, got1)):
        assert want.keys() == got.keys()
        for name in want:
            assert torch.equal(bits(got[name]), bits(want[name])), name


# --- when the build fails: one notice, the same results, and the compiler only where needed --------

def test_no_compiler_gives_one_notice_and_the_same_results(families, tmp_path, monkeypatch, c_loop):
    base, ft0, ft1 = families("llama", torch.bfloat16)
    fastmerge.merge(recipe("ties", base, ft0, ft1), tmp_path / "c-ties")
    want_merger = dict(Merger(recipe("dare_ties", base, ft0, ft1)).module.state_dict())

    for attr, value in (("_lib", None), ("_failure", None), ("_noticed", False)):
        monkeypatch.setattr(cpu, attr, value)
    monkeypatch.setenv("FASTMERGE_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fastmerge.merge(recipe("ties", base, ft0, ft1), tmp_path / "numpy-ties")
        fastmerge.merge(recipe("dare_ties", base, ft0, ft1), tmp_path / "numpy-dare")
        got_merger = dict(Merger(recipe("dare_ties", base, ft0, ft1)).module.state_dict())
    said = notices(record)
    assert len(said) == 1, said
    assert "\n" not in said[0] and "no-such-cc" in said[0] and "set CC" in said[0] and "numpy path" in said[0]
    assert cpu._lib is None and not cpu.available()
    assert shard_bytes(tmp_path / "numpy-ties") == shard_bytes(tmp_path / "c-ties")
    for name, t in want_merger.items():
        assert torch.equal(bits(got_merger[name]), bits(t)), name


@pytest.mark.parametrize("script,says", [
    ("echo \"fused.c:13:10: fatal error: omp.h: No such file or directory\" >&2; exit 1", "no OpenMP"),
    ("echo \"clang: error: unsupported option '-fopenmp'\" >&2; exit 1", "no OpenMP"),
    ("echo \"fused.c:61:15: error: unknown type name '_Float16'\" >&2; exit 1", "no _Float16"),
    ("echo 'fused.c:1:1: error: something else broke' >&2; exit 1", "something else broke"),
    # "succeeds" but writes a file that is no library: the load fails
    ("while [ $# -gt 0 ]; do [ \"$1\" = -o ] && echo junk > \"$2\"; shift; done; exit 0", "loading the built"),
    ("exit 0", "failed"),  # claims success, writes nothing
])
def test_build_failures_fall_back_with_the_reason(fresh, tmp_path, monkeypatch, script, says):
    monkeypatch.setenv("CC", str(fake_cc(tmp_path / "cc", script)))
    with pytest.warns(UserWarning, match=NOTICE) as record:
        assert not cpu.available()
    said = notices(record)
    assert len(said) == 1 and says in said[0] and "\n" not in said[0]
    with pytest.raises(fastmerge.FastmergeError, match="unavailable"):
        cpu.library()
    base, models = _family(ODD, 2, torch.bfloat16)
    opts = _opts(2, ("random", "sum", "l1", False))
    got = cpu.fused_merge(base, models, opts, NAME, torch.bfloat16)  # the numpy path, no second notice
    want = reference.fused_merge(base, models, opts, NAME, torch.bfloat16)
    assert torch.equal(bits(got), bits(want))


def test_a_compiler_without_march_native_still_builds(fresh, tmp_path, monkeypatch):
    """A compiler that refuses -march=native (older clang, other architectures) builds without it."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("no gcc here")
    log = tmp_path / "cc.log"
    monkeypatch.setenv("CC", str(fake_cc(tmp_path / "cc", f'''echo "$@" >> "{log}"
for a in "$@"; do
  if [ "$a" = -march=native ]; then echo "cc: error: unsupported argument 'native' to option '-march='" >&2; exit 1; fi
done
exec "{gcc}" "$@"
''')))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not cpu.available():
            pytest.skip(f"gcc cannot build the loop here ({cpu._failure})")
    calls = log.read_text().splitlines()
    assert len(calls) == 2 and "-march=native" in calls[0] and "-march" not in calls[1]
    assert cpu._lib is not None and cpu._failure is None  # the C loop, built without -march
    base, models = _family(ODD, 5, torch.bfloat16)
    opts = _opts(5, ("random", "sum", "l1", False))
    want = reference.fused_merge(base, models, opts, NAME, torch.bfloat16)
    assert torch.equal(bits(cpu.fused_merge(base, models, opts, NAME, torch.bfloat16)), bits(want))


def test_no_compiler_on_the_path(fresh, tmp_path, monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.warns(UserWarning, match="no C compiler found: install gcc or set CC"):
        assert not cpu.available()


def test_forced_fallback_never_builds(fresh, tmp_path, monkeypatch):
    log = tmp_path / "cc.log"
    monkeypatch.setenv("CC", str(fake_cc(tmp_path / "cc", f'echo "$@" >> "{log}"\nexit 1\n')))
    monkeypatch.setenv(cpu.NO_C_ENV, "1")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert not cpu.available()
        base, models = _family(ODD, 2, torch.float32)
        cpu.fused_merge(base, models, _opts(2, ("magnitude", "sum", "none", True)), NAME, torch.float32)
    assert not notices(record) and not log.exists()
    with pytest.raises(fastmerge.FastmergeError, match=cpu.NO_C_ENV):
        cpu.library()


def test_only_the_fused_cpu_route_runs_the_compiler(families, fresh, tmp_path, monkeypatch):
    """slerp, passthrough (with and without a scale) and a linear merge on the Triton backend never
    run $CC (a script that records its calls, with an empty build cache); a CPU task-arithmetic
    merge does, once per process, and falls back when it fails."""
    log = tmp_path / "cc.log"
    monkeypatch.setenv("CC", str(fake_cc(tmp_path / "cc", f'echo "$@" >> "{log}"\nexit 1\n')))
    base, ft0, ft1 = families("llama", torch.float32, hidden=32)
    fastmerge.merge({"merge_method": "slerp", "base_model": str(base),
                     "models": [{"model": str(base)}, {"model": str(ft0)}], "parameters": {"t": 0.3}},
                    tmp_path / "slerp")
    fastmerge.merge({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(base), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(ft1), "layer_range": [1, 2], "parameters": {"scale": 0.5}}]},
    ]}, tmp_path / "stack")
    linear = recipe("linear", base, ft0, ft1)
    try:
        import triton  # noqa: F401
    except ImportError:
        triton = None
    if triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        fastmerge.merge(linear, tmp_path / "linear-triton", fastmerge.MergeOptions(backend="triton"))
    assert not log.exists(), log.read_text()
    assert cpu._lib is None and cpu._failure is None

    with pytest.warns(UserWarning, match=NOTICE):
        fastmerge.merge(linear, tmp_path / "linear-cpu")
    fastmerge.merge(recipe("ties", base, ft0, ft1), tmp_path / "ties-cpu")  # a known failure is not retried
    assert len(log.read_text().splitlines()) == 1
    assert "-fopenmp" in log.read_text()
    if (tmp_path / "linear-triton").exists():
        for name, t in load_dir(tmp_path / "linear-cpu").items():
            torch.testing.assert_close(load_dir(tmp_path / "linear-triton")[name], t, **TOLERANCES[torch.float32])


def test_a_real_compiler_is_found_and_cached(fresh, monkeypatch, tmp_path):
    """With a working gcc the first call builds into the (empty) cache and a second process-fresh
    call reuses the built library without running the compiler."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("no gcc here")
    log = tmp_path / "cc.log"
    monkeypatch.setenv("CC", str(fake_cc(tmp_path / "cc", f'echo "$@" >> "{log}"\nexec "{gcc}" "$@"\n')))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not cpu.available():
            pytest.skip(f"gcc cannot build the loop here ({cpu._failure})")
    assert len(log.read_text().splitlines()) == 1
    assert list((tmp_path / "empty-cache").glob("fused-*.so"))
    monkeypatch.setattr(cpu, "_lib", None)
    assert cpu.available()
    assert len(log.read_text().splitlines()) == 1
