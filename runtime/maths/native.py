"""The compiled likelihood kernel (``_kernels.c``): NB / ZINB and PEAKVI's Bernoulli, and the
integer part of the noise (:func:`uniforms`, the same bits as ``rng``'s numpy code).

``pip install`` compiles ``_kernels.c`` where a C compiler is present (an optional extension:
without one the install goes on). It is a plain shared library, opened here with ctypes on
first use. :class:`~scvi_onnx.maths.likelihood.MinibatchScorer` then sums the NB and ZINB
log-likelihood in one pass over its inputs instead of numpy's 9 and 18 passes (in the
marginal LL, one thread: NB 2x, ZINB 1.6x faster; see ``docs/performance.md``), and
:class:`~scvi_onnx.maths.likelihood.BernoulliScorer` PEAKVI's, with the same products of four
factors as its numpy passes (3-4x faster). numpy's kernels run where the library is absent,
where ``SCVI_ONNX_KERNELS=numpy`` is set, and for values the C functions are not written for
(a non-finite mean or dropout logit, which they count and numpy answers as IEEE does; a
PEAKVI row with a factor of 0, summed with torch's clamps).

The two agree to float32 rounding (~1e-7 of a cell's sum), not bit for bit: the compiled one
sums in double lanes whose order its source fixes, so its bits do not depend on the CPU's
vector width either; numpy's SIMD ``log`` and ``exp`` differ between instruction sets.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import logging
import os
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: Set to ``numpy`` to use numpy's kernel even where the compiled one is built.
ENV = "SCVI_ONNX_KERNELS"
_NAME = "_kernels"

_P = ctypes.c_void_p
_I = ctypes.c_int64
_F = ctypes.c_float


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled library, opened once per process; ``None`` where none was built."""
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"{_NAME}{suffix}"
        if not path.is_file():
            continue
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:  # a library built for another platform, a broken file
            log.warning("%s could not be opened (%s); using numpy's likelihood kernel", path, e)
            return None
        return declare(lib)
    return None


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """``lib`` with the C functions' signatures (``_kernels.c``) declared."""
    lib.nb_rows.restype = _I
    lib.nb_rows.argtypes = [_P, _I, _I, _I, _I, _I, _P, _P, _I, _P, _F, _P, _I]
    lib.zinb_rows.restype = _I
    lib.zinb_rows.argtypes = [_P, _P, *[_I] * 5, _P, _P, _I, _P, _F, _P, _I]
    lib.bce_rows.restype = _I
    lib.bce_rows.argtypes = [_P, *[_I] * 5, _P, _P, _P, _P, _P, _I, _P]
    lib.splitmix_uniforms.restype = None
    lib.splitmix_uniforms.argtypes = [ctypes.c_uint64, _P, _I, _I, ctypes.c_uint64, _P]
    return lib


def _turned_off() -> bool:
    return os.environ.get(ENV, "").strip().lower() == "numpy"


def _running() -> ctypes.CDLL | None:
    """The library where the compiled kernel runs (built, and not turned off)."""
    return None if _turned_off() else _library()


def available() -> bool:
    """Whether the compiled kernel runs (built, and not turned off by ``SCVI_ONNX_KERNELS``)."""
    return _running() is not None


def describe() -> str:
    """Which kernel sums the likelihoods in this process, and why (for ``info``)."""
    if _turned_off():
        return f"numpy's ({ENV}=numpy)"
    if _library() is None:
        return "numpy's (the compiled kernel was not built: no C compiler at install)"
    return "compiled (one pass)"


def _blocks(*blocks: np.ndarray) -> tuple[list[np.ndarray], int, int]:
    """``(S, n, G)`` blocks as the C functions take them: float32 with one layout, genes
    contiguous (passed as they are, else copied: the same bits), and their sample and cell
    strides in elements."""
    a = blocks[0]
    takes = (
        all(b.dtype == np.float32 and b.strides == a.strides and b.shape == a.shape for b in blocks)
        and a.strides[-1] == 4
        and all(st % 4 == 0 for st in a.strides)
    )
    if not takes:
        blocks = tuple(np.ascontiguousarray(b, dtype=np.float32) for b in blocks)
    return list(blocks), blocks[0].strides[0] // 4, blocks[0].strides[1] // 4


