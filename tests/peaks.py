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
