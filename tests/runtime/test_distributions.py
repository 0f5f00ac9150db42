"""Tests of scvi_onnx.distributions against scipy.stats, closed forms and scvi-tools' torch code."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from scipy.special import gammaln, log_expit
from scipy.special import logsumexp as scipy_logsumexp

from scvi_onnx import distributions as D
from scvi_onnx.bundle import LIKELIHOOD_EPS

# An eps too small to change log(theta + eps) for theta >= 1e-6, but which keeps the
# ``x < eps`` / ``x > eps`` masks of the ZINB meaningful for integer counts (eps=0 would not).
TINY_EPS = 1e-300

# Relative tolerance with respect to the magnitude of the terms that are added up.
RTOL = 1e-12

# torch's F.softplus returns its input above 20 (its default threshold), an error of at most
# exp(-20) per call; ours is the exact log(1 + exp(v)). log_zinb_positive has two softplus calls.
TORCH_SOFTPLUS_ERR = 2 * np.exp(-20.0)

HYP = settings(max_examples=200, deadline=None)

log_uniform = st.floats(min_value=-6.0, max_value=6.0).map(lambda e: 10.0**e)
counts = st.one_of(st.integers(0, 10), st.integers(0, 10**6)).map(float)
logits = st.floats(min_value=-30.0, max_value=30.0)


# ---------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------


def nb_magnitude(x, mu, theta):
    """Sum of the magnitudes of the terms (and their intermediate logs) of the NB formula."""
    x, mu, theta = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in (x, mu, theta)))
    log_tm = np.abs(np.log(theta + mu))
    return (
        np.abs(gammaln(x + theta))
        + np.abs(gammaln(theta))
        + np.abs(gammaln(x + 1))
        + theta * (np.abs(np.log(theta)) + log_tm)
        + x * (np.abs(np.log(mu)) + log_tm)
        + 1.0
    )


def nbinom_scipy(x, mu, theta):
    """NB log-pmf from scipy.stats.nbinom with n = theta, p = theta / (theta + mu)."""
    return stats.nbinom.logpmf(x, theta, theta / (theta + mu))


def nbinom_scipy_error(x, mu, theta):
    """Bound on scipy's own error from rounding p = theta / (theta + mu) (|dL/dp| * ulp(p))."""
    return 4.5e-16 * (theta + x * theta / mu)


def nb_closed_form(x, mu, theta, eps):
    """NB log-pmf with scvi's eps, written with log1p instead of differences of logs."""
    return (
        gammaln(x + theta)
        - gammaln(theta)
        - gammaln(x + 1)
        - theta * np.log1p(mu / (theta + eps))
        - x * np.log1p(theta / (mu + eps))
    )


def zinb_mixture(x, log_nb, logit):
    """ZINB log-pmf: dropout with probability sigmoid(logit), else NB (given as log_nb)."""
    log_drop = log_expit(logit)
    log_keep = log_expit(-logit)
    return np.where(x == 0, np.logaddexp(log_drop, log_keep + log_nb), log_keep + log_nb)


def kl_closed_form(m1, v1, m2, v2):
    return 0.5 * (np.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1.0)


def random_params(rng, shape, lo=-6.0, hi=6.0):
    return 10.0 ** rng.uniform(lo, hi, size=shape)


def random_counts(rng, shape):
    small = rng.integers(0, 10, size=shape)
    large = np.floor(10.0 ** rng.uniform(0, 6, size=shape))
    return np.where(rng.random(shape) < 0.5, small, large)


# ---------------------------------------------------------------------------------------------
# elementwise functions vs scipy.stats and closed forms
# ---------------------------------------------------------------------------------------------


def test_log_nb_positive_vs_scipy_nbinom_grid():
    rng = np.random.default_rng(0)
    x = random_counts(rng, 5000)
    mu = random_params(rng, 5000, -2, 4)
    theta = random_params(rng, 5000, -2, 4)
    ours = D.log_nb_positive(x, mu, theta, eps=0.0)
    ref = nbinom_scipy(x, mu, theta)
    tol = RTOL * nb_magnitude(x, mu, theta) + nbinom_scipy_error(x, mu, theta)
    np.testing.assert_array_less(np.abs(ours - ref), tol)


