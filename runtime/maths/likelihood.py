"""Fast per-cell log-likelihoods for a minibatch: ``log p(x | z)`` summed over genes.

:mod:`scvi_onnx.distributions` holds the reference formulas (float64, tested against scipy).
This module computes the same sums fast, for the runtime's hot path:

- float32 elementwise work and float32 sums over genes (as scvi-tools' torch; numpy sums a row
  pairwise: 2e-7 relative against the float64 formulas on PBMC, where float64 sums gave 4e-8,
  and 13% faster for NB), in cache-sized row blocks;
- no ``logaddexp`` (slow in numpy): softplus as ``max(v, 0) + log1p(exp(-|v|))``;
- the count terms ``lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)`` do not depend on the
  Monte-Carlo sample when the dispersion is per gene / batch / label, and vanish where x = 0:
  they are computed once per cell, over nonzeros only, from a per-gene table for small integer
  counts (``gammaln`` costs ~40 ns a value; a table lookup ~2 ns).

The zero / non-zero cases follow scvi-tools' masks: a count ``x > eps`` takes the non-zero
formula, any other the zero formula.

Where the install built it, the NB / ZINB sums of :class:`MinibatchScorer` (fixed dispersion)
come from the compiled kernel instead (:mod:`~scvi_onnx.maths.native`: the same terms in one
pass); the numpy passes below are the fallback and the reference it is tested against.

PEAKVI's Bernoulli likelihood (:class:`BernoulliScorer`) works in cache-sized blocks too: every
region's factor (``1 - q``, or ``q`` at the accessible regions, the non-zero entries),
multiplied four by four, one ``log`` per product; its work buffers are kept per thread
(:class:`Scratch`).
"""

from __future__ import annotations

import functools
import threading

import numpy as np

from ..bundle.format import BCE_LOG_MIN, LIKELIHOOD_EPS
from ..data.entries import Entries
from . import native

#: Integer counts below this use the lgamma table.
TABLE_MAX_COUNT = 128
#: Largest table (entries) built for gene-batch / gene-label dispersion.
TABLE_MAX_ENTRIES = 1 << 23
#: Elements (samples x cells x genes) per block: measured fastest here (2^12..2^19 swept;
#: smaller blocks pay numpy per-call overhead, larger ones leave the cache).
BLOCK_ELEMENTS = 1 << 17
#: The same for PEAKVI's Bernoulli kernel, whose per-block work is a handful of numpy calls:
#: with two threads (ELBO and reconstruction error of 20,000 cells x 2,000 regions) 2^19 took
#: 0.24-0.27 s against 0.28-0.32 at 2^17 (each call re-takes the interpreter lock, which the
#: other thread holds between its own calls); the sums are unchanged. Its work buffer (up to
#: ~2.25x a block: factors, their products of four, -(d f), the accessible q; 2-5 MB) is kept
#: per thread in a :class:`Scratch`.
BCE_BLOCK_ELEMENTS = 1 << 19

_HALF_LOG_2PI = 0.5 * np.log(2.0 * np.pi)
#: Below this dropout logit, exp(-pi) could overflow float32: the block takes the stable path.
_FAST_PI_MIN = np.float32(-80.0)


def _gammaln(x: np.ndarray) -> np.ndarray:
    from scipy.special import gammaln  # on first use: scipy.special adds ~0.2 s to an import

    return gammaln(x)


def lgamma_table(theta: np.ndarray, k_max: int = TABLE_MAX_COUNT) -> np.ndarray:
    """``T[k, ..., g] = lgamma(k + theta_g) - lgamma(theta_g) - lgamma(k + 1)``, float64.

    ``theta`` is ``(G,)`` or ``(C, G)`` (one row per batch / label). Count-major: the entries
    of a cell's small counts (mostly 1, 2, 3) are looked up from a few contiguous rows, which
    stay in cache (gene-major was ~35% slower).
    """
    theta = np.asarray(theta, dtype=np.float64)
    k = np.arange(k_max, dtype=np.float64).reshape((k_max,) + (1,) * theta.ndim)
    return _gammaln(theta + k) - _gammaln(theta) - _gammaln(k + 1.0)


