"""Torch-free log-likelihoods and KL terms of scvi-tools 1.4.2.

Every function here is a numpy/scipy transcription of the torch code that scvi-tools uses in
``VAE.loss`` and ``VAE.marginal_ll``:

* :func:`log_nb_positive` and :func:`log_zinb_positive` follow
  ``scvi.distributions._negative_binomial`` term by term, including the ``eps`` inside the logs
  and the ``x < eps`` / ``x > eps`` masks of the zero-inflated model (``pi`` are logits of the
  dropout probability). The softplus is the exact ``log(1 + exp(v))``; torch's ``F.softplus``
  returns ``v`` itself above 20, so the two differ by at most ``exp(-20) ~ 2e-9`` per call.
* :func:`log_poisson` and :func:`log_normal` follow ``torch.distributions.Poisson.log_prob`` and
  ``torch.distributions.Normal.log_prob`` (``scale`` is a standard deviation).
* :func:`kl_normal` follows ``torch.distributions.kl_divergence(Normal, Normal)``, but takes
  variances, as the scvi encoders output them.

The ``*_sum`` functions return per-cell sums over genes (the last axis) for the Monte-Carlo case
where the decoder outputs carry a leading sample axis ``(S, n_cells, n_genes)`` while the counts
are ``(n_cells, n_genes)``, dense or scipy.sparse. They avoid recomputing what does not change
across samples: :func:`nb_count_constant` gives the ``gammaln`` terms of the negative binomial,
which vanish where ``x == 0`` and so are evaluated on the non-zero counts only.

All functions broadcast like numpy and compute in the floating dtype of their inputs (float32
stays float32, as in torch); integer counts are cast to that dtype.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
from numpy.typing import ArrayLike, NDArray
from scipy.special import gammaln, xlogy

from .bundle import LIKELIHOOD_EPS

__all__ = [
    "kl_normal",
    "kl_normal_standard",
    "log_nb_positive",
    "log_nb_positive_sum",
    "log_normal",
    "log_normal_sum",
    "log_poisson",
    "log_poisson_sum",
    "log_zinb_positive",
    "log_zinb_positive_sum",
    "logsumexp",
    "nb_count_constant",
]

#: ``log(sqrt(2 * pi))`` as torch's ``Normal.log_prob`` computes it.
_LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _float_dtype(*arrays: ArrayLike | sp.spmatrix) -> np.dtype:
    """The floating dtype the computation runs in.

    The result type of the floating array inputs; Python scalars do not take part (they are
    "weak", as in torch), nor do integer arrays (integer counts do not promote float32
    parameters). float64 if nothing floating is left.
    """
    dtypes = []
    for a in arrays:
        if isinstance(a, (bool, int, float)):
            continue
        dt = a.dtype if hasattr(a, "dtype") else np.asarray(a).dtype
        if np.issubdtype(dt, np.floating):
            dtypes.append(dt)
    if not dtypes:
        return np.dtype(np.float64)
    return np.dtype(np.result_type(*dtypes))


def _as(a: ArrayLike, dtype: np.dtype) -> NDArray:
    return np.asarray(a, dtype=dtype)


def _softplus(v: NDArray, out: NDArray | None = None) -> NDArray:
    """``log(1 + exp(v))``, stable for large ``|v|``."""
    return np.logaddexp(0, v, out=out)


def _dense_counts(x: ArrayLike | sp.spmatrix, dtype: np.dtype) -> NDArray:
    """``x`` as a dense 2-D array of ``dtype`` (sparse input is densified)."""
    if sp.issparse(x):
        x = x.toarray()
    x = np.asarray(x, dtype=dtype)
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (n_cells, n_genes), got shape {x.shape}")
    return x


def _canonical_csr(x: sp.spmatrix) -> sp.csr_matrix | sp.csr_array:
    """``x`` in CSR without duplicate entries (the stored matrix is never modified)."""
    x = x.tocsr()
    if not x.has_canonical_format:
        x = x.copy()
        x.sum_duplicates()
    return x


def _select_entries(
    x: ArrayLike | sp.spmatrix, keep
) -> tuple[NDArray, NDArray, NDArray, tuple[int, int]]:
    """Row-sorted coordinates and values of the entries of 2-D ``x`` where ``keep(value)``.

    Only stored entries of a sparse ``x`` are looked at (implicit zeros are never kept).
    """
    if sp.issparse(x):
        x = _canonical_csr(x)
        if x.ndim != 2:
            raise ValueError(f"x must be 2-D (n_cells, n_genes), got shape {x.shape}")
        data = np.asarray(x.data)
        rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
        mask = keep(data)
        return rows[mask], np.asarray(x.indices)[mask], data[mask], x.shape
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (n_cells, n_genes), got shape {x.shape}")
    rows, cols = np.nonzero(keep(x))
    return rows, cols, x[rows, cols], x.shape


def _row_sums(vals: NDArray, rows: NDArray, n_rows: int) -> NDArray:
    """Sums of ``vals[..., k]`` grouped by the sorted row index ``rows[k]``.

    The result has shape ``vals.shape[:-1] + (n_rows,)``; rows without entries are 0.
    """
    out = np.zeros(vals.shape[:-1] + (n_rows,), dtype=vals.dtype)
    if rows.size == 0:
        return out
    starts = np.flatnonzero(np.concatenate(([True], rows[1:] != rows[:-1])))
    out[..., rows[starts]] = np.add.reduceat(vals, starts, axis=-1)
    return out


def _count_terms(
    x: ArrayLike | sp.spmatrix, theta: ArrayLike, keep, dtype: np.dtype | None = None
) -> NDArray:
    """Per-row sums of ``gammaln(x + theta) - gammaln(theta) - gammaln(x + 1)``.

    Only over the entries of ``x`` where ``keep(x)`` is true.
    """
    if dtype is None:
        dtype = _float_dtype(x, theta)
    theta = _as(theta, dtype)
    rows, cols, xv, shape = _select_entries(x, keep)
    full = np.broadcast_shapes(theta.shape, shape)
    theta_v = np.broadcast_to(theta, full)[..., rows, cols]
    xv = xv.astype(dtype, copy=False)
    terms = gammaln(xv + theta_v)
    terms -= gammaln(theta_v)
    terms -= gammaln(xv + 1)
    return _row_sums(terms, rows, shape[0])


def _nonzero(v: NDArray) -> NDArray:
    return v != 0


# ---------------------------------------------------------------------------------------------
# elementwise log-likelihoods
# ---------------------------------------------------------------------------------------------


def log_nb_positive(
    x: ArrayLike, mu: ArrayLike, theta: ArrayLike, eps: float = LIKELIHOOD_EPS
) -> NDArray:
    """Negative binomial log-likelihood, elementwise, as ``scvi`` computes it.

    ``theta * (log(theta + eps) - log(theta + mu + eps)) + x * (log(mu + eps) - log(theta + mu
    + eps)) + gammaln(x + theta) - gammaln(theta) - gammaln(x + 1)``.

    Parameters
    ----------
    x
        Counts.
    mu
        Mean of the negative binomial (positive).
    theta
        Inverse dispersion (positive); a ``(n_genes,)`` vector broadcasts over cells.
    eps
        Stability constant inside the logs (scvi's default ``1e-8``).

    Returns
    -------
    numpy.ndarray
        Log-likelihood with the broadcast shape of the inputs.
    """
    dtype = _float_dtype(x, mu, theta)
    x, mu, theta = _as(x, dtype), _as(mu, dtype), _as(theta, dtype)
    eps = dtype.type(eps)
    log_theta_mu_eps = np.log(theta + mu + eps)
    return (
        theta * (np.log(theta + eps) - log_theta_mu_eps)
        + x * (np.log(mu + eps) - log_theta_mu_eps)
        + gammaln(x + theta)
        - gammaln(theta)
        - gammaln(x + 1)
    )


def log_zinb_positive(
    x: ArrayLike,
    mu: ArrayLike,
    theta: ArrayLike,
    pi: ArrayLike,
    eps: float = LIKELIHOOD_EPS,
) -> NDArray:
    """Zero-inflated negative binomial log-likelihood, elementwise, as ``scvi`` computes it.

    With ``pi_theta_log = -pi + theta * (log(theta + eps) - log(theta + mu + eps))``, the value
    is ``softplus(pi_theta_log) - softplus(-pi)`` where ``x < eps`` and ``-softplus(-pi) +
    pi_theta_log + x * (log(mu + eps) - log(theta + mu + eps)) + gammaln(x + theta) -
    gammaln(theta) - gammaln(x + 1)`` where ``x > eps``; each case is multiplied by its 0/1 mask
    and the two are added, exactly as in scvi (so a non-finite value of the masked-out case
    propagates as in torch).

    Parameters
    ----------
    x
        Counts.
    mu
        Mean of the negative binomial (positive).
    theta
        Inverse dispersion (positive).
    pi
        Logits of the dropout (zero-inflation) probability.
    eps
        Stability constant inside the logs and threshold of the zero / non-zero masks.

    Returns
    -------
    numpy.ndarray
        Log-likelihood with the broadcast shape of the inputs.
    """
    dtype = _float_dtype(x, mu, theta, pi)
    x, mu, theta, pi = _as(x, dtype), _as(mu, dtype), _as(theta, dtype), _as(pi, dtype)
    eps = dtype.type(eps)
    softplus_pi = _softplus(-pi)
    log_theta_mu_eps = np.log(theta + mu + eps)
    pi_theta_log = -pi + theta * (np.log(theta + eps) - log_theta_mu_eps)
    case_zero = _softplus(pi_theta_log) - softplus_pi
    mul_case_zero = (x < eps).astype(dtype) * case_zero
    case_non_zero = (
        -softplus_pi
        + pi_theta_log
        + x * (np.log(mu + eps) - log_theta_mu_eps)
        + gammaln(x + theta)
        - gammaln(theta)
        - gammaln(x + 1)
    )
    mul_case_non_zero = (x > eps).astype(dtype) * case_non_zero
    return mul_case_zero + mul_case_non_zero


def log_poisson(x: ArrayLike, rate: ArrayLike) -> NDArray:
    """Poisson log-likelihood, elementwise: ``xlogy(x, rate) - rate - gammaln(x + 1)``.

    As ``torch.distributions.Poisson.log_prob`` (no ``eps``; ``x == 0`` with ``rate == 0``
    gives 0).

    Parameters
    ----------
    x
        Counts.
    rate
        Poisson rate (non-negative).

    Returns
    -------
    numpy.ndarray
        Log-likelihood with the broadcast shape of the inputs.
    """
    dtype = _float_dtype(x, rate)
    x, rate = _as(x, dtype), _as(rate, dtype)
    return xlogy(x, rate) - rate - gammaln(x + 1)


def log_normal(x: ArrayLike, loc: ArrayLike, scale: ArrayLike) -> NDArray:
    """Normal log-density, elementwise, as ``torch.distributions.Normal.log_prob``.

    ``-(x - loc) ** 2 / (2 * scale ** 2) - log(scale) - log(sqrt(2 * pi))``.

    Parameters
    ----------
    x
        Values.
    loc
        Mean.
    scale
        Standard deviation (positive).

    Returns
    -------
    numpy.ndarray
        Log-density with the broadcast shape of the inputs.
    """
    dtype = _float_dtype(x, loc, scale)
    x, loc, scale = _as(x, dtype), _as(loc, dtype), _as(scale, dtype)
    var = scale**2
    return -((x - loc) ** 2) / (2 * var) - np.log(scale) - dtype.type(_LOG_SQRT_2PI)


# ---------------------------------------------------------------------------------------------
# KL divergences and logsumexp
# ---------------------------------------------------------------------------------------------


def kl_normal(m1: ArrayLike, v1: ArrayLike, m2: ArrayLike, v2: ArrayLike) -> NDArray:
    """``KL(N(m1, var=v1) || N(m2, var=v2))``, elementwise.

    The same operations as ``torch.distributions.kl_divergence(Normal(m1, sqrt(v1)),
    Normal(m2, sqrt(v2)))``: ``0.5 * (r + t - 1 - log(r))`` with ``r = (sqrt(v1) /
    sqrt(v2)) ** 2`` and ``t = ((m1 - m2) / sqrt(v2)) ** 2``.

    Parameters
    ----------
    m1, v1
        Mean and variance of the first distribution.
    m2, v2
        Mean and variance of the second distribution.

    Returns
    -------
    numpy.ndarray
        KL divergence with the broadcast shape of the inputs.
    """
    dtype = _float_dtype(m1, v1, m2, v2)
    m1, v1, m2, v2 = (_as(a, dtype) for a in (m1, v1, m2, v2))
    s2 = np.sqrt(v2)
    var_ratio = (np.sqrt(v1) / s2) ** 2
    t1 = ((m1 - m2) / s2) ** 2
    return dtype.type(0.5) * (var_ratio + t1 - 1 - np.log(var_ratio))


def kl_normal_standard(m: ArrayLike, v: ArrayLike) -> NDArray:
    """``KL(N(m, var=v) || N(0, 1))``, elementwise.

    Equal to :func:`kl_normal` with ``m2 = 0`` and ``v2 = 1`` (and to torch's
    ``kl_divergence(Normal(m, sqrt(v)), Normal(0, 1))``).

    Parameters
    ----------
    m
        Mean.
    v
        Variance.

    Returns
    -------
    numpy.ndarray
        KL divergence with the broadcast shape of ``m`` and ``v``.
    """
    dtype = _float_dtype(m, v)
    m, v = _as(m, dtype), _as(v, dtype)
    var_ratio = np.sqrt(v) ** 2
    return dtype.type(0.5) * (var_ratio + m**2 - 1 - np.log(var_ratio))


def logsumexp(a: ArrayLike, axis: int | tuple[int, ...] | None = 0) -> NDArray:
    """``log(sum(exp(a), axis))``, computed stably in the dtype of ``a``.

    Slices that are all ``-inf`` give ``-inf``; any ``+inf`` gives ``+inf``; NaN propagates.

    Parameters
    ----------
    a
        Input array.
    axis
        Axis or axes to reduce (``None``: all).

    Returns
    -------
    numpy.ndarray
        The reduced array.
    """
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    a_max = np.max(a, axis=axis, keepdims=True)
    a_max = np.where(np.isfinite(a_max), a_max, 0).astype(a.dtype, copy=False)
    with np.errstate(divide="ignore"):
        out = np.log(np.sum(np.exp(a - a_max), axis=axis, keepdims=True))
    out += a_max
    if axis is None:
        return out.reshape(())
    return np.squeeze(out, axis=axis)


# ---------------------------------------------------------------------------------------------
# per-cell sums for Monte-Carlo samples
# ---------------------------------------------------------------------------------------------


def nb_count_constant(x: ArrayLike | sp.spmatrix, theta: ArrayLike) -> NDArray:
    """Per-cell sum over genes of ``gammaln(x + theta) - gammaln(theta) - gammaln(x + 1)``.

    These terms of the negative binomial log-likelihood do not depend on ``mu``, and are exactly
    0 where ``x == 0`` (for finite positive ``theta``), so they are evaluated on the non-zero
    entries of ``x`` only (the stored non-zeros of a sparse ``x``).

    Parameters
    ----------
    x
        Counts, ``(n_cells, n_genes)``, a dense array or a scipy.sparse matrix/array.
    theta
        Inverse dispersion broadcastable to ``x``: ``(n_genes,)`` or ``(n_cells, n_genes)``
        (a leading sample axis ``(S, n_cells, n_genes)`` is allowed and kept).

    Returns
    -------
    numpy.ndarray
        ``(n_cells,)`` (or ``(S, n_cells)`` for a ``theta`` with a sample axis), in the dtype of
        ``theta`` (or of ``x`` if it is floating and wider).
    """
    return _count_terms(x, theta, _nonzero)


def log_nb_positive_sum(
    x: ArrayLike | sp.spmatrix,
    mu: ArrayLike,
    theta: ArrayLike,
    const: ArrayLike | None = None,
    eps: float = LIKELIHOOD_EPS,
) -> NDArray:
    """Per-cell sum over genes of :func:`log_nb_positive`.

    Equal to ``log_nb_positive(x, mu, theta, eps).sum(-1)`` up to floating-point rounding of
    the summation order, wherever the elementwise terms are finite.

    Parameters
    ----------
    x
        Counts, ``(n_cells, n_genes)``, a dense array or a scipy.sparse matrix/array.
    mu
        Means, ``(n_cells, n_genes)`` or with a leading sample axis ``(S, n_cells, n_genes)``.
    theta
        Inverse dispersion: ``(n_genes,)``, ``(n_cells, n_genes)`` or ``(S, n_cells, n_genes)``.
    const
        Optional output of :func:`nb_count_constant` for the same ``x`` and ``theta``; added
        instead of recomputing the ``gammaln`` terms. Only valid when ``theta`` does not vary
        across samples.
    eps
        Stability constant inside the logs.

    Returns
    -------
    numpy.ndarray
        ``(S, n_cells)`` or ``(n_cells,)``.
    """
    dtype = _float_dtype(x, mu, theta)
    mu, theta = _as(mu, dtype), _as(theta, dtype)
    eps_t = dtype.type(eps)
    if const is None:
        const = _count_terms(x, theta, _nonzero, dtype)
    xd = _dense_counts(x, dtype)
    full = np.broadcast_shapes(xd.shape, mu.shape, theta.shape)

    # log(theta + mu + eps)
    log_tme = np.add(theta, mu, out=np.empty(full, dtype=dtype))
    log_tme += eps_t
    np.log(log_tme, out=log_tme)
    # theta * (log(theta + eps) - log(theta + mu + eps))
    buf = np.subtract(np.log(theta + eps_t), log_tme, out=np.empty(full, dtype=dtype))
    buf *= theta
    res = buf.sum(axis=-1)
    # x * (log(mu + eps) - log(theta + mu + eps))
    np.add(mu, eps_t, out=buf)
    np.log(buf, out=buf)
    buf -= log_tme
    del log_tme
    buf *= xd
    res += buf.sum(axis=-1)
    return res + _as(const, dtype)


def log_zinb_positive_sum(
    x: ArrayLike | sp.spmatrix,
    mu: ArrayLike,
    theta: ArrayLike,
    pi: ArrayLike,
    const: ArrayLike | None = None,
    eps: float = LIKELIHOOD_EPS,
) -> NDArray:
    """Per-cell sum over genes of :func:`log_zinb_positive`.

    Equal to ``log_zinb_positive(x, mu, theta, pi, eps).sum(-1)`` up to floating-point
    rounding of the summation order, wherever the elementwise terms are finite.

    Parameters
    ----------
    x
        Counts, ``(n_cells, n_genes)``, a dense array or a scipy.sparse matrix/array.
    mu
        Means, ``(n_cells, n_genes)`` or ``(S, n_cells, n_genes)``.
    theta
        Inverse dispersion: ``(n_genes,)``, ``(n_cells, n_genes)`` or ``(S, n_cells, n_genes)``.
    pi
        Dropout logits, broadcastable to ``mu``.
    const
        Optional output of :func:`nb_count_constant` **for the same x and theta** (only valid
        when ``theta`` does not vary across samples). The ``gammaln`` terms of the zero-inflated
        model apply where ``x > eps``; ``nb_count_constant`` sums them where ``x != 0``. The two
        sets coincide for count data; entries with ``0 < x <= eps`` (or negative ``x``) are
        taken out of ``const`` here.
    eps
        Stability constant inside the logs and threshold of the zero / non-zero masks.

    Returns
    -------
    numpy.ndarray
        ``(S, n_cells)`` or ``(n_cells,)``.
    """
    dtype = _float_dtype(x, mu, theta, pi)
    mu, theta, pi = _as(mu, dtype), _as(theta, dtype), _as(pi, dtype)
    eps_t = dtype.type(eps)

    def above_eps(v: NDArray) -> NDArray:
        return v > eps_t

    def nonzero_not_above_eps(v: NDArray) -> NDArray:
        return (v != 0) & ~(v > eps_t)

    if const is None:
        const = _count_terms(x, theta, above_eps, dtype)
    else:
        const = _as(const, dtype)
        xv = x.data if sp.issparse(x) else np.asarray(x)
        if np.any(nonzero_not_above_eps(xv.astype(dtype, copy=False))):
            const = const - _count_terms(x, theta, nonzero_not_above_eps, dtype)
    xd = _dense_counts(x, dtype)
    full = np.broadcast_shapes(xd.shape, mu.shape, theta.shape, pi.shape)
    mask_zero = (xd < eps_t).astype(dtype)
    mask_non_zero = (xd > eps_t).astype(dtype)

    # buf_a: log(theta + mu + eps)
    buf_a = np.add(theta, mu, out=np.empty(full, dtype=dtype))
    buf_a += eps_t
    np.log(buf_a, out=buf_a)
    # buf_b: x * (log(mu + eps) - log(theta + mu + eps))
    buf_b = np.add(mu, eps_t, out=np.empty(full, dtype=dtype))
    np.log(buf_b, out=buf_b)
    buf_b -= buf_a
    buf_b *= xd
    # buf_a: pi_theta_log = -pi + theta * (log(theta + eps) - log(theta + mu + eps))
    np.subtract(np.log(theta + eps_t), buf_a, out=buf_a)
    buf_a *= theta
    buf_a -= pi
    # buf_b: non-zero case without softplus(-pi) and the gammaln terms, masked
    buf_b += buf_a
    buf_b *= mask_non_zero
    # buf_a: zero case without softplus(-pi), masked
    _softplus(buf_a, out=buf_a)
    buf_a *= mask_zero
    buf_a += buf_b
    # -softplus(-pi) in both cases
    np.negative(pi, out=buf_b)
    _softplus(buf_b, out=buf_b)
    mask_zero += mask_non_zero
    buf_b *= mask_zero
    buf_a -= buf_b
    del buf_b
    res = buf_a.sum(axis=-1)
    return res + const


def log_poisson_sum(x: ArrayLike | sp.spmatrix, rate: ArrayLike) -> NDArray:
    """Per-cell sum over genes of :func:`log_poisson`.

    Parameters
    ----------
    x
        Counts, ``(n_cells, n_genes)``, a dense array or a scipy.sparse matrix/array.
    rate
        Rates, ``(n_cells, n_genes)`` or ``(S, n_cells, n_genes)``.

    Returns
    -------
    numpy.ndarray
        ``(S, n_cells)`` or ``(n_cells,)``.
    """
    dtype = _float_dtype(x, rate)
    rate = _as(rate, dtype)
    rows, _, xv, shape = _select_entries(x, _nonzero)
    log_x_fact = _row_sums(gammaln(xv.astype(dtype, copy=False) + 1), rows, shape[0])
    xd = _dense_counts(x, dtype)
    full = np.broadcast_shapes(xd.shape, rate.shape)
    buf = xlogy(xd, rate, out=np.empty(full, dtype=dtype))
    buf -= rate
    res = buf.sum(axis=-1)
    return res - log_x_fact


def log_normal_sum(x: ArrayLike, loc: ArrayLike, scale: ArrayLike) -> NDArray:
    """Per-row sum over the last axis of :func:`log_normal`.

    Parameters
    ----------
    x
        Values (dense or scipy.sparse; ``(..., n)``).
    loc
        Means, broadcastable with ``x`` (e.g. with a leading sample axis).
    scale
        Standard deviations, broadcastable with ``x``.

    Returns
    -------
    numpy.ndarray
        The broadcast shape of the inputs without its last axis.
    """
    if sp.issparse(x):
        x = x.toarray()
    dtype = _float_dtype(x, loc, scale)
    x, loc, scale = _as(x, dtype), _as(loc, dtype), _as(scale, dtype)
    full = np.broadcast_shapes(x.shape, loc.shape, scale.shape)
    buf = np.subtract(x, loc, out=np.empty(full, dtype=dtype))
    np.square(buf, out=buf)
    tmp = np.square(scale)
    tmp *= 2
    buf /= tmp
    np.log(scale, out=tmp)
    buf += tmp
    del tmp
    buf += dtype.type(_LOG_SQRT_2PI)
    return -buf.sum(axis=-1)