@HYP
@given(x=counts, mu=log_uniform, theta=log_uniform)
def test_log_nb_positive_extreme_vs_scipy(x, mu, theta):
    ours = D.log_nb_positive(x, mu, theta, eps=0.0)
    assert np.isfinite(ours)
    mag = nb_magnitude(x, mu, theta)
    ref = nbinom_scipy(x, mu, theta)
    assert abs(ours - ref) <= RTOL * mag + nbinom_scipy_error(x, mu, theta)
    assert abs(ours - nb_closed_form(x, mu, theta, 0.0)) <= RTOL * mag


@HYP
@given(x=counts, mu=log_uniform, theta=log_uniform)
def test_log_nb_positive_default_eps_vs_closed_form(x, mu, theta):
    ours = D.log_nb_positive(x, mu, theta)
    assert np.isfinite(ours)
    ref = nb_closed_form(x, mu, theta, LIKELIHOOD_EPS)
    assert abs(ours - ref) <= RTOL * nb_magnitude(x, mu, theta)


@HYP
@given(x=counts, mu=log_uniform, theta=log_uniform, logit=logits)
def test_log_zinb_positive_extreme_vs_scipy_mixture(x, mu, theta, logit):
    ours = D.log_zinb_positive(x, mu, theta, logit, eps=TINY_EPS)
    assert np.isfinite(ours)
    ref = zinb_mixture(x, nbinom_scipy(x, mu, theta), logit)
    tol = RTOL * (nb_magnitude(x, mu, theta) + abs(logit)) + nbinom_scipy_error(x, mu, theta)
    assert abs(ours - ref) <= tol


@HYP
@given(x=counts, mu=log_uniform, theta=log_uniform, logit=logits)
def test_log_zinb_positive_default_eps_vs_closed_form(x, mu, theta, logit):
    ours = D.log_zinb_positive(x, mu, theta, logit)
    assert np.isfinite(ours)
    ref = zinb_mixture(x, nb_closed_form(x, mu, theta, LIKELIHOOD_EPS), logit)
    assert abs(ours - ref) <= RTOL * (nb_magnitude(x, mu, theta) + abs(logit))


def test_log_zinb_positive_limits():
    """Very negative logits at x > 0: the NB itself; very positive logits at x=0: log(1) = 0."""
    rng = np.random.default_rng(1)
    x = random_counts(rng, 1000)
    mu = random_params(rng, 1000, -2, 4)
    theta = random_params(rng, 1000, -2, 4)
    x = np.maximum(x, 1.0)  # at x = 0, sigmoid(-40) can still dominate a tiny NB(0)
    nb = D.log_nb_positive(x, mu, theta)
    mag = nb_magnitude(x, mu, theta)
    np.testing.assert_array_less(np.abs(D.log_zinb_positive(x, mu, theta, -40.0) - nb), RTOL * mag)
    zero = D.log_zinb_positive(np.zeros(1000), mu, theta, 40.0)
    np.testing.assert_array_less(np.abs(zero), 1e-16)


def test_log_zinb_positive_masks_follow_eps():
    """x between 0 and eps falls in the zero case; x == eps in neither (both masks are 0)."""
    eps = 1e-3
    mu, theta, logit = 2.0, 3.0, 0.5
    zero_case = D.log_zinb_positive(0.0, mu, theta, logit, eps=eps)
    assert D.log_zinb_positive(eps / 2, mu, theta, logit, eps=eps) == zero_case
    assert D.log_zinb_positive(eps, mu, theta, logit, eps=eps) == 0.0
    assert zero_case < 0.0