def _per_cell(a: np.ndarray, n: int, G: int) -> tuple[np.ndarray, int]:
    """A ``(G,)`` or ``(n, G)`` float32 array and its row stride (0: one row for every cell)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    if a.ndim == 2 and a.shape[0] == 1:
        a = a[0]
    if a.shape not in ((G,), (n, G)):  # (the pointer arithmetic needs one of the two)
        raise ValueError(f"a per-gene array of shape {a.shape} for {n} cells x {G} genes")
    return a, (0 if a.ndim == 1 else G)


def _dispersion(inv, theta, x, n: int, G: int) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """``inv`` and ``theta`` as :func:`_per_cell` (one layout for both) and the ``(n, G)``
    counts, float32 and contiguous."""
    inv, inv_c = _per_cell(inv, n, G)
    theta, th_c = _per_cell(theta, n, G)
    if inv_c != th_c:
        raise ValueError(f"inv {inv.shape} and theta {theta.shape} differ in layout")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape != (n, G):
        raise ValueError(f"counts of shape {x.shape} for {n} cells x {G} genes")
    return inv, theta, th_c, x


def nb_sums(mu, inv, theta, x, eps) -> np.ndarray | None:
    """``(S, n)`` sums over genes of ``w L + x log(mu + eps)``, ``w = -(x + theta)``
    (``MinibatchScorer._block``'s NB terms; ``inv = 1 / (theta + eps)``, ``x`` the ``(n, G)``
    counts), or ``None`` where the compiled kernel does not run or cannot take the values."""
    lib = _running()
    if lib is None:
        return None
    (mu,), mu_s, mu_c = _blocks(mu)
    S, n, G = mu.shape
    inv, theta, th_c, x = _dispersion(inv, theta, x, n, G)
    out = np.empty((S, n), dtype=np.float64)
    bad = lib.nb_rows(
        mu.ctypes.data, S, n, G, mu_s, mu_c, inv.ctypes.data, theta.ctypes.data, th_c,
        x.ctypes.data, eps, out.ctypes.data, n,
    )  # fmt: skip
    return None if bad else out


def zinb_sums(mu, pi, inv, theta, x, eps) -> np.ndarray | None:
    """The ZINB terms of ``MinibatchScorer._block`` (its masks made from ``x`` in the kernel),
    as :func:`nb_sums` (``None`` also where a dropout logit is below -80: numpy's kernel has
    the stable path for those)."""
    lib = _running()
    if lib is None:
        return None
    (mu, pi), mu_s, mu_c = _blocks(mu, pi)
    S, n, G = mu.shape
    inv, theta, th_c, x = _dispersion(inv, theta, x, n, G)
    out = np.empty((S, n), dtype=np.float64)
    bad = lib.zinb_rows(
        mu.ctypes.data, pi.ctypes.data, S, n, G, mu_s, mu_c, inv.ctypes.data, theta.ctypes.data,
        th_c, x.ctypes.data, eps, out.ctypes.data, n,
    )  # fmt: skip
    return None if bad else out


def bce_sums(px, neg_d, f, entries) -> tuple[np.ndarray, np.ndarray] | None:
    """PEAKVI's ``(S, n)`` sums over regions of ``log(q)`` (accessible) / ``log(1 - q)``,
    ``q = -(px * (neg_d * f))``, as ``BernoulliScorer``'s numpy kernel forms them (products of
    four factors, one ``log`` each), and the ``(S, n)`` flags of the rows it could not sum (a
    factor of 0, a product at most float32's smallest normal: the caller sums those element by
    element with torch's clamps); ``None`` where the compiled kernel does not run. ``neg_d``
    ``(n, 1)`` (``-d``), ``f`` ``(R,)`` or ``None``; ``entries`` the cells' non-zero entries
    (their columns are the accessible regions)."""
    lib = _running()
    if lib is None:
        return None
    (px,), px_s, px_c = _blocks(px)
    S, n, R = px.shape
    neg_d = np.ascontiguousarray(neg_d, dtype=np.float32).reshape(n)
    f = None if f is None else np.ascontiguousarray(f, dtype=np.float32).reshape(R)
    indptr = np.ascontiguousarray(entries.indptr, dtype=np.int64)
    cols = np.ascontiguousarray(entries.cols[int(indptr[0]) : int(indptr[-1])], dtype=np.int64)
    out = np.empty((S, n), dtype=np.float64)
    flags = np.zeros((S, n), dtype=np.int8)
    bad = lib.bce_rows(
        px.ctypes.data, S, n, R, px_s, px_c, neg_d.ctypes.data,
        None if f is None else f.ctypes.data, indptr.ctypes.data, cols.ctypes.data,
        out.ctypes.data, n, flags.ctypes.data,
    )  # fmt: skip
    if bad < 0:
        raise MemoryError(f"the compiled likelihood kernel could not allocate {2 * R} floats")
    return out, flags


def uniforms(key: int, cells: np.ndarray, n_per_cell: int, start: int) -> np.ndarray | None:
    """``rng.normals``' uniforms (its SplitMix64 counters, the same bits as its numpy code),
    ``(len(cells), n_per_cell)`` float64; ``None`` where the compiled kernel does not run."""
    lib = _running()
    if lib is None:
        return None
    cells = np.ascontiguousarray(cells, dtype=np.uint64).reshape(-1)
    out = np.empty((cells.size, n_per_cell), dtype=np.float64)
    lib.splitmix_uniforms(
        int(key), cells.ctypes.data, cells.size, n_per_cell, int(start) % (1 << 64), out.ctypes.data
    )
    return out
