"""The compiled NB / ZINB kernel (runtime/maths/_kernels.c) against numpy's (PEAKVI's
Bernoulli one: tests/runtime/test_peakvi.py runs its kernel tests with both): the same sums to
float32 rounding; numpy's answers for what it is not written for; any memory layout; and the
same bits from every instruction set it is built for."""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess

import numpy as np
import pytest

from scvi_onnx.data.entries import Entries
from scvi_onnx.maths import native, rng
from scvi_onnx.maths.likelihood import MinibatchScorer, count_constant

pytestmark = pytest.mark.skipif(
    native._library() is None, reason="the compiled likelihood kernel is not built"
)

N, G, S = 40, 517, 6  # G: not a multiple of the kernel's 16 lanes


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(5)
    x = rng.poisson(rng.gamma(0.4, 3, (N, G))).astype(np.float32)
    x[0] = 0.0
    x[1, :4] = [1e-9, 2.5, 3000.0, 1.0]  # below eps, non-integer, large
    mu = (rng.lognormal(-1, 2.5, (S, N, G))).astype(np.float32)
    mu[0, 2, :10] = 0.0
    pi = rng.normal(0, 4, (S, N, G)).astype(np.float32)
    pi[1, 3, :5] = [-79.9, 79.9, 40.0, -40.0, 0.0]
    return rng, x, mu, pi


def scores(lik, x, theta, mu, pi, kernel):
    e = Entries.from_dense(x)
    scorer = MinibatchScorer(lik, x, e, theta, count_constant(e, theta, likelihood=lik))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(native.ENV, kernel)
        return scorer.score(mu, pi if lik == "zinb" else None)


@pytest.mark.parametrize("lik", ["nb", "zinb"])
@pytest.mark.parametrize("per_cell", [False, True], ids=["theta-gene", "theta-cell"])
def test_compiled_equals_numpy_to_float32_rounding(inputs, lik, per_cell):
    rng, x, mu, pi = inputs
    theta = (rng.gamma(1, 2, (N, G) if per_cell else G) + 1e-3).astype(np.float32)
    got = scores(lik, x, theta, mu, pi, "")
    want = scores(lik, x, theta, mu, pi, "numpy")
    assert not np.array_equal(got, want)  # the compiled kernel did run (other roundings)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-3)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's kernel on such values
@pytest.mark.parametrize("lik", ["nb", "zinb"])
@pytest.mark.parametrize(
    "where", ["mu-inf", "mu-nan", "mu-negative", "mu-huge", "pi-low", "pi-nan", "pi-inf"]
)
def test_values_it_is_not_written_for_get_numpys_answer(inputs, lik, where):
    """A non-finite or negative mean, a ratio mu / theta that overflows float32, a dropout
    logit below -80 or not finite: the compiled kernel declines the call and numpy's kernel
    answers it, bit for bit what it gives alone (inf, NaN, or its stable ZINB path)."""
    if lik == "nb" and where.startswith("pi"):
        pytest.skip("NB has no dropout")
    rng, x, mu, pi = inputs
    mu, pi = mu.copy(), pi.copy()
    theta = (rng.gamma(1, 2, G) + 1e-3).astype(np.float32)
    target, value = {
        "mu-inf": (mu, np.inf),
        "mu-nan": (mu, np.nan),
        "mu-negative": (mu, -1.0),
        "mu-huge": (mu, 3e38),
        "pi-low": (pi, -200.0),
        "pi-nan": (pi, np.nan),
        "pi-inf": (pi, np.inf),
    }[where]
    target[2, 7, 100] = value
    if where == "mu-huge":
        theta[100] = 1e-3  # 1 + mu / theta overflows
    got = scores(lik, x, theta, mu, pi, "")
    want = scores(lik, x, theta, mu, pi, "numpy")
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("lik", ["nb", "zinb"])
def test_any_layout_gives_the_same_bits(inputs, lik):
    """Cells taken out of a larger decoder output (strided views), a Fortran-ordered or
    non-float32 one (copied): the same bits as the contiguous array."""
    rng, x, mu, pi = inputs
    theta = (rng.gamma(1, 2, G) + 1e-3).astype(np.float32)
    rows = np.array([3, 9, 10, 30])
    want = scores(lik, x[rows], theta, np.ascontiguousarray(mu[:, rows]), pi[:, rows].copy(), "")
    sub = slice(3, 31, 3)
    for m, p in [
        (mu[:, 3:31:3], pi[:, 3:31:3]),
        (np.asfortranarray(mu[:, sub]), np.asfortranarray(pi[:, sub])),
        (mu[:, sub].astype(np.float64), pi[:, sub]),
    ]:
        got = scores(lik, x[sub], theta, m, p, "")
        ref = scores(lik, x[sub], theta, np.ascontiguousarray(mu[:, sub]), pi[:, sub].copy(), "")
        np.testing.assert_array_equal(got, ref)
    # a cell's sum does not depend on the other cells of the call
    full = scores(lik, x, theta, mu, pi, "")
    np.testing.assert_array_equal(want, full[:, rows])


