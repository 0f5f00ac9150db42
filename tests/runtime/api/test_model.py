"""The public model class on the shipped bundle: load, return types, the bound AnnData, a
dataloader as input, the lazy public API."""

from __future__ import annotations

import numpy as np
import pytest

import scvi_onnx
from scvi_onnx.errors import InvalidArgumentError

from ...conftest import SHIPPED_BUNDLE


def test_load_reports_provider_and_repr(model):
    assert model.provider == "CPUExecutionProvider"
    assert "genes=2000" in repr(model)


def test_return_types_and_signs(model, query):
    elbo = model.get_elbo(query)
    rec = model.get_reconstruction_error(query)
    mll = model.get_marginal_ll(query, n_mc_samples=20)
    assert isinstance(elbo, float) and elbo < 0
    assert set(rec) == {"reconstruction_loss"} and rec["reconstruction_loss"] > 0
    assert isinstance(mll, float) and elbo < mll < 0  # the ELBO is a lower bound
    per_cell = model.get_elbo(query, return_mean=False)
    assert per_cell.shape == (query.n_obs,)
    m, v = model.get_latent_representation(query, return_dist=True)
    assert m.shape == v.shape == (query.n_obs, model.n_latent) and (v > 0).all()


def test_bound_adata_is_default(query):
    m = scvi_onnx.load(SHIPPED_BUNDLE, adata=query, device="cpu")
    np.testing.assert_array_equal(m.get_latent_representation(), m.get_latent_representation(query))


def test_dataloader_input_matches_adata(model, query):
    genes = list(model.genes)
    x = query[:, genes].X.toarray()
    codes = (query.obs["batch"] == "pbmc_10k").to_numpy().astype(np.int64)[:, None]
    dl = [{"X": x[i : i + 50], "batch": codes[i : i + 50]} for i in range(0, len(x), 50)]
    np.testing.assert_array_equal(
        model.get_latent_representation(dataloader=dl), model.get_latent_representation(query)
    )
    np.testing.assert_array_equal(
        model.get_elbo(dataloader=dl, return_mean=False),
        model.get_elbo(query, return_mean=False),
    )


def test_no_data_is_a_clear_error(model):
    with pytest.raises(InvalidArgumentError, match="adata"):
        model.get_elbo()


def test_lazy_public_api_is_stable():
    # regression: a lazily imported submodule named like the function shadowed it
    for _ in range(2):
        assert callable(scvi_onnx.verify) and callable(scvi_onnx.load)
    assert scvi_onnx.verify(SHIPPED_BUNDLE).ok