@HYP
@given(x=counts, rate=log_uniform)
def test_log_poisson_vs_scipy(x, rate):
    ours = D.log_poisson(x, rate)
    assert np.isfinite(ours)
    ref = stats.poisson.logpmf(x, rate)
    mag = abs(x * np.log(rate)) + rate + gammaln(x + 1) + 1.0
    assert abs(ours - ref) <= RTOL * mag


def test_log_poisson_zero_rate():
    assert D.log_poisson(0.0, 0.0) == stats.poisson.logpmf(0, 0.0) == 0.0
    assert D.log_poisson(3.0, 0.0) == -np.inf


@HYP
@given(
    x=st.floats(-1e3, 1e3),
    loc=st.floats(-1e3, 1e3),
    scale=st.floats(-3.0, 3.0).map(lambda e: 10.0**e),
)
def test_log_normal_vs_scipy(x, loc, scale):
    ours = D.log_normal(x, loc, scale)
    assert np.isfinite(ours)
    ref = stats.norm.logpdf(x, loc, scale)
    mag = ((x - loc) / scale) ** 2 + abs(np.log(scale)) + 1.0
    assert abs(ours - ref) <= RTOL * mag


@HYP
@given(
    m1=st.floats(-1e3, 1e3),
    m2=st.floats(-1e3, 1e3),
    v1=st.floats(-6.0, 6.0).map(lambda e: 10.0**e),
    v2=st.floats(-6.0, 6.0).map(lambda e: 10.0**e),
)
def test_kl_normal_vs_closed_form(m1, v1, m2, v2):
    ours = D.kl_normal(m1, v1, m2, v2)
    assert np.isfinite(ours)
    assert ours >= -1e-12
    ref = kl_closed_form(m1, v1, m2, v2)
    mag = abs(np.log(v2 / v1)) + (v1 + (m1 - m2) ** 2) / v2 + 1.0
    assert abs(ours - ref) <= RTOL * mag


@HYP
@given(m=st.floats(-1e3, 1e3), v=st.floats(-6.0, 6.0).map(lambda e: 10.0**e))
def test_kl_normal_standard_vs_closed_form(m, v):
    ours = D.kl_normal_standard(m, v)
    ref = kl_closed_form(m, v, 0.0, 1.0)
    assert abs(ours - ref) <= RTOL * (abs(np.log(v)) + v + m**2 + 1.0)
    assert ours == pytest.approx(D.kl_normal(m, v, 0.0, 1.0), rel=1e-14, abs=1e-14)


def test_kl_normal_zero_for_equal_distributions():
    rng = np.random.default_rng(2)
    m = rng.normal(size=100) * 10
    v = random_params(rng, 100, -3, 3)
    np.testing.assert_allclose(D.kl_normal(m, v, m, v), 0.0, atol=1e-14)


def test_logsumexp_vs_scipy():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(5, 4, 3)) * 300
    for axis in (0, 1, 2, -1, (0, 2), None):
        np.testing.assert_allclose(
            D.logsumexp(a, axis=axis), scipy_logsumexp(a, axis=axis), rtol=1e-14, atol=0
        )
    assert D.logsumexp(a).shape == (4, 3)


