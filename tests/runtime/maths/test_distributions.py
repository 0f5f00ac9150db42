"""scvi_onnx.maths.distributions against scipy.stats, closed forms and scvi-tools' torch code."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, stats
from scipy.special import gammaln, log_expit, rel_entr
from scipy.special import logsumexp as scipy_logsumexp

from scvi_onnx.bundle import LIKELIHOOD_EPS
from scvi_onnx.maths import distributions as D

from ...conftest import require

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


def _kl_by_quadrature(m1, v1, m2, v2):
    """KL(N(m1, v1) || N(m2, v2)) as the integral of p log(p / q) (scipy.integrate.quad): no
    closed form shared with the code under test."""
    s1, s2 = np.sqrt(v1), np.sqrt(v2)

    def integrand(x):
        return stats.norm.pdf(x, m1, s1) * (
            stats.norm.logpdf(x, m1, s1) - stats.norm.logpdf(x, m2, s2)
        )

    value, _ = integrate.quad(integrand, m1 - 40 * s1, m1 + 40 * s1, points=[m1], limit=200)
    return value


@pytest.mark.parametrize(
    ("m1", "v1", "m2", "v2"),
    [
        (0.0, 1.0, 0.0, 1.0),
        (1.5, 0.2, 0.0, 1.0),
        (-3.0, 4.0, 0.0, 1.0),
        (0.3, 1e-3, 0.0, 1.0),
        (2.0, 0.5, -1.0, 3.0),
        (-0.7, 2.5, 0.4, 0.1),
        (10.0, 0.05, 9.0, 0.2),
    ],
)
def test_kl_normal_vs_quadrature(m1, v1, m2, v2):
    ref = _kl_by_quadrature(m1, v1, m2, v2)
    assert D.kl_normal(m1, v1, m2, v2) == pytest.approx(ref, rel=1e-8, abs=1e-10)
    if (m2, v2) == (0.0, 1.0):
        assert D.kl_normal_standard(m1, v1) == pytest.approx(ref, rel=1e-8, abs=1e-10)


def test_kl_normal_standard_sums_over_the_latent_as_the_elbo_does():
    """Per cell, the ELBO's KL is the sum over latent dimensions of the elementwise KL:
    0.5 * sum(v + m^2 - 1 - log v) (the VAE paper's closed form)."""
    rng = np.random.default_rng(8)
    m = rng.normal(size=(30, 10)) * 2
    v = random_params(rng, (30, 10), -3, 1)
    got = D.kl_normal_standard(m, v).sum(-1)
    want = 0.5 * (v + m**2 - 1.0 - np.log(v)).sum(-1)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    m32, v32 = m.astype(np.float32), v.astype(np.float32)
    assert D.kl_normal_standard(m32, v32).dtype == np.float32


def _random_probs(rng, shape):
    p = rng.gamma(0.7, 1.0, size=shape) + 1e-3
    return p / p.sum(-1, keepdims=True)


def test_kl_categorical_vs_scipy():
    rng = np.random.default_rng(9)
    p = _random_probs(rng, (200, 6))
    q = _random_probs(rng, (6,))
    want = stats.entropy(p, np.broadcast_to(q, p.shape), axis=-1)
    np.testing.assert_allclose(D.kl_categorical(p, q), want, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(D.kl_categorical(p, q), rel_entr(p, q).sum(-1), rtol=1e-12)
    # unnormalised weights are normalised first, as torch's Categorical(probs=...) does
    np.testing.assert_allclose(D.kl_categorical(3.0 * p, 0.5 * q), want, rtol=1e-12, atol=1e-14)
    # leading axes (samples, cells) broadcast against one prior
    p3 = _random_probs(rng, (4, 5, 6))
    want3 = rel_entr(p3, q).sum(-1)
    np.testing.assert_allclose(D.kl_categorical(p3, q), want3, rtol=1e-12, atol=1e-14)
    assert D.kl_categorical(p3, q).shape == (4, 5)


def test_kl_categorical_edge_cases():
    q = np.array([0.25, 0.25, 0.5])
    # equal distributions: 0; non-negative otherwise
    assert D.kl_categorical(q, q) == pytest.approx(0.0, abs=1e-15)
    rng = np.random.default_rng(10)
    assert (D.kl_categorical(_random_probs(rng, (100, 3)), q) >= -1e-15).all()
    # a zero probability contributes 0 (0 log 0 = 0), as scipy's rel_entr
    p = np.array([0.0, 0.5, 0.5])
    assert D.kl_categorical(p, q) == pytest.approx(rel_entr(p, q).sum(), rel=1e-12)
    # a class the prior rules out but probs allows: infinite, as scipy and torch
    assert D.kl_categorical(np.array([0.2, 0.3, 0.5]), np.array([0.0, 0.5, 0.5])) == np.inf
    # a point mass: -log q of its class
    assert D.kl_categorical(np.array([0.0, 0.0, 1.0]), q) == pytest.approx(-np.log(0.5), rel=1e-6)


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
    torch = require("torch")
    require("scvi")
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
    torch = require("torch")
    require("scvi")
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
    torch = require("torch")
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


def test_kl_categorical_matches_torch():
    """torch's ``kl_divergence`` of two ``Categorical(probs=...)``: in float64 where no
    probability is clamped; in float32 (SCANVI's dtype, whose eps the runtime clamps with)
    also for tiny and near-one probabilities."""
    torch = require("torch")
    from torch.distributions import Categorical, kl_divergence

    rng = np.random.default_rng(11)
    p = _random_probs(rng, (300, 5))
    p[:40, 0] = 1e-12  # below float32 eps: clamped
    p[40:60] = [1.0 - 4e-9, 1e-9, 1e-9, 1e-9, 1e-9]  # near one: clamped
    p /= p.sum(-1, keepdims=True)
    q = _random_probs(rng, (5,))
    ours = D.kl_categorical(p, q)

    def torch_kl(dtype):
        def cat(a):
            return Categorical(probs=torch.tensor(np.broadcast_to(a, p.shape), dtype=dtype))

        return kl_divergence(cat(p), cat(q)).double().numpy()

    np.testing.assert_allclose(ours[60:], torch_kl(torch.float64)[60:], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(ours, torch_kl(torch.float32), rtol=1e-6, atol=5e-7)


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


def test_module_does_not_import_torch():
    code = (
        "import sys; import scvi_onnx.maths.distributions; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
