"""get_marginal_ll's reduction: per cell, log of the mean importance weight (logsumexp over
samples minus log S); the mean over cells as scvi-tools takes it (mean of minibatch means).

Checked against closed forms, then on the shipped bundle against the module's own importance
log-weights: a wrong reduction (e.g. dividing by S instead of subtracting log S) moves every
cell's value far outside [mean_s log w_s, max_s log w_s]."""

from __future__ import annotations

import numpy as np
import pytest

from scvi_onnx.methods.inputs import minibatches
from scvi_onnx.methods.marginal_ll import mean_of_minibatch_means, reduce_log_weights


def _log_mean_exp(log_w: np.ndarray) -> np.ndarray:
    """log(mean_s exp(log_w[s])) per column, shifted by the column max (numpy only)."""
    top = log_w.max(axis=0)
    return top + np.log(np.mean(np.exp(log_w - top), axis=0))


# ---- closed forms ----------------------------------------------------------------------------
def test_reduce_log_weights_is_log_mean_exp():
    rng = np.random.default_rng(0)
    log_w = rng.normal(size=(20, 50)) * 3 - 1500.0  # log p(x) scale: exp() underflows unshifted
    got = reduce_log_weights(log_w)
    assert got.shape == (50,) and got.dtype == np.float64
    np.testing.assert_allclose(got, _log_mean_exp(log_w), rtol=1e-14, atol=0)
    # where exp() does not underflow, the definition itself
    small = rng.normal(size=(7, 30))
    np.testing.assert_allclose(
        reduce_log_weights(small), np.log(np.mean(np.exp(small), axis=0)), rtol=1e-13, atol=1e-14
    )


@pytest.mark.parametrize("n_samples", [1, 2, 20, 1000])
def test_reduce_log_weights_of_equal_weights_is_that_weight(n_samples):
    # the mean of S equal weights is that weight, whatever S: no 1/S nor log S left over
    log_w = np.full((n_samples, 3), [-1234.5, -3.25, 0.0])
    np.testing.assert_allclose(reduce_log_weights(log_w), [-1234.5, -3.25, 0.0], rtol=1e-14)


def test_reduce_log_weights_known_means():
    # weights 1..S: log of their mean (S + 1) / 2; one weight dominating: its value minus log S
    for S in (2, 5, 64):
        log_w = np.log(np.arange(1, S + 1, dtype=np.float64))[:, None]
        assert reduce_log_weights(log_w)[0] == pytest.approx(np.log((S + 1) / 2), rel=1e-14)
        spike = np.full((S, 1), -1e4)
        spike[S // 2] = -10.0
        assert reduce_log_weights(spike)[0] == pytest.approx(-10.0 - np.log(S), rel=1e-14)


def test_mean_of_minibatch_means_is_scvi_tools_mean():
    # scvi-tools averages the per-minibatch means: an uneven last minibatch weighs as a full one
    parts = [np.array([1.0, 2.0, 3.0, 4.0]), np.array([10.0])]
    assert mean_of_minibatch_means(parts) == pytest.approx((2.5 + 10.0) / 2, rel=1e-15)
    assert isinstance(mean_of_minibatch_means(parts), float)
    assert mean_of_minibatch_means([np.arange(6.0)]) == pytest.approx(2.5, rel=1e-15)


# ---- on the shipped bundle ---------------------------------------------------------------------
def _module_log_weights(model, adata, seed: int, n_samples: int) -> np.ndarray:
    """The module's importance log-weights (samples, cells) of all of ``adata``'s cells."""
    module = model.module
    (mb,) = minibatches(model.manifest, adata, None, adata.n_obs, None, needs=module.needs)
    enc = module.encode(mb)
    return module.log_weights(mb, enc, module.prepare(mb), seed, 0, n_samples)


def test_marginal_ll_reduces_the_modules_log_weights(model, query):
    sub = query[:40]
    S = 25
    log_w = _module_log_weights(model, sub, seed=4, n_samples=S)
    assert log_w.shape == (S, 40)
    got = model.get_marginal_ll(sub, n_mc_samples=S, seed=4, return_mean=False)
    np.testing.assert_allclose(got, _log_mean_exp(log_w), rtol=1e-12, atol=0)
    # Jensen: between the mean log-weight (an ELBO estimate) and the largest log-weight
    assert (log_w.mean(0) <= got + 1e-9).all() and (got <= log_w.max(0) + 1e-9).all()
    # and in samples per pass of any size: the same weights, the same reduction
    chunked = model.get_marginal_ll(
        sub, n_mc_samples=S, seed=4, return_mean=False, n_mc_samples_per_pass=4
    )
    np.testing.assert_allclose(chunked, got, rtol=1e-12)


def test_one_sample_marginal_ll_is_the_single_log_weight(model, query):
    sub = query[:40]
    log_w = _module_log_weights(model, sub, seed=9, n_samples=1)
    got = model.get_marginal_ll(sub, n_mc_samples=1, seed=9, return_mean=False)
    np.testing.assert_allclose(got, log_w[0], rtol=1e-13)


def test_marginal_ll_mean_is_mean_of_minibatch_means(model, query):
    per_cell = model.get_marginal_ll(query, n_mc_samples=10, return_mean=False)
    mean = model.get_marginal_ll(query, n_mc_samples=10, batch_size=128)
    assert mean == pytest.approx(np.mean([per_cell[:128].mean(), per_cell[128:].mean()]))