def test_logsumexp_edge_cases():
    big = np.array([[1e308, 1e308], [-np.inf, -np.inf], [-np.inf, 0.0], [np.inf, 1.0]])
    out = D.logsumexp(big, axis=1)
    assert out[0] == pytest.approx(1e308)
    assert out[1] == -np.inf
    assert out[2] == 0.0
    assert out[3] == np.inf
    assert np.isnan(D.logsumexp(np.array([np.nan, 1.0])))
    out32 = D.logsumexp(np.array([[1000.0, 1000.0]], dtype=np.float32), axis=1)
    assert out32.dtype == np.float32
    assert out32[0] == pytest.approx(1000.0 + np.log(2.0), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# against scvi-tools / torch
# ---------------------------------------------------------------------------------------------


def extreme_batch(seed, shape=(40, 100)):
    rng = np.random.default_rng(seed)
    x = random_counts(rng, shape)
    mu = random_params(rng, shape)
    theta = random_params(rng, shape)
    logit = rng.uniform(-30, 30, size=shape)
    return x, mu, theta, logit


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_nb_zinb_match_scvi(dtype):
    torch = pytest.importorskip("torch")
    pytest.importorskip("scvi")
    from scvi.distributions._negative_binomial import log_nb_positive, log_zinb_positive

    x, mu, theta, logit = (a.astype(dtype) for a in extreme_batch(4))
    mag = nb_magnitude(x, mu, theta)
    rtol = RTOL if dtype == np.float64 else 1e-5
    t = {k: torch.from_numpy(v) for k, v in dict(x=x, mu=mu, theta=theta, pi=logit).items()}

    ours = D.log_nb_positive(x, mu, theta)
    ref = log_nb_positive(t["x"], t["mu"], t["theta"]).numpy()
    assert ours.dtype == dtype == ref.dtype
    assert ours.shape == ref.shape
    np.testing.assert_array_less(np.abs(ours - ref), rtol * mag)

    ours = D.log_zinb_positive(x, mu, theta, logit)
    ref = log_zinb_positive(t["x"], t["mu"], t["theta"], t["pi"]).numpy()
    assert ours.dtype == dtype == ref.dtype
    assert ours.shape == ref.shape
    tol = rtol * (mag + np.abs(logit)) + TORCH_SOFTPLUS_ERR
    np.testing.assert_array_less(np.abs(ours - ref), tol)


def test_zinb_matches_scvi_with_vector_theta():
    torch = pytest.importorskip("torch")
    pytest.importorskip("scvi")
    from scvi.distributions._negative_binomial import log_zinb_positive

    rng = np.random.default_rng(5)
    x = random_counts(rng, (6, 30))
    mu = random_params(rng, (6, 30), -3, 4)
    theta = random_params(rng, 30, -3, 4)
    logit = rng.normal(size=(6, 30)) * 5
    ours = D.log_zinb_positive(x, mu, theta, logit)
    ref = log_zinb_positive(*(torch.from_numpy(a) for a in (x, mu, theta, logit))).numpy()
    tol = RTOL * (nb_magnitude(x, mu, theta) + 5) + TORCH_SOFTPLUS_ERR
    np.testing.assert_array_less(np.abs(ours - ref), tol)


def test_poisson_normal_kl_match_torch():
    torch = pytest.importorskip("torch")
    from torch.distributions import Normal, Poisson, kl_divergence

    rng = np.random.default_rng(6)
    x = random_counts(rng, 3000)
    rate = random_params(rng, 3000)
    ours = D.log_poisson(x, rate)
    ref = Poisson(torch.from_numpy(rate)).log_prob(torch.from_numpy(x)).numpy()
    mag = np.abs(x * np.log(rate)) + rate + gammaln(x + 1) + 1.0
    np.testing.assert_array_less(np.abs(ours - ref), RTOL * mag)

    y = rng.normal(size=3000) * 100
    loc = rng.normal(size=3000) * 100
    scale = random_params(rng, 3000, -3, 3)
    ours = D.log_normal(y, loc, scale)
    ref = Normal(torch.from_numpy(loc), torch.from_numpy(scale)).log_prob(torch.from_numpy(y))
    mag = ((y - loc) / scale) ** 2 + np.abs(np.log(scale)) + 1.0
    np.testing.assert_array_less(np.abs(ours - ref.numpy()), RTOL * mag)

    m1, m2 = rng.normal(size=(2, 3000)) * 10
    v1, v2 = random_params(rng, (2, 3000), -4, 4)
    ours = D.kl_normal(m1, v1, m2, v2)
    p = Normal(torch.from_numpy(m1), torch.from_numpy(np.sqrt(v1)))
    q = Normal(torch.from_numpy(m2), torch.from_numpy(np.sqrt(v2)))
    ref = kl_divergence(p, q).numpy()
    mag = np.abs(np.log(v2 / v1)) + (v1 + (m1 - m2) ** 2) / v2 + 1.0
    np.testing.assert_array_less(np.abs(ours - ref), RTOL * mag)

    ours = D.kl_normal_standard(m1, v1)
    std = Normal(torch.zeros(3000, dtype=torch.float64), torch.ones(3000, dtype=torch.float64))
    ref = kl_divergence(p, std).numpy()
    mag = np.abs(np.log(v1)) + v1 + m1**2 + 1.0
    np.testing.assert_array_less(np.abs(ours - ref), RTOL * mag)


# ---------------------------------------------------------------------------------------------
# per-cell sums and the count constant
# ---------------------------------------------------------------------------------------------

N_CELLS, N_GENES, N_SAMPLES = 9, 40, 3


def sum_problem(seed, theta_shape, sample_axis):
    rng = np.random.default_rng(seed)
    x = random_counts(rng, (N_CELLS, N_GENES)) * (rng.random((N_CELLS, N_GENES)) < 0.3)
    x[2] = 0.0  # an empty cell
    x[-1] = 0.0  # an empty last cell (sparse edge case)
    x[4, :] = np.maximum(x[4, :], 1.0)  # a full cell
    lead = (N_SAMPLES,) if sample_axis else ()
    mu = random_params(rng, lead + (N_CELLS, N_GENES), -4, 5)
    logit = rng.normal(size=lead + (N_CELLS, N_GENES)) * 4
    theta = random_params(rng, theta_shape, -4, 5)
    return x, mu, theta, logit


def as_format(x, fmt):
    if fmt == "dense":
        return x
    if fmt == "csr":
        return sp.csr_matrix(x)
    if fmt == "csr_array":
        return sp.csr_array(x)
    if fmt == "csc":
        return sp.csc_matrix(x)
    raise ValueError(fmt)


def row_tol(terms):
    """Tolerance for a sum over the last axis: relative to the sum of magnitudes."""
    return RTOL * np.sum(terms, axis=-1) + 1e-300


THETA_SHAPES = [(N_GENES,), (N_CELLS, N_GENES)]


@pytest.mark.parametrize("fmt", ["dense", "csr", "csr_array", "csc"])
@pytest.mark.parametrize("theta_shape", THETA_SHAPES + [(N_SAMPLES, 1, N_GENES)])
def test_nb_count_constant(fmt, theta_shape):
    x, _, theta, _ = sum_problem(7, theta_shape, False)
    const = D.nb_count_constant(as_format(x, fmt), theta)
    terms = gammaln(x + theta) - gammaln(theta) - gammaln(x + 1)
    assert const.shape == terms.shape[:-1]
    mag = np.abs(gammaln(x + theta)) + np.abs(gammaln(theta)) + np.abs(gammaln(x + 1))
    np.testing.assert_array_less(np.abs(const - terms.sum(-1)), row_tol(mag))
    assert np.all(const[..., 2] == 0.0)


@pytest.mark.parametrize("fmt", ["dense", "csr"])
@pytest.mark.parametrize("theta_shape", THETA_SHAPES)
@pytest.mark.parametrize("sample_axis", [False, True])
@pytest.mark.parametrize("use_const", [False, True])
def test_log_nb_positive_sum(fmt, theta_shape, sample_axis, use_const):
    x, mu, theta, _ = sum_problem(8, theta_shape, sample_axis)
    xf = as_format(x, fmt)
    const = D.nb_count_constant(xf, theta) if use_const else None
    ours = D.log_nb_positive_sum(xf, mu, theta, const=const)
    ref = D.log_nb_positive(x, mu, theta)
    assert ours.shape == ref.shape[:-1]
    np.testing.assert_array_less(np.abs(ours - ref.sum(-1)), row_tol(nb_magnitude(x, mu, theta)))
    # and, with eps=0, against scipy summed
    ours0 = D.log_nb_positive_sum(xf, mu, theta, const=const, eps=0.0)
    sci = nbinom_scipy(x, mu, theta)
    err = RTOL * nb_magnitude(x, mu, theta) + nbinom_scipy_error(x, mu, theta)
    np.testing.assert_array_less(np.abs(ours0 - sci.sum(-1)), err.sum(-1))


@pytest.mark.parametrize("fmt", ["dense", "csr"])
@pytest.mark.parametrize("theta_shape", THETA_SHAPES)
@pytest.mark.parametrize("sample_axis", [False, True])
@pytest.mark.parametrize("use_const", [False, True])
def test_log_zinb_positive_sum(fmt, theta_shape, sample_axis, use_const):
    x, mu, theta, logit = sum_problem(9, theta_shape, sample_axis)
    xf = as_format(x, fmt)
    const = D.nb_count_constant(xf, theta) if use_const else None
    ours = D.log_zinb_positive_sum(xf, mu, theta, logit, const=const)
    ref = D.log_zinb_positive(x, mu, theta, logit)
    assert ours.shape == ref.shape[:-1]
    mag = nb_magnitude(x, mu, theta) + np.abs(logit)
    np.testing.assert_array_less(np.abs(ours - ref.sum(-1)), row_tol(mag))


@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_sums_with_theta_varying_across_samples(fmt):
    x, mu, theta, logit = sum_problem(10, (N_SAMPLES, N_CELLS, N_GENES), True)
    xf = as_format(x, fmt)
    mag = nb_magnitude(x, mu, theta)
    ours = D.log_nb_positive_sum(xf, mu, theta)
    ref = D.log_nb_positive(x, mu, theta).sum(-1)
    np.testing.assert_array_less(np.abs(ours - ref), row_tol(mag))
    ours = D.log_zinb_positive_sum(xf, mu, theta, logit)
    ref = D.log_zinb_positive(x, mu, theta, logit).sum(-1)
    np.testing.assert_array_less(np.abs(ours - ref), row_tol(mag + np.abs(logit)))


@pytest.mark.parametrize("fmt", ["dense", "csr"])
@pytest.mark.parametrize("use_const", [False, True])
def test_zinb_sum_with_values_below_eps(fmt, use_const):
    """Non-count entries 0 < x <= eps: the NB constant includes them, the ZINB must not."""
    x, mu, theta, logit = sum_problem(11, (N_GENES,), True)
    x[0] = np.arange(N_GENES) % 4  # small counts, so that the row tolerance is small
    x[0, :3] = [LIKELIHOOD_EPS / 2, LIKELIHOOD_EPS, 0.5]
    theta[:3] = 1e-4  # large |digamma(theta)|: the gammaln terms at x <= eps are ~1e-4
    xf = as_format(x, fmt)
    const = D.nb_count_constant(xf, theta) if use_const else None
    ours = D.log_zinb_positive_sum(xf, mu, theta, logit, const=const)
    ref = D.log_zinb_positive(x, mu, theta, logit).sum(-1)
    mag = nb_magnitude(x, mu, theta) + np.abs(logit)
    np.testing.assert_array_less(np.abs(ours - ref), row_tol(mag))
    # the test can see the difference between the two masks
    below = gammaln(x[0, :2] + theta[:2]) - gammaln(theta[:2]) - gammaln(x[0, :2] + 1)
    assert np.all(np.abs(below.sum()) > row_tol(mag)[..., 0])
    ours = D.log_nb_positive_sum(xf, mu, theta, const=const)
    ref = D.log_nb_positive(x, mu, theta).sum(-1)
    np.testing.assert_array_less(np.abs(ours - ref), row_tol(nb_magnitude(x, mu, theta)))


def test_non_canonical_csr_is_summed_not_modified():
    x, mu, theta, logit = sum_problem(12, (N_GENES,), True)
    coo = sp.coo_matrix(x)
    # every stored entry split in two halves: duplicates that add up to x, in reversed order
    rows = np.concatenate([coo.row, coo.row])
    cols = np.concatenate([coo.col, coo.col])
    data = np.concatenate([coo.data / 2, coo.data - coo.data / 2])
    order = np.lexsort((-cols, rows))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=N_CELLS))])
    dup = sp.csr_matrix((data[order], cols[order], indptr), shape=x.shape)
    assert not dup.has_canonical_format
    np.testing.assert_array_equal(dup.toarray(), x)
    data_before, indices_before = dup.data.copy(), dup.indices.copy()
    np.testing.assert_array_equal(
        D.nb_count_constant(dup, theta), D.nb_count_constant(sp.csr_matrix(x), theta)
    )
    ref = D.log_zinb_positive(x, mu, theta, logit).sum(-1)
    ours = D.log_zinb_positive_sum(dup, mu, theta, logit)
    mag = nb_magnitude(x, mu, theta) + np.abs(logit)
    np.testing.assert_array_less(np.abs(ours - ref), row_tol(mag))
    ref = D.log_poisson(x, mu).sum(-1)
    ours = D.log_poisson_sum(dup, mu)
    mag = np.abs(x * np.log(mu)) + mu + gammaln(x + 1) + 1.0
    np.testing.assert_array_less(np.abs(ours - ref), row_tol(mag))
    np.testing.assert_array_equal(dup.data, data_before)
    np.testing.assert_array_equal(dup.indices, indices_before)


