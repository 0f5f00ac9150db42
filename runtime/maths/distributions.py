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
* :func:`log_nb_mixture` follows ``scvi.distributions._negative_binomial.log_mixture_nb``
  (TOTALVI's proteins: background and foreground negative binomials with one dispersion,
  ``pi`` the logits of the background); :func:`nb_mixture_core` is its part that depends on
  the means (the count terms are the NB's, computed once per cell by the runtime).
* :func:`binary_cross_entropy` follows ``torch.nn.functional.binary_cross_entropy`` (each log
  clamped at -100), the likelihood of PEAKVI: ``log p(x | z) = -sum_r BCE(p_r d f_r, x_r > 0)``.
* :func:`kl_normal` follows ``torch.distributions.kl_divergence(Normal, Normal)``, but takes
  variances, as the scvi encoders output them; :func:`kl_categorical` torch's
  ``kl_divergence(Categorical, Categorical)`` (SCANVI).

These are the float64-tested reference formulas. The runtime's hot path computes the same
per-cell sums fast in :mod:`scvi_onnx.likelihood`, whose tests compare it with these.

All functions broadcast like numpy and compute in the floating dtype of their inputs (float32
stays float32, as in torch); integer counts are cast to that dtype.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
from numpy.typing import ArrayLike, NDArray

from ..bundle.format import BCE_LOG_MIN, LIKELIHOOD_EPS

__all__ = [
    "binary_cross_entropy",
    "kl_categorical",
    "kl_normal",
    "kl_normal_standard",
    "log_nb_mixture",
    "log_nb_positive",
    "log_normal",
    "log_poisson",
    "log_zinb_positive",
    "logsumexp",
    "nb_count_terms",
    "nb_mixture_core",
    "softmax",
    "softplus",
]

#: ``log(sqrt(2 * pi))`` as torch's ``Normal.log_prob`` computes it.
_LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))
_F32_EPS = float(np.finfo(np.float32).eps)


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


def _gammaln(x: NDArray) -> NDArray:
    from scipy.special import gammaln  # on first use: scipy.special adds ~0.2 s to an import

    return gammaln(x)


def _xlogy(x: NDArray, y: NDArray) -> NDArray:
    from scipy.special import xlogy

    return xlogy(x, y)


def _as(a: ArrayLike, dtype: np.dtype) -> NDArray:
    return np.asarray(a, dtype=dtype)


def _softplus(v: NDArray, out: NDArray | None = None) -> NDArray:
    """``log(1 + exp(v))``, stable for large ``|v|``."""
    return np.logaddexp(0, v, out=out)


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
        + _gammaln(x + theta)
        - _gammaln(theta)
        - _gammaln(x + 1)
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
        + _gammaln(x + theta)
        - _gammaln(theta)
        - _gammaln(x + 1)
    )
    mul_case_non_zero = (x > eps).astype(dtype) * case_non_zero
    return mul_case_zero + mul_case_non_zero


def softplus(v: ArrayLike) -> NDArray:
    """``log(1 + exp(v))``, exact and stable (``-log sigmoid(-v)``)."""
    v = np.asarray(v)
    return _softplus(v.astype(_float_dtype(v)))


def nb_count_terms(x: ArrayLike, theta: ArrayLike) -> NDArray:
    """The count terms of a negative binomial, ``lgamma(x + theta) - lgamma(theta) -
    lgamma(x + 1)``, elementwise: the part of :func:`log_nb_positive` that does not depend on
    the mean."""
    dtype = _float_dtype(x, theta)
    x, theta = _as(x, dtype), _as(theta, dtype)
    return _gammaln(x + theta) - _gammaln(theta) - _gammaln(x + 1)


def nb_mixture_core(
    x: ArrayLike,
    mu_1: ArrayLike,
    mu_2: ArrayLike,
    theta: ArrayLike,
    pi: ArrayLike,
    eps: float = LIKELIHOOD_EPS,
) -> NDArray:
    """:func:`log_nb_mixture` without its count terms ``lgamma(x + theta) - lgamma(theta) -
    lgamma(x + 1)`` (the same in both components, so outside the mixture's logsumexp).

    ``logsumexp(a_1, a_2 - pi) - softplus(-pi)`` with ``a_k = theta * (log(theta + eps) -
    log(theta + mu_k + eps)) + x * (log(mu_k + eps) - log(theta + mu_k + eps))``.
    """
    dtype = _float_dtype(x, mu_1, mu_2, theta, pi)
    x, mu_1, mu_2, theta, pi = (_as(a, dtype) for a in (x, mu_1, mu_2, theta, pi))
    eps = dtype.type(eps)
    log_theta_eps = np.log(theta + eps)

    def core(mu: NDArray) -> NDArray:
        log_theta_mu_eps = np.log(theta + mu + eps)
        return theta * (log_theta_eps - log_theta_mu_eps) + x * (
            np.log(mu + eps) - log_theta_mu_eps
        )

    return np.logaddexp(core(mu_1), core(mu_2) - pi) - _softplus(-pi)