def _isa_levels() -> list[str]:
    """The x86-64 levels this CPU runs (of v1, v3, v4)."""
    flags = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    levels = ["x86-64"]
    if " avx2 " in flags and " fma " in flags:
        levels.append("x86-64-v3")
    if " avx512f " in flags and " avx512bw " in flags and " avx512vl " in flags:
        levels.append("x86-64-v4")
    return levels


@pytest.fixture(scope="module")
def case(inputs):
    """Every kernel function's inputs: NB sums with a per-gene theta and ZINB sums with a
    per-cell one, PEAKVI's Bernoulli sums (the decoder's p in (0, 1), -(d f) per region,
    accessibility), the noise's uniforms (cell ids and counters that wrap around 2^64)."""
    rng, x, mu, pi = inputs
    theta = (rng.gamma(1, 2, G) + 1e-3).astype(np.float32)
    theta_cell = (rng.gamma(1, 2, (N, G)) + 1e-3).astype(np.float32)
    e = Entries.from_dense(x)
    return dict(
        mu=mu,
        pi=pi,
        inv=np.float32(1) / (theta + np.float32(1e-8)),
        theta=theta,
        inv_cell=np.float32(1) / (theta_cell + np.float32(1e-8)),
        theta_cell=theta_cell,
        x=x,
        px=(mu / (np.float32(1) + mu)).astype(np.float32),
        neg_d=-rng.uniform(0.2, 1, N).astype(np.float32),
        f=rng.uniform(0.3, 1, G).astype(np.float32),  # region factors
        indptr=e.indptr.astype(np.int64),
        cols=e.cols.astype(np.int64),
        key_start=np.array([12345, 2**64 - 50], dtype=np.uint64),
        cells=np.array([0, 3, 2**40, 2**64 - 1], dtype=np.uint64),
    )


N_UNIFORMS = 101  # per cell


def library_outputs(lib, c: dict) -> dict:
    """Every function of a loaded kernel library on ``case``'s inputs (``kernel_driver.c``
    makes the same calls)."""
    nb, zinb, bce = np.empty((S, N)), np.empty((S, N)), np.empty((S, N))
    flags = np.zeros((S, N), np.int8)
    f = np.float32(1e-8)
    returns = np.array([
        lib.nb_rows(
            c["mu"].ctypes.data, S, N, G, N * G, G, c["inv"].ctypes.data,
            c["theta"].ctypes.data, 0, c["x"].ctypes.data, f, nb.ctypes.data, N,
        ),
        lib.zinb_rows(
            c["mu"].ctypes.data, c["pi"].ctypes.data, S, N, G, N * G, G,
            c["inv_cell"].ctypes.data, c["theta_cell"].ctypes.data, G, c["x"].ctypes.data, f,
            zinb.ctypes.data, N,
        ),
        lib.bce_rows(
            c["px"].ctypes.data, S, N, G, N * G, G, c["neg_d"].ctypes.data, c["f"].ctypes.data,
            c["indptr"].ctypes.data, c["cols"].ctypes.data, bce.ctypes.data, N,
            flags.ctypes.data,
        ),
    ])  # fmt: skip
    u = np.empty((c["cells"].size, N_UNIFORMS))
    key, start = (int(v) for v in c["key_start"])
    lib.splitmix_uniforms(
        key, c["cells"].ctypes.data, c["cells"].size, N_UNIFORMS, start, u.ctypes.data
    )
    return dict(nb=nb, zinb=zinb, bce=bce, flags=flags, returns=returns, uniforms=u)


def assert_same_bits(got: dict, want: dict, build: str) -> None:
    assert not want["returns"][:2].any()  # (NB and ZINB took every value)
    ok = want["flags"] == 0  # (flagged Bernoulli rows are summed by the caller)
    assert ok.any()
    np.testing.assert_array_equal(got["flags"], want["flags"], err_msg=build)
    np.testing.assert_array_equal(got["bce"][ok], want["bce"][ok], err_msg=build)
    for k in ("nb", "zinb", "returns", "uniforms"):
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"{build}: {k}")


FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno"]  # setup.py's
SOURCE = os.path.join(os.path.dirname(native.__file__), "_kernels.c")


@pytest.mark.skipif(
    platform.machine() != "x86_64" or shutil.which("gcc") is None,
    reason="needs gcc on x86-64",
)
def test_every_instruction_set_gives_the_same_bits(case, tmp_path):
    """The kernel's sums do not depend on the vector width it runs with: the source built
    for each x86-64 level this CPU has (SSE2, AVX2, AVX-512), one library each, the same
    bits for NB, ZINB and PEAKVI's Bernoulli sums and the noise's uniforms (integer
    arithmetic, 64-bit products emulated below AVX-512)."""
    levels = _isa_levels()
    if len(levels) < 2:
        pytest.skip("this CPU runs one x86-64 level only")
    results = {}
    for level in levels:
        lib_path = tmp_path / f"k-{level}.so"
        subprocess.run(
            ["gcc", *FLAGS, "-fPIC", "-shared", f"-march={level}", "-DSCVI_ONNX_NO_CLONES",
             "-o", str(lib_path), SOURCE],
            check=True,
        )  # fmt: skip
        results[level] = library_outputs(native.declare(ctypes.CDLL(str(lib_path))), case)
    for level in levels[1:]:
        assert_same_bits(results[level], results[levels[0]], level)