def test_explicit_zeros_in_csr():
    x, mu, theta, logit = sum_problem(13, (N_GENES,), False)
    xs = sp.csr_matrix(x)
    xs.data[::3] = 0.0  # stored zeros
    xd = xs.toarray()
    assert xs.nnz > np.count_nonzero(xd)
    const = D.nb_count_constant(xs, theta)
    np.testing.assert_array_equal(const, D.nb_count_constant(xd, theta))
    ours = D.log_zinb_positive_sum(xs, mu, theta, logit, const=const)
    ref = D.log_zinb_positive(xd, mu, theta, logit).sum(-1)
    mag = nb_magnitude(xd, mu, theta) + np.abs(logit)
    np.testing.assert_array_less(np.abs(ours - ref), row_tol(mag))


@pytest.mark.parametrize("fmt", ["dense", "csr"])
@pytest.mark.parametrize("sample_axis", [False, True])
def test_log_poisson_sum(fmt, sample_axis):
    x, rate, _, _ = sum_problem(14, (N_GENES,), sample_axis)
    ours = D.log_poisson_sum(as_format(x, fmt), rate)
    ref = D.log_poisson(x, rate)
    assert ours.shape == ref.shape[:-1]
    mag = np.abs(x * np.log(rate)) + rate + gammaln(x + 1) + 1.0
    np.testing.assert_array_less(np.abs(ours - ref.sum(-1)), row_tol(mag))
    sci = stats.poisson.logpmf(x, rate).sum(-1)
    np.testing.assert_array_less(np.abs(ours - sci), row_tol(mag))