def log_nb_mixture(
    x: ArrayLike,
    mu_1: ArrayLike,
    mu_2: ArrayLike,
    theta: ArrayLike,
    pi: ArrayLike,
    eps: float = LIKELIHOOD_EPS,
) -> NDArray:
    """Log-likelihood of a two-component negative binomial mixture, elementwise, as ``scvi``'s
    ``NegativeBinomialMixture.log_prob`` (one shared inverse dispersion).

    ``log(sigmoid(pi) NB(x; mu_1, theta) + (1 - sigmoid(pi)) NB(x; mu_2, theta))``, computed as
    scvi-tools does: ``logsumexp(log NB_1, log NB_2 - pi) - softplus(-pi)`` with the ``eps`` of
    :func:`log_nb_positive` inside the logs. TOTALVI: component 1 is a protein's background,
    component 2 its foreground, ``pi`` the logits of the background.

    Parameters
    ----------
    x
        Counts.
    mu_1, mu_2
        Means of the two components (positive).
    theta
        Their inverse dispersion (positive).
    pi
        Logits of the probability of component 1.
    eps
        Stability constant inside the logs.

    Returns
    -------
    numpy.ndarray
        Log-likelihood with the broadcast shape of the inputs.
    """
    return nb_mixture_core(x, mu_1, mu_2, theta, pi, eps) + nb_count_terms(x, theta)


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
    return _xlogy(x, rate) - rate - _gammaln(x + 1)


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


def binary_cross_entropy(p: ArrayLike, target: ArrayLike) -> NDArray:
    """Binary cross-entropy, elementwise, as ``torch.nn.functional.binary_cross_entropy``.

    ``-(y * max(log p, -100) + (1 - y) * max(log1p(-p), -100))``: torch clamps each log at
    -100, so ``p = 0`` with ``y = 1`` (or ``p = 1`` with ``y = 0``) costs 100, not infinity.
    For a 0/1 target it is ``-log`` of the Bernoulli probability of ``y``.

    PEAKVI's reconstruction loss is its sum over regions with ``p = px * d * f`` (the decoder's
    probability, the cell's depth factor, the region factor) and the target ``x > 0``: any
    positive value counts as accessible, whatever its size.

    Parameters
    ----------
    p
        Probabilities in ``[0, 1]``.
    target
        Targets in ``[0, 1]`` (0/1 for PEAKVI).

    Returns
    -------
    numpy.ndarray
        The loss (non-negative) with the broadcast shape of the inputs.
    """
    dtype = _float_dtype(p, target)
    p, y = _as(p, dtype), _as(target, dtype)
    lo = dtype.type(BCE_LOG_MIN)
    with np.errstate(divide="ignore"):  # log(0) = -inf, then clamped
        log_p = np.maximum(np.log(p), lo)
        log_1mp = np.maximum(np.log1p(-p), lo)
    return (y - 1) * log_1mp - y * log_p


# ---------------------------------------------------------------------------------------------
# KL divergences
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


def kl_categorical(probs: NDArray, prior: NDArray) -> NDArray:
    """``KL(Cat(probs) || Cat(prior))`` over the last axis, as torch's ``kl_divergence``.

    torch normalises ``probs``, takes logs of probabilities clamped to ``[eps, 1 - eps]``
    (float32 ``eps``), gives ``inf`` where the prior is 0 and 0 where ``probs`` is 0.
    """
    p = probs / probs.sum(-1, keepdims=True)
    q = prior / prior.sum(-1, keepdims=True)
    lp = np.log(np.clip(p, _F32_EPS, 1 - _F32_EPS))
    lq = np.log(np.clip(q, _F32_EPS, 1 - _F32_EPS))
    t = p * (lp - lq)
    t = np.where(np.broadcast_to(q == 0, t.shape), np.inf, t)
    t = np.where(p == 0, 0.0, t)
    return t.sum(-1)


# ---------------------------------------------------------------------------------------------
# softmax and logsumexp (scipy's, imported on first use: scipy.special adds ~0.2 s to an import)
# ---------------------------------------------------------------------------------------------


def softmax(a: NDArray, axis: int = -1) -> NDArray:
    """``scipy.special.softmax``: the logistic-normal transform of z."""
    from scipy.special import softmax as _softmax

    return _softmax(a, axis=axis)


def logsumexp(a: NDArray, axis: int = 0) -> NDArray:
    """``scipy.special.logsumexp``: the marginal-LL reduction over importance samples."""
    from scipy.special import logsumexp as _logsumexp

    return _logsumexp(a, axis=axis)