DRIVER = os.path.join(os.path.dirname(__file__), "kernel_driver.c")


def driver_outputs(command: list[str], c: dict, tmp_path) -> dict:
    """``kernel_driver.c`` (built into ``command[-1]``, run by ``command``) on ``case``."""
    src, out = tmp_path / "in.bin", tmp_path / "out.bin"
    header = np.array([S, N, G, G, c["cells"].size, N_UNIFORMS], dtype=np.int64)
    order = ["mu", "pi", "inv", "theta", "inv_cell", "theta_cell", "x", "px", "neg_d", "f",
             "indptr", "cols", "key_start", "cells"]  # fmt: skip
    src.write_bytes(
        b"".join(np.ascontiguousarray(a).tobytes() for a in [header, *map(c.get, order)])
    )
    subprocess.run([*command, str(src), str(out)], check=True, timeout=600)
    raw = out.read_bytes()
    parts, at = {}, 0
    for k, dtype, shape in [("nb", "f8", (S, N)), ("zinb", "f8", (S, N)), ("bce", "f8", (S, N)),
                            ("flags", "i1", (S, N)), ("returns", "i8", (3,)),
                            ("uniforms", "f8", (c["cells"].size, N_UNIFORMS))]:  # fmt: skip
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        parts[k] = np.frombuffer(raw[at : at + size], dtype=dtype).reshape(shape)
        at += size
    assert at == len(raw)
    return parts


#: Builds of the kernel beside the installed one: (name, compiler, extra flags, runner, other
#: tools needed), each run where its tools are installed (`make kernel-builds` installs them on
#: Debian / Ubuntu). The first, the host's gcc, checks the driver itself against the installed
#: library. clang for aarch64 is the compiler and instruction set of a Mac with Apple silicon
#: (it links with the aarch64 gcc's libraries).
OTHER_BUILDS = [
    ("the host's gcc (no clones)", "gcc", ["-DSCVI_ONNX_NO_CLONES"], [], []),
    ("clang (no clones)", "clang", [], [], []),
    ("aarch64 gcc (NEON), under qemu", "aarch64-linux-gnu-gcc", ["-static"], ["qemu-aarch64"], []),
    ("aarch64 clang (NEON), under qemu", "clang", ["--target=aarch64-linux-gnu", "-static"],
     ["qemu-aarch64"], ["aarch64-linux-gnu-gcc"]),
    ("Windows x86-64 (mingw-w64), under wine", "x86_64-w64-mingw32-gcc", ["-static"], ["wine"],
     []),
]  # fmt: skip


@pytest.mark.parametrize("build", OTHER_BUILDS, ids=lambda b: b[0])
def test_other_compilers_and_architectures_give_the_same_bits(build, case, tmp_path, monkeypatch):
    """The source built by another compiler or for another architecture (clang, which the
    kernel's GCC-only clones leave out; aarch64's NEON by gcc and clang, run under qemu-user;
    Windows' ABI by mingw-w64, run under wine) gives the installed library's bits: through
    ``kernel_driver.c``, which makes ``library_outputs``' calls from a file (no Python of that
    build is needed)."""
    name, cc, flags, runner, needs = build
    missing = [t for t in [cc, *runner, *needs] if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{name}: {', '.join(missing)} not installed (make kernel-builds)")
    exe = tmp_path / ("kernel_driver.exe" if "mingw" in cc else "kernel_driver")
    subprocess.run([cc, *FLAGS, *flags, "-o", str(exe), DRIVER, SOURCE], check=True)
    want = library_outputs(native._library(), case)
    monkeypatch.setenv("WINEDEBUG", "-all")  # wine's own messages
    assert_same_bits(driver_outputs([*runner, str(exe)], case, tmp_path), want, name)


def test_compiled_and_numpy_integer_parts_give_the_same_bits(monkeypatch):
    """The noise's uniforms (rng.normals): the compiled integer part gives numpy's bits."""
    big = np.array([2**40, 2**63, 2**64 - 1], dtype=np.uint64)
    cells = np.concatenate([np.arange(300, dtype=np.uint64), big])
    # starts whose counters wrap around 2^64 (j * golden and c + j * golden do anyway)
    for seed, stream, start in [(0, 1, 0), (-7, 5, 10**12), (2**70, 3, 2**64 - 100)]:
        monkeypatch.setenv(native.ENV, "")
        compiled = rng.normals(seed, stream, cells, 257, start=start)
        monkeypatch.setenv(native.ENV, "numpy")
        numpy_ = rng.normals(seed, stream, cells, 257, start=start)
        np.testing.assert_array_equal(compiled, numpy_)
