"""Every vector path of the C loop writes the numpy path's bits.

``fused.c`` is built with ``-march=native``, so a machine builds and runs only its widest path:
AVX-512 (16 Philox lanes, masked selects), AVX2 (8 lanes, vpmuludq through intrinsics) or GCC's
generic vectors (8 lanes; SSE2 on x86-64). Without this file, the AVX2 path ran only on machines
that lack AVX-512, and the generic one nowhere. Here the compiler is told to leave the wider ISAs
out (``CC="gcc -mno-avx512f ..."``: explicit ``-mno-*`` flags win over ``-march=native``), the
library is built into an empty cache, checked to have taken that path (``cpu.isa()``), and its
outputs are compared with the numpy twin's, which test_cpu_fallback compares with the native build.

Tolerance: none (bits; NaN as NaN for the sparsifying methods, as in test_sparsify_cpu).
"""

from __future__ import annotations

import platform
import shutil
import warnings

import pytest
import torch

from fastmerge import cpu, methods_math

from .conftest import tensor_family as _family
from .test_cpu_fallback import NAME, bits, forget_c_loop
from .test_math import COMBOS, ODD, _opts
from .test_sparsify_cpu import _bits, cases, family

PATHS = {  # path -> the flags that leave the wider ISAs out, and the CPU flag the path needs
    "avx2": (["-mno-avx512f"], "avx2"),
    "generic": (["-mno-avx512f", "-mno-avx2", "-mno-avx", "-mno-fma"], None),
}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=list(PATHS))
def vector_path(request, tmp_path_factory):
    """The C loop of one vector path, loaded in place of the native one for this module's tests."""
    flags, needs = PATHS[request.param]
    gcc = shutil.which("gcc")
    if platform.machine() not in ("x86_64", "AMD64") or gcc is None:
        pytest.skip("the ISA paths are x86-64 builds with gcc")
    if needs and needs not in cpu._cpu_fingerprint().split(":", 1)[-1].split():  # /proc/cpuinfo's flags
        pytest.skip(f"this CPU cannot run the {request.param} path (no {needs})")
    with pytest.MonkeyPatch.context() as mp:
        forget_c_loop(mp, tmp_path_factory.mktemp(f"cache-{request.param}"))
        mp.setenv("CC", " ".join([gcc, *flags]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if not cpu.available():
                pytest.fail(f"gcc {' '.join(flags)} did not build the C loop: {cpu._failure}")
        assert cpu.isa() == request.param
        yield request.param


def _numpy(monkeypatch, fn):
    monkeypatch.setenv(cpu.NO_C_ENV, "1")
    try:
        return fn()
    finally:
        monkeypatch.delenv(cpu.NO_C_ENV)


@pytest.mark.parametrize("n", [ODD, 70001])  # TIES thresholds by a partial sort / by the radix select
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(map(str, c)))
def test_fused_merge_equals_numpy(vector_path, monkeypatch, n, dtype, combo):
    for k in (1, 5):  # 5: two Philox groups, the second one partly used
        base, models = _family(n, k, dtype, seed=k)
        opts = _opts(k, combo, lam=1.3)

        def run(base=base, models=models, opts=opts):
            counts: list[int] = []
            return cpu.fused_merge(base, models, opts, NAME, dtype, nonfinite=counts), counts

        (got, got_counts), (want, want_counts) = run(), _numpy(monkeypatch, run)
        assert torch.equal(bits(got), bits(want)), f"{vector_path} k={k}"
        assert got_counts == want_counts


def test_uniforms_equal_the_reference(vector_path):
    for numel in (1, 15, 17, 4099):  # below, at and past the vector width; a scalar tail
        for k in range(6):
            got = methods_math.uniforms(3, NAME, k, numel)
            want = methods_math.uniforms_reference(3, NAME, k, numel)
            assert torch.equal(got.view(torch.int32), want.view(torch.int32)), f"{vector_path} {numel} k={k}"


@pytest.mark.parametrize("method", ["della", "della_linear", "breadcrumbs", "breadcrumbs_ties", "sce"])
def test_sparsifying_methods_equal_numpy(vector_path, monkeypatch, method):
    for shape, k, seed in (((37, 53), 3, 0), ((64, 257), 4, 7)):
        base, xs = family(shape, k, torch.bfloat16, seed, tied=seed == 7)
        for kw in cases(method, k):
            kw = dict(kw, name=NAME, seed=seed)

            def run(kw=kw, base=base, xs=xs):
                return methods_math.METHODS[method](base, xs, **kw)

            got, want = run(), _numpy(monkeypatch, run)
            diff = int((_bits(got) != _bits(want)).sum())
            assert diff == 0, f"{vector_path} {method} {shape} k={k}: {diff} elements differ"
