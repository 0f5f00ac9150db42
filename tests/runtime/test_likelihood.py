"""The fast minibatch scorer equals the float64 reference formulas of scvi_onnx.distributions."""

from __future__ import annotations

import numpy as np
import pytest

from scvi_onnx import distributions as D
from scvi_onnx.likelihood import MinibatchScorer, count_constant, lgamma_table

N, G, S = 70, 300, 3


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.poisson(rng.gamma(0.3, 2, (N, G))).astype(np.float32)
    x[0, :5] = 1000.0  # beyond the lgamma table
    x[1, :3] = 2.5  # non-integer counts
    x[2] = 0.0  # an empty cell
    mu = (rng.gamma(0.5, 3, (S, N, G)) + 1e-9).astype(np.float32)
    pi = rng.normal(0, 3, (S, N, G)).astype(np.float32)
    return rng, x, mu, pi


def reference(lik, x, mu, theta, pi):
    x, mu, theta = (np.asarray(v, np.float64) for v in (x, mu, theta))
    if lik == "zinb":
        return D.log_zinb_positive(x, mu, theta, pi.astype(np.float64)).sum(-1)
    if lik == "nb":
        return D.log_nb_positive(x, mu, theta).sum(-1)
    if lik == "poisson":
        return D.log_poisson(x, mu).sum(-1)
    return D.log_normal(x, mu, theta).sum(-1)


@pytest.mark.parametrize("lik", ["zinb", "nb", "normal"])
@pytest.mark.parametrize("theta_shape", ["gene", "cell", "sample"])
def test_scorer_equals_reference(data, lik, theta_shape):
    rng, x, mu, pi = data
    shape = {"gene": (G,), "cell": (N, G), "sample": (S, N, G)}[theta_shape]
    theta = (rng.gamma(1, 2, shape) + 0.01).astype(np.float32)
    fixed = theta_shape != "sample"
    const = None
    if lik != "normal" and fixed:
        table = lgamma_table(theta) if theta_shape == "gene" else None
        const = count_constant(x, theta, table)
    scorer = MinibatchScorer(lik, x, theta if fixed else None, const)
    got = scorer.score(mu, pi if lik == "zinb" else None, None if fixed else theta)
    want = reference(lik, x, mu, theta, pi)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-3)


def test_poisson(data):
    _, x, mu, _ = data
    got = MinibatchScorer("poisson", x, None, None).score(mu)
    np.testing.assert_allclose(got, reference("poisson", x, mu, mu, None), rtol=1e-6, atol=1e-3)


def test_count_constant_table_paths(data):
    rng, x, _, _ = data
    thetas = (rng.gamma(1, 2, (4, G)) + 0.01).astype(np.float32)
    codes = rng.integers(0, 4, N)
    per_cell = thetas[codes]
    plain = count_constant(x, per_cell)
    np.testing.assert_allclose(
        count_constant(x, per_cell, lgamma_table(thetas), codes), plain, rtol=1e-12, atol=1e-9
    )
    from scipy.special import gammaln

    x64, t64 = x.astype(np.float64), per_cell.astype(np.float64)
    ref = np.where(x64 > 0, gammaln(x64 + t64) - gammaln(t64) - gammaln(x64 + 1), 0).sum(1)
    np.testing.assert_allclose(plain, ref, rtol=1e-12, atol=1e-9)


def test_cell_sum_independent_of_other_rows(data):
    rng, x, mu, pi = data
    theta = (rng.gamma(1, 2, G) + 0.01).astype(np.float32)
    table = lgamma_table(theta)
    full = MinibatchScorer("zinb", x, theta, count_constant(x, theta, table)).score(mu, pi)
    rows = np.array([5, 1, 40])
    part = MinibatchScorer("zinb", x[rows], theta, count_constant(x[rows], theta, table)).score(
        mu[:, rows], pi[:, rows]
    )
    assert np.array_equal(part, full[:, rows])


@pytest.mark.parametrize("low", [-60.0, -200.0])
def test_zinb_extreme_logits_take_a_safe_path(data, low):
    """Dropout logits far below zero (exp(-pi) would overflow float32) stay exact and finite."""
    rng, x, mu, pi = data
    pi = pi.copy()
    pi[:, 3, :50] = low
    pi[:, 4, :50] = 60.0
    theta = (rng.gamma(1, 2, G) + 0.01).astype(np.float32)
    scorer = MinibatchScorer("zinb", x, theta, count_constant(x, theta))
    got = scorer.score(mu, pi)
    want = reference("zinb", x, mu, theta, pi)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-3)
