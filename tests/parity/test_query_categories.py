"""Parity with scvi-tools on query data whose categorical columns differ from training.

A query rarely holds every training category, nor in the training order, nor with the same
dtype. The runtime maps each cell's category by *name* to its training code; scvi-tools does the
same when it transfers a trained model's registry to a new AnnData (``_validate_anndata``, what
every method runs on an AnnData it has not seen). Compared here, for tiny models with a batch
(2 or 12 categories), categorical covariates, a learned library (whose prior is looked up by
batch) and SCANVI's extra draws:

- ``subset``: cells of some training batches only, each categorical column holding only the
  categories present, in reverse order, rows shuffled;
- ``reordered``: every cell, rows shuffled, each categorical column a ``Categorical`` with the
  training categories in reverse order;
- ``strings``: every cell, rows shuffled, each categorical column plain ``str`` objects.

Latent mean and variance within 1e-4; per-cell ELBO and marginal LL under the same noise at
the parity tolerances (the runtime keys a cell's noise by its row in the query: scvi-tools gets
the draws of rows 0..n-1, in one minibatch).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from ..conftest import require, same_noise

torch = require("torch")
scvi = require("scvi")

import anndata as ad  # noqa: E402

import scvi_onnx  # noqa: E402

#: Models (tests/conftest.py) -> the training batches of the ``subset`` query.
MODELS = {
    # 12 batches; learned library (prior per batch); gene-batch dispersion; a continuous cov
    "nb-many-batches-learnedlib-decoderbn": ["b10", "b3", "b7"],
    # 2 batches; categorical covariates (donor: 4 categories; single: 1), encoded
    "zinb-genecell-covariates-encoded": ["pbmc_10k"],
    # SCANVI: batch, a categorical covariate, learned library, z2 draws per label
    "scanvi-nb-covariates-learnedlib-2layers": ["pbmc_10k"],
}
QUERIES = ("subset", "reordered", "strings")
SEED = 11


def _categorical_keys(model) -> list[str]:
    """The obs columns of the model's categorical fields but the labels: batch, covariates."""
    args = model.adata_manager.registry["setup_args"]
    keys = [args.get("batch_key")] + list(args.get("categorical_covariate_keys") or [])
    return [k for k in keys if k is not None]


def _fresh(adata, rows: np.ndarray) -> ad.AnnData:
    """A new AnnData (not registered with scvi-tools) of ``rows``: the user's obs columns only."""
    obs = adata.obs[[c for c in adata.obs.columns if not c.startswith("_scvi")]]
    return ad.AnnData(
        X=adata.X[rows].copy(),
        obs=obs.iloc[rows].copy(),
        var=adata.var.copy(),
        layers={k: v[rows].copy() for k, v in adata.layers.items()},
    )


def _query(model, adata, kind: str, batches: list[str]) -> ad.AnnData:
    keys = _categorical_keys(model)
    batch_key = keys[0]
    rows = np.arange(adata.n_obs)
    if kind == "subset":
        rows = rows[adata.obs[batch_key].astype(str).isin(batches).to_numpy()]
    rows = np.random.default_rng(5).permutation(rows)
    q = _fresh(adata, rows)
    for key in keys:
        values = q.obs[key].astype(str)
        if kind == "strings":
            q.obs[key] = values.to_numpy().astype(object)
        else:
            training = [str(c) for c in _training_categories(model, key)]
            present = [c for c in training if c in set(values)]
            order = present if kind == "subset" else training
            q.obs[key] = pd.Categorical(values, categories=order[::-1])
    if kind == "subset":
        assert set(q.obs[batch_key].astype(str)) == set(batches)
        assert list(q.obs[batch_key].cat.categories) == sorted(
            batches, key=lambda b: -_training_categories(model, batch_key).index(b)
        )
    return q


def _training_categories(model, key: str) -> list:
    manager = model.adata_manager
    args = manager.registry["setup_args"]
    if key == args.get("batch_key"):
        return list(manager.get_state_registry("batch").categorical_mapping)
    covs = manager.get_state_registry("extra_categorical_covs")
    return list(covs.mappings[key])


def _covariate_keys(model) -> list[str]:
    return list(model.adata_manager.registry["setup_args"].get("categorical_covariate_keys") or [])


def _transfer(model, r) -> None:
    """Set ``r`` up as scvi-tools sets up any new AnnData: the trained registry transferred."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model._validate_anndata(r)


def _codes(model, r, key: str) -> np.ndarray:
    """scvi-tools' codes of column ``key`` in the transferred AnnData ``r``."""
    manager = model.get_anndata_manager(r)
    if key in _covariate_keys(model):
        return manager.get_from_registry("extra_categorical_covs")[key].to_numpy()
    return manager.get_from_registry("batch").reshape(-1)


