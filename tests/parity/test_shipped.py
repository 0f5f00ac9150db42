"""The shipped bundle against the scvi-tools model it was exported from, on the example query."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest

torch = pytest.importorskip("torch")
scvi = pytest.importorskip("scvi")

import scvi_onnx  # noqa: E402

from ..conftest import EXAMPLE_H5AD, MODELS, SHIPPED_BUNDLE  # noqa: E402
from .test_parity import same_noise  # noqa: E402


@pytest.fixture(scope="module")
def pair():
    om = scvi_onnx.load(SHIPPED_BUNDLE, device="cpu")
    query = ad.read_h5ad(EXAMPLE_H5AD)
    ordered = query[:, list(om.genes)].copy()  # scvi-tools needs the training gene order
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scvi.model.SCVI.setup_anndata(ordered, batch_key="batch")
        ref = scvi.model.SCVI.load(
            str(MODELS / "pbmc_scvi_torch"), adata=ordered, accelerator="cpu"
        )
    return ref, om, query, ordered


def test_latent(pair):
    ref, om, query, ordered = pair
    np.testing.assert_allclose(
        om.get_latent_representation(query), ref.get_latent_representation(ordered), atol=1e-4
    )


def test_elbo_same_noise(pair):
    ref, om, query, ordered = pair
    with same_noise(ref, om, ordered.n_obs, 1):
        want = ref.get_elbo(ordered, batch_size=ordered.n_obs, return_mean=False).numpy()
    np.testing.assert_allclose(om.get_elbo(query, return_mean=False), want, rtol=2e-5, atol=5e-3)


def test_marginal_ll_whole_method(pair):
    ref, om, query, ordered = pair
    runs = [ref.get_marginal_ll(ordered[:64], n_mc_samples=50) for _ in range(3)]
    ours = om.get_marginal_ll(query[:64], n_mc_samples=50)
    spread = max(np.std(runs), 0.05)
    assert abs(ours - np.mean(runs)) < 6 * spread, (ours, runs)
