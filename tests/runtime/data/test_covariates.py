"""Covariates: a tiny model with a batch, a categorical and a continuous covariate scores good
data as scvi-tools does, and refuses covariate columns of the wrong kind (API and CLI).

Needs torch, scvi-tools and onnx to make the model (skipped in the torch-free run)."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest

import scvi_onnx
from scvi_onnx.errors import InvalidValuesError, MissingColumnError, UnknownCategoryError

from ...conftest import TRAIN_H5AD, fit, require, same_noise
from ..helpers import CPU, assert_refused, cli, raises, scoring_methods


@pytest.fixture(scope="session")
def cov_bundle(tmp_path_factory):
    """A 1-epoch SCVI on 100 genes with batch, a categorical and a continuous covariate:
    (bundle path, 60 of its cells, the scvi-tools model)."""
    scvi = require("scvi")
    require("onnx")
    from scvi_onnx.exporter import export_model

    a = ad.read_h5ad(TRAIN_H5AD)
    top = np.argsort(-np.asarray(a.X.sum(0)).ravel(), kind="stable")[:100]
    a = a[:, np.sort(top)].copy()
    a = a[np.asarray(a.X.sum(1)).ravel() > 0].copy()
    rng = np.random.default_rng(0)
    a.obs["pct"] = rng.normal(size=a.n_obs).astype(np.float32)
    a.obs["donor"] = np.array(["d1", "d2", "d3"])[rng.integers(0, 3, a.n_obs)]
    scvi.model.SCVI.setup_anndata(
        a,
        batch_key="batch",
        categorical_covariate_keys=["donor"],
        continuous_covariate_keys=["pct"],
    )
    scvi.settings.seed = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = fit(scvi.model.SCVI(a, n_hidden=16, n_latent=4), 1)
    path = export_model(m, tmp_path_factory.mktemp("cov") / "bundle")
    return path, a[:60].copy(), m


def _cov_pct_strings(a):
    a.obs["pct"] = [f"{v:.2f}" for v in a.obs["pct"]]
    return InvalidValuesError, ["'pct'", "must be numeric", "astype(float)"]


def _cov_pct_nan(a):
    a.obs["pct"] = a.obs["pct"].astype(np.float64)
    a.obs.iloc[8, a.obs.columns.get_loc("pct")] = np.nan
    return InvalidValuesError, ["'pct'", "NaN", repr(a.obs_names[8])]


def _cov_pct_missing(a):
    del a.obs["pct"]
    return MissingColumnError, ["no column 'pct'", "continuous_covariate_keys"]


def _cov_donor_codes(a):
    a.obs["donor"] = np.arange(a.n_obs) % 3
    return UnknownCategoryError, ["'donor'", "never seen in training", "'d1', 'd2', 'd3'"]


def _cov_donor_unseen(a):
    a.obs["donor"] = a.obs["donor"].astype(str)
    a.obs.iloc[2, a.obs.columns.get_loc("donor")] = "d9"
    return UnknownCategoryError, ["'donor'", "'d9'", "1 cell"]


def _cov_donor_missing(a):
    del a.obs["donor"]
    return MissingColumnError, ["no column 'donor'", "categorical_covariate_keys"]


COV_CASES = {
    "pct-strings": _cov_pct_strings,
    "pct-nan": _cov_pct_nan,
    "pct-missing": _cov_pct_missing,
    "donor-int-codes": _cov_donor_codes,
    "donor-unseen": _cov_donor_unseen,
    "donor-missing": _cov_donor_missing,
}


def test_covariate_model_scores_good_data(capsys, out_dir, cov_bundle):
    path, adata, ref = cov_bundle
    m = scvi_onnx.load(path, device="cpu")
    assert m.manifest.registry.continuous_covariates == ("pct",)
    # scvi-tools' numbers (latent mean; per-cell ELBO under the same noise)
    z = m.get_latent_representation(adata)
    np.testing.assert_allclose(z, ref.get_latent_representation(adata.copy()), atol=1e-4, rtol=0)
    with same_noise(ref, m, adata.n_obs, 1):
        want = ref.get_elbo(adata.copy(), batch_size=adata.n_obs, return_mean=False).numpy()
    np.testing.assert_allclose(m.get_elbo(adata, return_mean=False), want, rtol=2e-5, atol=2e-3)
    # the covariates are used: changing them changes the numbers
    moved = adata.copy()
    moved.obs["pct"] = moved.obs["pct"] + 3.0
    assert not np.array_equal(
        m.get_elbo(moved, return_mean=False), m.get_elbo(adata, return_mean=False)
    )
    f = out_dir.parent / "cov_good.h5ad"
    adata.write_h5ad(f)
    code, _, err = cli(capsys, "latent", path, f, "-o", out_dir / "z.npy", *CPU)
    assert code == 0, err
    np.testing.assert_array_equal(np.load(out_dir / "z.npy"), z)


@pytest.mark.parametrize("case", list(COV_CASES))
def test_covariate_columns_of_the_wrong_kind(capsys, out_dir, cov_bundle, case):
    path, adata, _ = cov_bundle
    a = adata.copy()
    exc_type, needles = COV_CASES[case](a)
    m = scvi_onnx.load(path, device="cpu")
    # the encoder takes no covariate (encode_covariates=False): the latent space does not
    # depend on them and is computed; the decoder takes them: the scoring methods refuse
    for call in scoring_methods(m, a):
        raises(exc_type, call, *needles)
    np.testing.assert_array_equal(
        m.get_latent_representation(a), m.get_latent_representation(adata)
    )
    f = out_dir.parent / f"{case}.h5ad"
    a.write_h5ad(f)
    assert_refused(cli(capsys, "elbo", path, f, "--per-cell", out_dir / "e.csv", *CPU), *needles)
    assert list(out_dir.iterdir()) == []