@pytest.mark.parametrize("sample_axis", [False, True])
@pytest.mark.parametrize("scale_shape", [(N_GENES,), (N_CELLS, N_GENES), None])
def test_log_normal_sum(sample_axis, scale_shape):
    rng = np.random.default_rng(15)
    lead = (N_SAMPLES,) if sample_axis else ()
    x = rng.normal(size=(N_CELLS, N_GENES)) * 5
    loc = rng.normal(size=lead + (N_CELLS, N_GENES)) * 5
    scale = random_params(rng, scale_shape or lead + (N_CELLS, N_GENES), -2, 2)
    ours = D.log_normal_sum(x, loc, scale)
    ref = stats.norm.logpdf(x, loc, scale)
    assert ours.shape == ref.shape[:-1]
    mag = ((x - loc) / scale) ** 2 + np.abs(np.log(scale)) + 1.0
    np.testing.assert_array_less(np.abs(ours - ref.sum(-1)), row_tol(mag))
    np.testing.assert_array_less(np.abs(ours - D.log_normal(x, loc, scale).sum(-1)), row_tol(mag))


@HYP
@given(
    data=st.data(),
    n_cells=st.integers(1, 4),
    n_genes=st.integers(1, 6),
    n_samples=st.integers(1, 3),
    sparse=st.booleans(),
)
def test_sums_property(data, n_cells, n_genes, n_samples, sparse):
    shape = (n_cells, n_genes)
    x = np.array(
        data.draw(st.lists(counts, min_size=n_cells * n_genes, max_size=n_cells * n_genes))
    )
    x = x.reshape(shape)
    x[
        np.array(data.draw(st.lists(st.booleans(), min_size=x.size, max_size=x.size))).reshape(
            shape
        )
    ] = 0

    def draw(n):
        return np.array(data.draw(st.lists(log_uniform, min_size=n, max_size=n)))

    mu = draw(n_samples * x.size).reshape((n_samples,) + shape)
    theta = draw(n_genes)
    logit = np.array(data.draw(st.lists(logits, min_size=mu.size, max_size=mu.size)))
    logit = logit.reshape(mu.shape)
    xf = sp.csr_matrix(x) if sparse else x
    const = D.nb_count_constant(xf, theta)
    mag = nb_magnitude(x, mu, theta)

    nb = D.log_nb_positive_sum(xf, mu, theta, const=const)
    assert np.all(np.isfinite(nb))
    np.testing.assert_array_less(np.abs(nb - D.log_nb_positive(x, mu, theta).sum(-1)), row_tol(mag))
    zinb = D.log_zinb_positive_sum(xf, mu, theta, logit, const=const)
    assert np.all(np.isfinite(zinb))
    np.testing.assert_array_less(
        np.abs(zinb - D.log_zinb_positive(x, mu, theta, logit).sum(-1)),
        row_tol(mag + np.abs(logit)),
    )


