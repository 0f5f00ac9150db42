"""Counter-based Gaussian noise: each cell's draws depend only on (seed, stream, cell, index).

scvi-tools draws its Monte-Carlo noise from one global torch stream, so a cell's ELBO depends on
the cells that came before it. Here a draw is a pure function of the seed, a stream id (what it
is for), the cell's row in the input and the draw's index within that cell (sample * dim + d).
Consequences: same seed -> bit-identical numbers; a cell's result does not depend on batch
size, on the other cells in its minibatch, or on how Monte-Carlo samples are chunked; and there
is no RNG state to share between threads.

The bits come from SplitMix64 (Steele, Lea & Flood 2014) on uint64 counters, turned into
uniforms with 53 bits and into normals by the inverse normal CDF (``scipy.special.ndtri``):
plain integer arithmetic plus one float64 function, identical on every platform.
"""

from __future__ import annotations

import numpy as np

from . import native

__all__ = ["STREAM_Z", "STREAM_L", "STREAM_LN_MEAN", "STREAM_Z2", "STREAM_PRO_BACK", "normals"]

#: Stream ids: what the noise is for. A stream gives the same draws in every method.
STREAM_Z = 1  # z ~ q(z|x) (ELBO, reconstruction error, marginal LL, sampled latent)
STREAM_L = 2  # library ~ q(l|x) (learned library size)
STREAM_LN_MEAN = 3  # Monte-Carlo mean of the logistic-normal latent
#: SCANVI: z2 ~ q(z2 | z1, y). Draw ``j`` of a cell is sample ``j // (K * L)``, label
#: ``(j // L) % K``, latent dimension ``j % L``.
STREAM_Z2 = 4
#: TOTALVI: the protein background log-mean ~ N(back_alpha, back_beta) that DecoderTOTALVI
#: draws. Draw ``j`` of a cell is sample ``j // P``, protein ``j % P``.
STREAM_PRO_BACK = 5

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser, in place on a uint64 array (wrapping arithmetic)."""
    z ^= z >> _S30
    z *= _M1
    z ^= z >> _S27
    z *= _M2
    z ^= z >> _S31
    return z


def _key(seed: int, stream: int) -> np.uint64:
    k = np.array([np.uint64(seed % (1 << 64))], dtype=np.uint64)
    k = _mix(k + _GOLDEN)
    k ^= np.uint64(stream)
    return _mix(k + _GOLDEN)[0]


def normals(
    seed: int, stream: int, cells: np.ndarray, n_per_cell: int, start: int = 0
) -> np.ndarray:
    """Standard normal draws, ``(len(cells), n_per_cell)`` float64.

    Parameters
    ----------
    seed
        The user's seed.
    stream
        What the draws are for (``STREAM_*``).
    cells
        Row index of each cell in its input (int64).
    n_per_cell
        How many draws per cell, starting at draw ``start`` of that cell's sequence.
    start
        Offset in the per-cell sequence (draw ``start + j``), so chunks of Monte-Carlo
        samples give the same numbers as one big call.
    """
    cells = np.asarray(cells, dtype=np.uint64).reshape(-1, 1)
    key = _key(seed, stream)
    # the compiled kernel's copy of the integer part below, where it is built: the same bits,
    # ~20x faster (two thirds of the time here was this part; see native.uniforms)
    u = native.uniforms(key, cells, n_per_cell, start)
    if u is None:
        with np.errstate(over="ignore"):
            c = _mix((cells + _GOLDEN) ^ key)
            j = np.arange(start, start + n_per_cell, dtype=np.uint64).reshape(1, -1)
            bits = _mix((c + j * _GOLDEN) ^ key)
        u = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))
    from scipy.special import ndtri  # on first use: scipy.special adds ~0.2 s to an import

    return ndtri(u, out=u)