def count_constant(
    e: Entries,
    theta: np.ndarray,
    table: np.ndarray | None = None,
    codes: np.ndarray | None = None,
    *,
    likelihood: str = "zinb",
) -> np.ndarray:
    """Per-cell ``sum_g lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)`` (float64).

    The sum runs where scvi-tools applies these terms: every non-zero count for NB (its formula
    has no mask; the terms vanish at x = 0), counts ``x > eps`` for ZINB (its non-zero mask).
    The two differ only for counts in ``(0, eps]``.

    Parameters
    ----------
    e
        The minibatch's non-zero counts (:class:`~scvi_onnx.data.entries.Entries`).
    theta
        ``(G,)`` or ``(n, G)`` inverse dispersion.
    table
        Optional :func:`lgamma_table` of ``theta`` (``(K, G)``) or of the per-category thetas
        (``(K, C, G)``, then ``codes`` gives each cell's category).
    likelihood
        ``"nb"`` or ``"zinb"``: which entries the sum runs over (see above).
    """
    xv, cols = e.vals, e.cols
    if xv.size == 0:
        return np.zeros(e.n_rows, dtype=np.float64)
    G = theta.shape[-1]
    per_cell = theta.ndim == 2 or (table is not None and table.ndim == 3)
    rows = e.row_of_entry() if per_cell else None
    if table is not None:
        # every entry from the table (counts clamped into it), then the few that are not
        # small integers recomputed exactly: no boolean-mask pass over all entries
        K = table.shape[0]
        itype = np.int32 if table.size < 2**31 else np.int64
        with np.errstate(invalid="ignore"):  # counts past the integer range: in rest
            key = xv.astype(itype)
        # compared as float32 (an int32 / float32 comparison runs in float64: 4x slower)
        rest = np.flatnonzero((key.astype(xv.dtype) != xv) | (key >= K))
        np.clip(key, 0, K - 1, out=key)
        key *= itype(table[0].size)  # row k of the table
        if table.ndim == 3:
            key += codes[rows].astype(itype) * itype(G)
        key += cols.astype(itype, copy=False)
        vals = np.take(table.reshape(-1), key)
    else:
        rest = np.arange(xv.size)
        vals = np.empty(xv.size, dtype=np.float64)
    if rest.size:
        xr = xv[rest].astype(np.float64)
        cr = cols[rest]
        tr = (theta[cr] if theta.ndim == 1 else theta[rows[rest], cr]).astype(np.float64)
        vals[rest] = _gammaln(xr + tr) - _gammaln(tr) - _gammaln(xr + 1.0)
    return _row_sums_in_mask(e, vals, likelihood)


def _row_sums_in_mask(e: Entries, vals: np.ndarray, likelihood: str) -> np.ndarray:
    """Per-row sums of per-entry ``vals`` over the entries where scvi-tools applies its count
    terms: every non-zero count for NB, ``x > eps`` for ZINB (``vals`` is zeroed outside)."""
    if likelihood != "nb" and e.vals.min() <= LIKELIHOOD_EPS:
        vals[e.vals <= LIKELIHOOD_EPS] = 0.0  # ZINB: outside its non-zero mask (exact zeros)
    return e.row_sums(vals)


def x_log_theta(e: Entries, theta_eps: np.ndarray, likelihood: str = "nb") -> np.ndarray:
    """Per-cell ``sum_g x log(theta + eps)`` (float64) over the entries where the
    likelihood's ``x log`` terms apply (every non-zero count for NB, ``x > eps`` for ZINB):
    the part of ``x log((mu + eps) / A)`` that no sample changes. ``theta_eps`` ``(G,)`` or
    ``(n, G)``."""
    xv, cols = e.vals, e.cols
    if xv.size == 0:
        return np.zeros(e.n_rows, dtype=np.float64)
    log_th = np.log(np.asarray(theta_eps, dtype=np.float64))
    if log_th.ndim == 1:
        vals = log_th[cols]
    else:
        vals = log_th[e.row_of_entry(), cols]
    vals *= xv
    return _row_sums_in_mask(e, vals, likelihood)


def poisson_count_constant(e: Entries) -> np.ndarray:
    """Per-cell ``-sum_g lgamma(x + 1)`` (float64): Poisson's term that no sample changes."""
    return -e.row_sums(_gammaln(e.vals.astype(np.float64) + 1.0))


