"""The fast minibatch scorer equals the float64 reference formulas of scvi_onnx.distributions,
with the compiled NB / ZINB kernel (where the install built it) and with numpy's: every test of
this module runs with both."""

from __future__ import annotations

import numpy as np
import pytest

from scvi_onnx.data.entries import Entries
from scvi_onnx.maths import distributions as D
from scvi_onnx.maths.likelihood import MinibatchScorer, count_constant, lgamma_table

from ...conftest import require

#: every test of the module with both kernels (tests/runtime/conftest.py)
pytestmark = pytest.mark.usefixtures("kernel")


def E(x):
    """The non-zero entries of a dense minibatch, as the data layer gives them."""
    return Entries.from_dense(np.ascontiguousarray(x, dtype=np.float32))


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
        const = count_constant(E(x), theta, table, likelihood=lik)
    scorer = MinibatchScorer(lik, x, E(x), theta if fixed else None, const)
    got = scorer.score(mu, pi if lik == "zinb" else None, None if fixed else theta)
    want = reference(lik, x, mu, theta, pi)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-3)


def test_poisson(data):
    _, x, mu, _ = data
    got = MinibatchScorer("poisson", x, E(x), None, None).score(mu)
    np.testing.assert_allclose(got, reference("poisson", x, mu, mu, None), rtol=1e-6, atol=1e-3)


def test_count_constant_table_paths(data):
    rng, x, _, _ = data
    thetas = (rng.gamma(1, 2, (4, G)) + 0.01).astype(np.float32)
    codes = rng.integers(0, 4, N)
    per_cell = thetas[codes]
    plain = count_constant(E(x), per_cell)
    np.testing.assert_allclose(
        count_constant(E(x), per_cell, lgamma_table(thetas), codes), plain, rtol=1e-12, atol=1e-9
    )
    from scipy.special import gammaln

    x64, t64 = x.astype(np.float64), per_cell.astype(np.float64)
    ref = np.where(x64 > 0, gammaln(x64 + t64) - gammaln(t64) - gammaln(x64 + 1), 0).sum(1)
    np.testing.assert_allclose(plain, ref, rtol=1e-12, atol=1e-9)


def test_cell_sum_independent_of_other_rows(data):
    rng, x, mu, pi = data
    theta = (rng.gamma(1, 2, G) + 0.01).astype(np.float32)
    table = lgamma_table(theta)
    full = MinibatchScorer("zinb", x, E(x), theta, count_constant(E(x), theta, table)).score(mu, pi)
    rows = np.array([5, 1, 40])
    part = MinibatchScorer(
        "zinb", x[rows], E(x[rows]), theta, count_constant(E(x[rows]), theta, table)
    ).score(mu[:, rows], pi[:, rows])
    assert np.array_equal(part, full[:, rows])


@pytest.mark.parametrize("low", [-60.0, -200.0])
def test_zinb_extreme_logits_take_a_safe_path(data, low):
    """Dropout logits far below zero (exp(-pi) would overflow float32) stay exact and finite."""
    rng, x, mu, pi = data
    pi = pi.copy()
    pi[:, 3, :50] = low
    pi[:, 4, :50] = 60.0
    theta = (rng.gamma(1, 2, G) + 0.01).astype(np.float32)
    scorer = MinibatchScorer("zinb", x, E(x), theta, count_constant(E(x), theta))
    got = scorer.score(mu, pi)
    want = reference("zinb", x, mu, theta, pi)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-3)


def test_counts_below_eps_follow_scvi_masks():
    """Counts in (0, eps]: NB applies its lgamma terms (no mask), ZINB does not (x > eps)."""
    from scipy.special import gammaln

    from scvi_onnx.bundle import LIKELIHOOD_EPS

    rng = np.random.default_rng(11)
    x = rng.poisson(2.0, (4, 30)).astype(np.float32)
    x[0, :3] = [LIKELIHOOD_EPS / 2, LIKELIHOOD_EPS, 0.5]
    theta = (rng.gamma(1, 2, 30) + 0.01).astype(np.float32)
    theta[:3] = 1e-6  # |digamma(theta)| ~ 1e6: the lgamma terms at x <= eps are ~1e-2
    x64, t64 = x.astype(np.float64), theta.astype(np.float64)
    terms = gammaln(x64 + t64) - gammaln(t64) - gammaln(x64 + 1)
    nb = count_constant(E(x), theta, likelihood="nb")
    zinb = count_constant(E(x), theta, likelihood="zinb")
    np.testing.assert_allclose(nb, terms.sum(1), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        zinb, np.where(x64 > LIKELIHOOD_EPS, terms, 0).sum(1), rtol=1e-12, atol=1e-12
    )
    assert abs(nb[0] - zinb[0]) > 1e-3  # the test sees the two masks apart
    mu = (rng.gamma(0.5, 3, (2, 4, 30)) + 1e-3).astype(np.float32)
    pi = rng.normal(0, 2, (2, 4, 30)).astype(np.float32)
    for lik, const in (("nb", nb), ("zinb", zinb)):
        got = MinibatchScorer(lik, x, E(x), theta, const).score(mu, pi if lik == "zinb" else None)
        np.testing.assert_allclose(got, reference(lik, x, mu, theta, pi), rtol=1e-6, atol=1e-4)


hypothesis = require("hypothesis")
st = hypothesis.strategies


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(
    data=st.data(),
    n_cells=st.integers(1, 5),
    n_genes=st.integers(1, 40),
    n_samples=st.integers(1, 3),
    lik=st.sampled_from(["nb", "zinb", "poisson", "normal"]),
)
def test_scorer_property(data, n_cells, n_genes, n_samples, lik):
    """float32 kernel vs the float64 reference over wide parameters: finite and close."""
    seed = data.draw(st.integers(0, 2**32 - 1))
    log_lo = data.draw(st.floats(-6, 0))
    log_hi = data.draw(st.floats(0, 6))
    rng = np.random.default_rng(seed)
    shape = (n_cells, n_genes)
    x = np.floor(10 ** rng.uniform(0, data.draw(st.floats(0, 6)), shape)).astype(np.float32)
    x[rng.random(shape) < 0.5] = 0.0
    mu = (10 ** rng.uniform(log_lo, log_hi, (n_samples,) + shape)).astype(np.float32)
    theta = (10 ** rng.uniform(log_lo, log_hi, n_genes)).astype(np.float32)
    pi = rng.uniform(-30, 30, mu.shape).astype(np.float32)
    const = None
    if lik in ("nb", "zinb"):
        const = count_constant(E(x), theta, lgamma_table(theta), likelihood=lik)
    fixed = None if lik == "poisson" else theta
    got = MinibatchScorer(lik, x, E(x), fixed, const).score(mu, pi if lik == "zinb" else None)
    want = reference(lik, x, mu, theta, pi)
    assert np.isfinite(got).all()
    # float32 elementwise work: relative to the sum of the terms' magnitudes
    x64, mu64, t64 = (a.astype(np.float64) for a in (x, mu, theta))
    mag = (
        np.abs(x64 * np.log(mu64 + 1e-8))
        + mu64
        + np.abs(t64 * np.log(t64 + 1e-8))
        + x64 * np.abs(np.log(t64 + mu64 + 1e-8))
        + np.abs(pi)
        + 1.0
    ).sum(-1)
    np.testing.assert_array_less(np.abs(got - want), 1e-5 * mag + 1e-6 * np.abs(want))
