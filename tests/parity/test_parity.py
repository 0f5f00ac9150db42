"""Parity with scvi-tools 1.4.2 over a matrix of SCVI configurations.

Each configuration (tests/conftest.py: ``SCVI_CONFIGS``) is a tiny model trained on real PBMC
cells, exported, and compared:
- the latent mean and ``return_dist`` within 1e-4 absolute;
- per-cell ELBO, reconstruction error and marginal log-likelihood *exactly* (float32 rounding),
  by feeding scvi-tools the same standard-normal noise the runtime draws (torch's
  ``_standard_normal`` is patched to return our counter-based draws);
- whole-method agreement with scvi-tools' own stochastic run (within its run-to-run spread).
"""

from __future__ import annotations

import numpy as np
import pytest

from ..conftest import SCVI_CONFIGS, require, same_noise

torch = require("torch")
scvi = require("scvi")

import scvi_onnx  # noqa: E402
from scvi_onnx.errors import InvalidArgumentError  # noqa: E402


@pytest.fixture(scope="module", params=sorted(SCVI_CONFIGS))
def trained(request, tiny_models):
    """One tiny SCVI of the matrix (tests/conftest.py: SCVI_CONFIGS), exported, loaded."""
    model, adata = tiny_models.model(request.param)
    onnx_model = scvi_onnx.load(tiny_models.bundle(request.param), device="cpu", seed=123)
    return request.param, model, adata, onnx_model


def test_latent_mean_and_dist(trained):
    name, model, adata, om = trained
    if model.module.latent_distribution == "ln":
        # give_mean=True for "ln" is itself a Monte-Carlo estimate: compare return_dist only
        # here, and the MC mean with a tolerance below.
        pass
    else:
        ref = model.get_latent_representation(adata)
        got = om.get_latent_representation(adata)
        assert got.shape == ref.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    rm, rv = model.get_latent_representation(adata, return_dist=True)
    gm, gv = om.get_latent_representation(adata, return_dist=True)
    np.testing.assert_allclose(gm, rm, atol=1e-4, rtol=0)
    np.testing.assert_allclose(gv, rv, atol=1e-4, rtol=1e-4)


def test_latent_ln_mc_mean(trained):
    name, model, adata, om = trained
    if model.module.latent_distribution != "ln":
        pytest.skip("normal latent: the mean is exact (tested above)")
    ref = model.get_latent_representation(adata)  # scvi-tools: 5,000-draw MC mean
    got = om.get_latent_representation(adata)
    # Both are 5,000-draw Monte-Carlo means of softmax(z): they differ by MC error only
    # (standard error ~0.003 per entry here), not by 1e-4.
    diff = np.abs(got - ref)
    assert diff.max() < 0.02 and diff.mean() < 0.004, (diff.max(), diff.mean())
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)


def test_elbo_and_reconstruction_same_noise(trained):
    name, model, adata, om = trained
    n = adata.n_obs
    with same_noise(model, om, n, 1):
        ref = model.get_elbo(adata, batch_size=n, return_mean=False).numpy()
    got = om.get_elbo(adata, return_mean=False)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-3)
    with same_noise(model, om, n, 1):
        ref_rec = model.get_reconstruction_error(adata, batch_size=n, return_mean=False)
    got_rec = om.get_reconstruction_error(adata, return_mean=False, batch_size=37)
    np.testing.assert_allclose(
        got_rec["reconstruction_loss"],
        ref_rec["reconstruction_loss"].numpy(),
        rtol=2e-5,
        atol=2e-3,
    )


def _marginal_ll_same_noise(model, om, adata, n: int = 64, s: int = 20):
    """``om``'s per-cell marginal LL of the first ``n`` cells equals scvi-tools' under the same
    noise (``s`` samples, 7 per pass); returns it and the cells."""
    sub = adata[:n].copy()
    with same_noise(model, om, n, s):
        ref = model.get_marginal_ll(sub, n_mc_samples=s, batch_size=n, return_mean=False)
    got = om.get_marginal_ll(sub, n_mc_samples=s, return_mean=False, n_mc_samples_per_pass=7)
    np.testing.assert_allclose(got, ref.numpy(), rtol=2e-5, atol=2e-3)
    return got, sub


def test_marginal_ll_same_noise(trained):
    name, model, adata, om = trained
    _marginal_ll_same_noise(model, om, adata)


def test_scoring_graph_same_noise(trained):
    """The scoring graph (decoder + likelihood reduction in ONNX, used on CUDA) gives
    scvi-tools' per-cell ELBO and marginal LL too; run here on the CPU provider."""
    name, model, adata, om = trained
    if "scorer" not in om.manifest.graphs:
        assert om.config.dispersion == "gene-cell", name
        with pytest.raises(InvalidArgumentError, match="no scoring graph"):
            scvi_onnx.load(om.path, device="cpu", scoring="graph")
        return
    gm = scvi_onnx.load(om.path, device="cpu", seed=123, scoring="graph")
    assert gm.module.scores_on_graph and not om.module.scores_on_graph  # "auto" on the CPU: numpy
    n = adata.n_obs
    with same_noise(model, gm, n, 1):
        ref = model.get_elbo(adata, batch_size=n, return_mean=False).numpy()
    np.testing.assert_allclose(gm.get_elbo(adata, return_mean=False), ref, rtol=2e-5, atol=2e-3)
    got, sub = _marginal_ll_same_noise(model, gm, adata)
    host = om.get_marginal_ll(sub, n_mc_samples=20, return_mean=False)
    np.testing.assert_allclose(got, host, rtol=1e-5, atol=1e-3)


def test_stochastic_methods_within_scvi_spread(trained):
    """Whole-method agreement: our mean lies within scvi-tools' own run-to-run spread."""
    name, model, adata, om = trained
    runs = np.array([float(model.get_elbo(adata)) for _ in range(5)])
    ours = om.get_elbo(adata)
    spread = max(runs.std(), 1e-3 * abs(runs.mean()))
    assert abs(ours - runs.mean()) < 5 * spread + 1e-6, (ours, runs)
    rec = np.array(
        [float(model.get_reconstruction_error(adata)["reconstruction_loss"]) for _ in range(5)]
    )
    ours_rec = om.get_reconstruction_error(adata)["reconstruction_loss"]
    spread = max(rec.std(), 1e-3 * abs(rec.mean()))
    assert abs(ours_rec - rec.mean()) < 5 * spread, (ours_rec, rec)
