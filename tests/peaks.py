"""PEAKVI test data: the shipped accessibility stand-in (models/example/pbmc_peaks.h5ad).

400 real PBMC cells (two batches) x 2,000 "regions": real RNA counts of sparsely detected
genes, binarised in ``X`` (~11% accessible), raw in ``layers["counts"]`` (see
scripts/make_peaks_data.py for the recipe and why), plus obs columns for the configurations.
"""

from __future__ import annotations

import functools

import numpy as np

from .conftest import MODELS

PEAKS_H5AD = MODELS / "example" / "pbmc_peaks.h5ad"


@functools.cache
def _peaks():
    import anndata as ad

    a = ad.read_h5ad(PEAKS_H5AD)
    rng = np.random.default_rng(0)
    n = a.n_obs
    a.obs["donor"] = np.array(["d1", "d2", "d3", "d4"])[rng.integers(0, 4, n)]
    a.obs["single"] = "only"  # one category: dropped by FCLayers
    a.obs["many"] = [f"b{i}" for i in rng.integers(0, 12, n)]
    a.obs["pct"] = rng.normal(size=n).astype(np.float32)
    a.obs["depth"] = rng.uniform(size=n).astype(np.float32)
    return a


def peaks(n_regions: int | None = None):
    """A fresh copy of the PEAKVI test cells (the first ``n_regions`` regions, or all)."""
    a = _peaks()
    return (a if n_regions is None else a[:, :n_regions]).copy()


def export_sparse_peakvi(out, n_regions: int | None = None, epochs: int = 2, **model_kw):
    """A small PEAKVI trained on these cells (batch, a categorical and a continuous covariate,
    ``encode_covariates``) exported with the sparse encoders, which an export writes from
    10,000 regions (here at any size). Needs torch and scvi-tools."""
    import warnings

    import pytest
    import scvi

    from scvi_onnx.exporter import export_model
    from scvi_onnx.exporter.parity import QUIET_TRAINING
    from scvi_onnx.exporter.specs import peakvae as spec

    adata = peaks(n_regions)
    scvi.model.PEAKVI.setup_anndata(
        adata,
        batch_key="batch",
        categorical_covariate_keys=["donor"],
        continuous_covariate_keys=["pct"],
    )
    scvi.settings.seed = 0
    kw = dict(n_hidden=16, n_latent=5, encode_covariates=True) | model_kw
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = scvi.model.PEAKVI(adata, **kw)
        model.train(max_epochs=epochs, **QUIET_TRAINING)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(spec, "SPARSE_MIN_REGIONS", 0)
        path = export_model(model, out)
    return path, model, adata