def _softplus(v: np.ndarray, out: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """Stable softplus of ``v`` into ``out``; ``tmp`` is scratch and may alias ``v``."""
    np.maximum(v, 0, out=out)
    np.abs(v, out=tmp)
    np.negative(tmp, out=tmp)
    np.exp(tmp, out=tmp)
    np.log1p(tmp, out=tmp)
    out += tmp
    return out


class MinibatchScorer:
    """``log p(x | z)`` per (sample, cell) for one minibatch, reusing per-cell constants.

    Parameters
    ----------
    likelihood
        ``"zinb"``, ``"nb"``, ``"poisson"`` or ``"normal"``.
    x
        ``(n, G)`` float32 counts (dense minibatch).
    entries
        Their non-zero entries (count terms of a per-sample dispersion, Poisson's terms).
    theta
        Dispersion when it does not vary across samples: ``(G,)`` or ``(n, G)``; ``None`` for
        gene-cell dispersion (given per call) and Poisson.
    count_const
        Per-cell :func:`count_constant` when ``theta`` is fixed (NB / ZINB), else ``None``.
    """

    def __init__(
        self,
        likelihood: str,
        x: np.ndarray,
        entries: Entries,
        theta: np.ndarray | None,
        count_const: np.ndarray | None,
    ):
        self.lik = likelihood
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        self.entries = entries
        self.theta = None if theta is None else np.asarray(theta, dtype=np.float32)
        self.count_const = count_const
        # What does not change across samples, once per minibatch (fixed dispersion): 1 /
        # (theta + eps) and the per-cell sum of x log(theta + eps) that _block leaves out
        self._inv_theta_eps = self._x_log_theta = None
        if self.theta is not None and likelihood in ("nb", "zinb"):
            theta_eps = self.theta + np.float32(LIKELIHOOD_EPS)
            self._inv_theta_eps = np.float32(1.0) / theta_eps
            self._x_log_theta = x_log_theta(entries, theta_eps, likelihood)
        if likelihood == "poisson" and count_const is None:
            self.count_const = poisson_count_constant(entries)

    # numpy's kernel's per-cell arrays, made on its first call: the compiled kernel makes the
    # same values from x and theta per value (n x G float32 arrays each that it never reads)
    @functools.cached_property
    def _masks(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """``(xm, m0, m1)``: masks as float32 factors (a multiply is ~20x cheaper than
        ``np.copyto(where=)``). ZINB takes the non-zero formula where x > eps (``m1``; ``xm``
        = x m1), NB applies x * (...) to every count (``xm`` = x, no masks)."""
        if self.lik != "zinb":
            return self.x, None, None
        m1 = (self.x > np.float32(LIKELIHOOD_EPS)).astype(np.float32)
        return self.x * m1, np.float32(1.0) - m1, m1

    @functools.cached_property
    def _w(self) -> np.ndarray | None:
        """The factor of L in _block (fixed dispersion): -(x + theta) for NB, -theta for
        ZINB."""
        if self._inv_theta_eps is None:
            return None
        return -self.theta if self.lik == "zinb" else -(self._masks[0] + self.theta)

    def score(
        self, mu: np.ndarray, pi: np.ndarray | None = None, theta: np.ndarray | None = None
    ) -> np.ndarray:
        """Per (sample, cell) log-likelihood; ``mu``/``pi``/``theta`` are ``(S, n, G)``."""
        S, n, G = mu.shape
        fixed_theta = theta is None
        if self.lik in ("nb", "zinb") and not fixed_theta:
            const = np.empty((S, n))
            for s in range(S):
                const[s] = count_constant(self.entries, theta[s], likelihood=self.lik)
        else:
            const = self.count_const
            if self._x_log_theta is not None:
                const = const - self._x_log_theta if const is not None else -self._x_log_theta
        out = self._compiled(mu, pi) if fixed_theta else None
        if out is None:
            out = self._blocks(mu, pi, theta)
        if const is not None:
            out += const
        return out

    def _compiled(self, mu: np.ndarray, pi: np.ndarray | None) -> np.ndarray | None:
        """:meth:`_block`'s sums over all of ``mu`` by the compiled kernel (one pass), or
        ``None`` where it does not run (:mod:`~scvi_onnx.maths.native`)."""
        if self._inv_theta_eps is None:
            return None
        eps = np.float32(LIKELIHOOD_EPS)
        if self.lik == "nb":
            return native.nb_sums(mu, self._inv_theta_eps, self.theta, self.x, eps)
        if self.lik == "zinb":
            return native.zinb_sums(mu, pi, self._inv_theta_eps, self.theta, self.x, eps)
        return None

    def _blocks(self, mu: np.ndarray, pi: np.ndarray | None, theta: np.ndarray | None):
        """:meth:`_block` over cache-sized blocks of ``mu``: ``(S, n)`` sums without the
        per-cell constants."""
        S, n, G = mu.shape
        out = np.empty((S, n), dtype=np.float64)
        fixed_theta = theta is None
        # blocks of (samples, cells) of about BLOCK_ELEMENTS: cell rows outside, samples
        # inside, so a block's counts and masks stay in cache across the samples
        r_max = max(1, min(n, BLOCK_ELEMENTS // G))
        k_max = max(1, min(S, BLOCK_ELEMENTS // (r_max * G)))
        size = k_max * r_max * G
        per_sample = not fixed_theta and self.lik in ("nb", "zinb")  # + 1 / (theta + eps)
        buf = [np.empty(size, dtype=np.float32) for _ in range(6 if per_sample else 5)]
        for r0 in range(0, n, r_max):
            rs = slice(r0, min(n, r0 + r_max))
            r = rs.stop - rs.start
            cells = (self.x[rs],) + tuple(None if v is None else v[rs] for v in self._masks)
            th, inv, w = self.theta, self._inv_theta_eps, self._w
            if fixed_theta and th is not None and th.ndim == 2:
                th = th[rs]
                inv = None if inv is None else inv[rs]
            if w is not None and w.ndim == 2:
                w = w[rs]
            for s0 in range(0, S, k_max):
                ss = slice(s0, min(S, s0 + k_max))
                k = ss.stop - ss.start
                tmp = [t[: k * r * G].reshape(k, r, G) for t in buf]
                x_log_th = None
                if not fixed_theta:  # dispersion per sample (gene-cell)
                    th = theta[ss, rs]
                if per_sample:  # the 6th buffer: 1 / (theta + eps)
                    inv = np.add(th, np.float32(LIKELIHOOD_EPS), out=tmp.pop())
                    # the kernel's left-out sum of x log(theta + eps), per (sample, cell)
                    x_log_th = np.log(inv, out=tmp[0])
                    x_log_th *= cells[1]
                    x_log_th = x_log_th.sum(-1, dtype=np.float64)
                    np.divide(np.float32(1.0), inv, out=inv)
                    w = np.negative(th, out=tmp[1])
                    if self.lik == "nb":
                        w -= cells[1]  # -(x + theta)
                sums = self._block(
                    mu[ss, rs], None if pi is None else pi[ss, rs], th, inv, w, cells, *tmp
                )
                out[ss, rs] = sums if x_log_th is None else sums - x_log_th
        return out

    def _block(self, mu, pi, th, inv, w, cells, a, b, c, d, e) -> np.ndarray:
        """A ``(samples, cells, genes)`` block; ``cells`` = the cells' rows of (x, xm, m0, m1);
        ``inv`` = ``1 / (theta + eps)``, ``w`` the factor of ``L`` (below).

        Returns the ``(samples, cells)`` sums over genes (NB / ZINB: without
        ``-sum_g xm log(theta + eps)``, which the caller adds)."""
        eps = np.float32(LIKELIHOOD_EPS)
        x, xm, m0, m1 = cells
        if self.lik == "poisson":
            # x * log(rate) - rate  (xlogy: 0 where x == 0)
            np.log(mu, out=a)
            np.multiply(x, a, out=a)
            a[:, x == 0] = 0.0
            a -= mu
            return a.sum(-1, dtype=np.float64)
        if self.lik == "normal":
            np.subtract(x, mu, out=a)
            np.divide(a, th, out=a)
            np.square(a, out=a)
            a *= -0.5
            # log(scale) summed over genes: per gene, per cell or per (sample, cell)
            log_scale = np.log(th.astype(np.float64)).sum(-1)
            return a.sum(-1, dtype=np.float64) - _HALF_LOG_2PI * mu.shape[-1] - log_scale
        # NB / ZINB, with A = theta + mu + eps and L = log(A / (theta + eps)) =
        # log(1 + mu / (theta + eps)):
        #   b = theta * log((theta + eps) / A) = -theta L     (log NB probability of a zero)
        #   e = x * log((mu + eps) / A) = x (log(mu + eps) - L) - x log(theta + eps)
        # with x log(theta + eps) left out here (a constant per cell: the caller's). ``w`` is
        # L's factor: -(x + theta) for NB (b + e in one), -theta for ZINB (b). NB takes 9
        # passes over the block, no division (10 with the ratio (theta + eps) / A: 13-21%
        # longer, with and without AVX-512). float32 rounds 1 + u as it rounded the ratio, so
        # theta L keeps the same ~theta * 6e-8 error. ``log1p(u)`` would not, but numpy has
        # no vectorised float32 log1p without AVX-512: 19 ns a value, 3.3x the kernel.
        np.multiply(mu, inv, out=a)
        a += np.float32(1.0)
        np.log(a, out=a)  # L
        np.add(mu, eps, out=e)
        np.log(e, out=e)
        if self.lik == "nb":
            e *= xm
            a *= w
            e += a
            return e.sum(-1).astype(np.float64)
        np.multiply(a, w, out=b)
        e -= a
        e *= xm
        if pi.min() < _FAST_PI_MIN:
            return self._zinb_stable(pi, b, e, m1 > 0, a, c, d)
        # ZINB. With q = exp(-pi) (finite here) and t = b - pi <= -pi, scvi-tools' two cases
        #   zero      softplus(t) - softplus(-pi) = log(1 + exp(t)) - log(1 + q)
        #   non-zero  t - softplus(-pi) + e       = t - log(1 + q) + e
        # are one expression with the 0/1 masks m0, m1 (arithmetic: no np.copyto(where=)):
        #   log((1 + m0 exp(t)) / (1 + q)) + m1 t + e        (one log instead of two log1p)
        b -= pi
        np.exp(b, out=c)
        c *= m0
        c += 1.0
        np.negative(pi, out=d)
        np.exp(d, out=d)
        d += 1.0
        c /= d
        np.log(c, out=c)
        b *= m1
        c += b
        c += e
        return c.sum(-1).astype(np.float64)

    @staticmethod
    def _zinb_stable(pi, b, e, nz, a, c, d) -> np.ndarray:
        """ZINB for any dropout logit (``exp(-pi)`` may overflow float32): stable softplus.

        ``b``, ``e`` as in :meth:`_block`; result = -softplus(-pi) + where(nz, b - pi + e,
        softplus(b - pi)).
        """
        b -= pi
        np.negative(pi, out=a)
        sp_neg_pi = _softplus(a, d, a)  # d = softplus(-pi)
        np.add(b, e, out=e)  # non-zero case (without -softplus(-pi) and counts const)
        _softplus(b, c, b)  # c = softplus(b - pi); b is scratch now
        np.copyto(c, e, where=nz)
        c -= sp_neg_pi
        return c.sum(-1).astype(np.float64)


def nb_mixture_sum(
    y: np.ndarray,
    mu_1: np.ndarray,
    mu_2: np.ndarray,
    theta: np.ndarray,
    pi: np.ndarray,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """``sum_p mask_p * nb_mixture_core(y_p, mu_1, mu_2, theta, pi)`` per (sample, cell): the
    fast path of :func:`~scvi_onnx.maths.distributions.nb_mixture_core` (TOTALVI's proteins,
    without the count terms), in float64.

    float64, unlike the genes' float32 kernel: a cell has tens of proteins against thousands
    of genes (the cost is small), and their counts are large (hundreds to thousands), where
    float32's rounding of ``theta * (log(theta + eps) - log(theta + mu + eps))`` moved a
    trained model's per-cell protein loss by up to 5e-5 relative from the float64 value.
    (torch's own float32, whose ``lgamma`` count terms round too, is up to ~9e-5 from it;
    the count terms here are float64 as well:
    :func:`~scvi_onnx.maths.distributions.nb_count_terms`.)

    ``y`` ``(N, P)``, ``theta`` ``(P,)`` or ``(N, P)``, ``mask`` ``(N, P)`` 0/1 or ``None``;
    ``mu_1``, ``mu_2``, ``pi`` ``(S, N, P)``. ``logaddexp`` and ``softplus`` as
    ``max + log1p(exp(-|d|))`` (numpy's ``logaddexp`` is ~5x slower).
    """
    f64 = np.float64
    eps = f64(LIKELIHOOD_EPS)
    y = np.asarray(y, dtype=f64)
    th = np.asarray(theta, dtype=f64)
    log_th_eps = np.log(th + eps)

    def core(mu: np.ndarray) -> np.ndarray:
        mu = np.asarray(mu, dtype=f64)
        log_a = np.log(th + mu + eps)
        out = np.log(mu + eps)
        out -= log_a
        out *= y
        log_a -= log_th_eps
        log_a *= th
        out -= log_a  # theta * (log(theta + eps) - log(theta + mu + eps))
        return out

    pi = np.asarray(pi, dtype=f64)
    a = core(mu_1)
    b = core(mu_2)
    b -= pi
    m = np.maximum(a, b)
    np.subtract(a, b, out=a)
    np.abs(a, out=a)
    np.negative(a, out=a)
    np.exp(a, out=a)
    np.log1p(a, out=a)
    m += a  # logaddexp(a, b)
    # - softplus(-pi) = -(max(-pi, 0) + log1p(exp(-|pi|)))
    np.abs(pi, out=a)
    np.negative(a, out=a)
    np.exp(a, out=a)
    np.log1p(a, out=a)
    m -= a
    np.minimum(pi, f64(0.0), out=a)
    m += a
    if mask is not None:
        m *= np.asarray(mask, dtype=f64)
    return m.sum(-1)


class Scratch:
    """Work buffers kept per thread between calls.

    A kernel that allocates its multi-megabyte blocks on every call gets them from glibc as
    fresh mappings, page-faulted in again each time: PEAKVI's marginal LL (2 threads, 256
    cells x 1,000 samples x 2,000 regions) took 300,000 page faults and 0.8 s of kernel time,
    ~40% of its wall time. The owner (a model) keeps one ``Scratch``; each thread that calls
    it gets its own buffers (one per dtype), freed when the thread ends.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def buffer(self, size: int, dtype: type = np.float32) -> np.ndarray:
        """This thread's flat buffer of ``dtype`` with at least ``size`` elements (its content
        is whatever the thread's last call left)."""
        bufs = getattr(self._local, "bufs", None)
        if bufs is None:
            bufs = self._local.bufs = {}
        key = np.dtype(dtype).str
        buf = bufs.get(key)
        if buf is None or buf.size < size:
            buf = bufs[key] = np.empty(size, dtype=dtype)
        return buf


#: ``log`` of float32's smallest normal number: a product of four factors below it (a
#: subnormal, or 0) lost precision, and its row is summed element by element (with torch's
#: clamp at -100). The factors are at most 1, so every partial product of a normal product is
#: normal too.
_LOG_F32_TINY = np.log(np.finfo(np.float32).tiny)
#: Largest group (cells x regions) whose coefficients a :class:`BernoulliScorer` keeps between
#: calls (8 bytes each; the marginal LL's groups are 2^16 at most: 512 KB).
BCE_COEF_MAX_ELEMENTS = 1 << 20


class BernoulliScorer:
    """PEAKVI's ``log p(x | z) = -sum_r BCE(p_r d f_r, x_r > 0)`` per (sample, cell).

    torch's ``binary_cross_entropy`` takes ``max(log q, -100)`` where a region is accessible
    (``x > 0``) and ``max(log1p(-q), -100)`` elsewhere, with ``q = (p * d) * f`` in float32.
    Here, per block of ``(samples, cells, regions)`` that stays in cache:

    - ``a = p * (-d f) = -q`` (``-d f`` formed once per block of cells: one pass over the
      decoder's output instead of two; ``q`` may differ from torch's ``(p * d) * f`` in its
      last bit), ``q`` gathered at the accessible regions (the non-zero entries: ~10% for
      scATAC), then ``a + 1 = 1 - q`` with ``q`` put back at the accessible regions: every
      region's likelihood factor;
    - the factors multiplied four by four (regions ``j``, ``j + R/4``, ``j + R/2``,
      ``j + 3R/4``: contiguous quarters) and one float32 ``log`` per product, summed per
      (sample, cell) in float32 as torch sums: one transcendental per four regions. Against
      float64 the sums differ as much as per-element ``log1p`` sums do (float32 rounding of
      the sums dominates: ~1e-7 relative);
    - torch's clamps matter only where a factor is exactly 0 (``q`` = 1 elsewhere, ``q`` = 0
      where accessible: ``log`` is -inf). Those rows, and rows with a product below float32's
      normal range (four tiny accessible ``q``), are summed again element by element with the
      clamps.
    - From the second call on (the marginal LL scores the same cells for chunk after chunk of
      samples), each block of cells' factors are ``p * c + m`` with coefficients kept by the
      scorer (``c = -(d f)``, ``m = 1``, or ``c = d f``, ``m = 0`` where accessible): two passes
      instead of a pass, a gather and a scatter per sample, and bit for bit the same factors.

    ~1 ns per region and draw for 2,000 regions, one thread (it was 1.3-1.6 with one
    ``log1p`` per element and a ``log`` / ``log1p`` correction at the accessible regions).

    Parameters
    ----------
    entries
        The group's non-zero entries: their columns are the accessible regions (the data layer
        refuses negative and NaN values, so non-zero means ``x > 0``).
    n_regions
        Regions per cell.
    region_factors
        ``(R,)`` float32 ``sigmoid(region_factors)``, or ``None`` (``region_factors=False``).
    scratch
        Where the work buffers come from (a model's, shared by its calls); ``None``: this
        scorer's own.
    """

    def __init__(
        self,
        entries: Entries,
        n_regions: int,
        region_factors: np.ndarray | None,
        scratch: Scratch | None = None,
    ):
        self.entries = entries
        self.R = int(n_regions)
        self.f = None if region_factors is None else np.asarray(region_factors, np.float32)
        self.scratch = scratch if scratch is not None else Scratch()
        # From the second call on (the marginal LL's chunks of samples), each block of rows'
        # coefficients (see _coefficients), kept for the scorer's life: ((r0, r1) -> (c, m)),
        # for the depth array they were made with. Threads that race here build equal arrays.
        self._calls = 0
        self._coef: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._coef_depth: np.ndarray | None = None

    def score(self, px: np.ndarray, depth: np.ndarray | None) -> np.ndarray:
        """``(S, n)`` float64 for ``px`` ``(S, n, R)`` and ``depth`` ``(n, 1)`` (or ``None``)."""
        S, n, R = px.shape
        out = np.empty((S, n), dtype=np.float32)
        neg_d = -np.ones((n, 1), np.float32) if depth is None else -depth.reshape(n, 1)
        neg_d = neg_d.astype(np.float32, copy=False)
        self._calls += 1
        compiled = self._compiled(px, neg_d)
        if compiled is not None:
            return compiled
        if self._calls > 1 and n * R <= BCE_COEF_MAX_ELEMENTS:
            if self._coef_depth is not depth:
                self._coef, self._coef_depth = {}, depth
            coef = self._coef
        else:
            coef = None
        r_max = max(1, min(n, BCE_BLOCK_ELEMENTS // R))
        k_max = max(1, min(S, BCE_BLOCK_ELEMENTS // (r_max * R)))
        # the most accessible regions in one block of rows
        ip = self.entries.indptr
        edges = np.minimum(np.arange(0, n + r_max, r_max), n)
        nnz_max = int(np.diff(ip[edges]).max(initial=0))
        # one work buffer: the block's factors (a), their products of four (c), -(d f) of its
        # cells (ndf, with region factors) and q at its accessible regions (q_nz)
        A, C = k_max * r_max * R, k_max * r_max * (R // 4)
        N = 0 if self.f is None else r_max * R
        work = self.scratch.buffer(A + C + N + k_max * nnz_max)
        bufs = (work[:A], work[A : A + C], work[A + C : A + C + N], work[A + C + N :])
        pos = self.scratch.buffer(k_max * nnz_max, np.intp)
        for r0 in range(0, n, r_max):
            self._rows(px, neg_d, out, r0, min(n, r0 + r_max), k_max, bufs, pos, coef)
        return out.astype(np.float64)

    def _compiled(self, px: np.ndarray, neg_d: np.ndarray) -> np.ndarray | None:
        """The sums by the compiled kernel (:func:`~scvi_onnx.maths.native.bce_sums`: the
        same factors and products of four, one pass), its flagged rows summed element by
        element with torch's clamps; ``None`` where it does not run."""
        result = native.bce_sums(px, neg_d, self.f, self.entries)
        if result is None:
            return None
        out, flags = result
        if flags.any():
            counts = np.diff(self.entries.indptr)
            e0 = int(self.entries.indptr[0])
            for s, c in zip(*np.nonzero(flags), strict=True):
                out[s, c] = self._row_exact(px[s, c], neg_d[c], c, e0, counts)
        return out

    def _coefficients(self, ndf, r: int, flat0) -> tuple[np.ndarray, np.ndarray]:
        """A block of ``r`` cells' ``(c, m)``, ``(r, R)`` each, with every region's factor
        ``p * c + m``: ``c = -(d f)``, ``m = 1`` where not accessible (``1 - q``), ``c = d f``,
        ``m = 0`` where accessible (``q``). Both are exact negations of the same product, so
        the factors are bit for bit those of the first call's gather / put."""
        m = np.ones((r, self.R), dtype=np.float32)
        m.reshape(-1)[flat0] = 0.0
        c = np.multiply(m, np.float32(2.0))
        c -= np.float32(1.0)  # +1 / -1
        c *= ndf
        return c, m

    def _rows(self, px, neg_d, out, r0: int, r1: int, k_max: int, bufs, pos, coef) -> None:
        """Cells ``r0:r1`` (one block of rows), every sample, into ``out``; ``coef``: the
        scorer's kept coefficients (from its second call on), else ``None``."""
        S, _, R = px.shape
        e = self.entries
        r, Q = r1 - r0, R // 4
        a_buf, c_buf, ndf_buf, q_buf = bufs
        e0, e1 = int(e.indptr[r0]), int(e.indptr[r1])
        nnz = e1 - e0
        counts = np.diff(e.indptr[r0 : r1 + 1])
        cm = None if coef is None else coef.get((r0, r1))
        if cm is None:  # the first call, or the first to keep coefficients
            # the block's accessible regions: flat positions in a block of k_max samples
            local_rows = np.repeat(np.arange(r, dtype=np.intp), counts)
            flat = pos[: k_max * nnz].reshape(k_max, nnz)
            np.multiply(local_rows, R, out=flat[0])
            flat[0] += e.cols[e0:e1]
            if k_max > 1:
                steps = (np.arange(1, k_max, dtype=np.intp) * (r * R))[:, None]
                np.add(flat[0], steps, out=flat[1:])
            # -(d f) of these cells, (r, R) (or -d, (r, 1), without region factors)
            if self.f is None:
                ndf = neg_d[r0:r1]
            else:
                ndf = np.multiply(neg_d[r0:r1], self.f, out=ndf_buf[: r * R].reshape(r, R))
            if coef is not None:
                cm = coef[(r0, r1)] = self._coefficients(ndf, r, flat[0])
        one = np.float32(1.0)
        for s0 in range(0, S, k_max):
            s1 = min(S, s0 + k_max)
            k = s1 - s0
            a_flat = a_buf[: k * r * R]
            a = a_flat.reshape(k, r, R)
            c = c_buf[: k * r * Q].reshape(k, r, Q)
            if coef is not None:  # p * c + m: two passes, no gather
                np.multiply(px[s0:s1, r0:r1], cm[0], out=a)
                a += cm[1]
            else:
                q_nz = q_buf[: k * nnz]
                fk = flat[:k].reshape(-1)
                np.multiply(px[s0:s1, r0:r1], ndf, out=a)  # -q
                np.take(a_flat, fk, out=q_nz)
                np.negative(q_nz, out=q_nz)  # q where accessible
                np.add(a, one, out=a)  # 1 - q
                a_flat[fk] = q_nz  # every region's factor
            np.multiply(a[..., :Q], a[..., Q : 2 * Q], out=c)
            np.multiply(c, a[..., 2 * Q : 3 * Q], out=c)
            np.multiply(c, a[..., 3 * Q : 4 * Q], out=c)
            # log(0) is -inf where a factor is 0: those rows are summed again below
            with np.errstate(divide="ignore"):
                np.log(c, out=c)
                dense = c.sum(-1)  # float32 sums per (sample, cell), as torch sums
                if R > 4 * Q:  # the last R % 4 regions, one log each
                    dense += np.log(a[..., 4 * Q :]).sum(-1)
            bad = ~np.isfinite(dense)
            # a product at or below float32's smallest normal (log <= -87.34) may have lost
            # bits; a factor of 0 (log -inf) needs torch's clamp
            if c.min(initial=0.0) <= _LOG_F32_TINY:
                bad |= (c <= _LOG_F32_TINY).any(-1)
            if bad.any():
                for si, ri in zip(*np.nonzero(bad), strict=True):
                    p_row = px[s0 + si, r0 + ri]
                    dense[si, ri] = self._row_exact(p_row, neg_d[r0 + ri], ri, e0, counts)
            out[s0:s1, r0:r1] = dense

    def _row_exact(self, p_row, neg_d, ri: int, e0: int, counts) -> np.float32:
        """One (sample, cell)'s sum element by element, with torch's clamps at -100; ``neg_d``
        the cell's ``-d`` (1,)."""
        lo = np.float32(BCE_LOG_MIN)
        ndf = neg_d if self.f is None else neg_d * self.f  # as the block's -(d f), row ri
        q = -(p_row * ndf)
        acc = self.entries.cols[e0 + int(counts[:ri].sum()) :][: int(counts[ri])]
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.maximum(np.log1p(-q), lo)
            terms[acc] = np.maximum(np.log(q[acc]), lo)
        return terms.sum()