def _scvi_query(model, q):
    """``q`` for scvi-tools: a copy, its categorical covariates as plain strings, the trained
    registry transferred (categories mapped by name to the training codes, checked here).

    Strings, because scvi-tools 1.4.2 (pandas 2) keeps the query's own codes for a categorical
    covariate column whose categories are the training ones in another order (the cast to the
    training dtype is a no-op for pandas: unordered dtypes with the same categories compare
    equal): see ``test_scvi_tools_keeps_codes_of_reordered_covariate_categories``. The batch
    column is passed as it is (scvi-tools maps it by name).
    """
    r = q.copy()
    for key in _covariate_keys(model):
        r.obs[key] = r.obs[key].astype(str).to_numpy().astype(object)
    _transfer(model, r)
    for key in _categorical_keys(model):
        cats = [str(c) for c in _training_categories(model, key)]
        want = [cats.index(v) for v in q.obs[key].astype(str)]
        np.testing.assert_array_equal(_codes(model, r, key), want, err_msg=key)
    return r


@pytest.fixture(scope="module", params=sorted(MODELS))
def pair(request, tiny_models):
    model, adata = tiny_models.model(request.param)
    om = scvi_onnx.load(tiny_models.bundle(request.param), device="cpu", seed=SEED)
    return request.param, model, adata, om


@pytest.mark.parametrize("kind", QUERIES)
def test_latent(pair, kind):
    name, model, adata, om = pair
    q = _query(model, adata, kind, MODELS[name])
    ref = _scvi_query(model, q)
    rm, rv = model.get_latent_representation(ref, return_dist=True)
    gm, gv = om.get_latent_representation(q, return_dist=True)
    np.testing.assert_allclose(gm, rm, atol=1e-4, rtol=0)
    np.testing.assert_allclose(gv, rv, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", QUERIES)
def test_elbo_same_noise(pair, kind):
    name, model, adata, om = pair
    q = _query(model, adata, kind, MODELS[name])
    ref = _scvi_query(model, q)
    n = q.n_obs
    with same_noise(model, om, n, 1):
        want = model.get_elbo(ref, batch_size=n, return_mean=False).numpy()
    np.testing.assert_allclose(om.get_elbo(q, return_mean=False), want, rtol=2e-5, atol=2e-3)


@pytest.mark.parametrize("kind", ["subset", "strings"])
def test_marginal_ll_same_noise(pair, kind):
    name, model, adata, om = pair
    q = _query(model, adata, kind, MODELS[name])[:48].copy()
    ref = _scvi_query(model, q)
    n, s = q.n_obs, 6
    with same_noise(model, om, n, s):
        want = model.get_marginal_ll(ref, n_mc_samples=s, batch_size=n, return_mean=False)
    got = om.get_marginal_ll(q, n_mc_samples=s, return_mean=False)
    np.testing.assert_allclose(got, want.numpy(), rtol=2e-5, atol=2e-3)


def test_codes_would_be_wrong(pair):
    """The queries do test the mapping: their own category codes differ from the training
    codes (a runtime that took ``.cat.codes`` would score other batches)."""
    name, model, adata, _ = pair
    key = _categorical_keys(model)[0]
    q = _query(model, adata, "subset", MODELS[name])
    cats = _training_categories(model, key)
    training_codes = np.array([cats.index(b) for b in q.obs[key].astype(str)])
    assert not np.array_equal(q.obs[key].cat.codes.to_numpy(), training_codes)


def test_scvi_tools_keeps_codes_of_reordered_covariate_categories(tiny_models):
    """Why ``_scvi_query`` hands scvi-tools its categorical covariates as strings: given a
    ``Categorical`` with the training categories in another order, scvi-tools 1.4.2 keeps the
    query's own codes, scoring cells under other covariate values (the runtime maps names).
    If this fails, scvi-tools maps them by name now: the strings in _scvi_query can go."""
    name = "zinb-genecell-covariates-encoded"
    model, adata = tiny_models.model(name)
    keys = _covariate_keys(model)
    q = _query(model, adata, "reordered", MODELS[name])
    r = q.copy()
    _transfer(model, r)
    key = keys[0]
    cats = [str(c) for c in _training_categories(model, key)]
    by_name = np.array([cats.index(v) for v in q.obs[key].astype(str)])
    np.testing.assert_array_equal(_codes(model, r, key), q.obs[key].cat.codes.to_numpy())
    assert not np.array_equal(_codes(model, r, key), by_name)