# ---------------------------------------------------------------------------------------------
# dtypes, shapes, module hygiene
# ---------------------------------------------------------------------------------------------


def test_float32_stays_float32_and_int_counts_do_not_promote():
    rng = np.random.default_rng(16)
    x = rng.poisson(3.0, size=(4, 8))  # int64
    mu = random_params(rng, (2, 4, 8), -1, 2).astype(np.float32)
    theta = random_params(rng, 8, -1, 2).astype(np.float32)
    logit = rng.normal(size=(2, 4, 8)).astype(np.float32)
    f32 = np.float32
    assert D.log_nb_positive(x, mu, theta).dtype == f32
    assert D.log_zinb_positive(x, mu, theta, logit).dtype == f32
    assert D.log_poisson(x, mu).dtype == f32
    assert D.log_normal(x, mu, theta).dtype == f32
    assert D.kl_normal(mu, theta, 0.0, 1.0).dtype == f32
    assert D.kl_normal_standard(mu, theta).dtype == f32
    for xf in (x, sp.csr_matrix(x)):
        const = D.nb_count_constant(xf, theta)
        assert const.dtype == f32
        assert D.log_nb_positive_sum(xf, mu, theta, const=const).dtype == f32
        assert D.log_zinb_positive_sum(xf, mu, theta, logit, const=const).dtype == f32
        assert D.log_poisson_sum(xf, mu).dtype == f32
    assert D.log_normal_sum(x, mu, theta).dtype == f32
    # float32 results agree with the float64 ones to float32 precision
    x64, mu64, th64, lg64 = (np.asarray(a, dtype=np.float64) for a in (x, mu, theta, logit))
    np.testing.assert_allclose(
        D.log_zinb_positive_sum(x, mu, theta, logit),
        D.log_zinb_positive_sum(x64, mu64, th64, lg64),
        rtol=1e-5,
        atol=1e-4,
    )


def test_sum_functions_require_2d_counts():
    with pytest.raises(ValueError, match="2-D"):
        D.log_nb_positive_sum(np.ones(5), np.ones(5), np.ones(5))
    with pytest.raises(ValueError, match="2-D"):
        D.nb_count_constant(np.ones((2, 3, 4)), np.ones(4))


def test_module_does_not_import_torch():
    code = (
        "import sys; import scvi_onnx.distributions; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
