"""Shared fixtures: real PBMC cells, tiny trained scvi-tools models exported once per session."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
SHIPPED_BUNDLE = MODELS / "pbmc_scvi"
EXAMPLE_H5AD = MODELS / "example" / "pbmc_query.h5ad"


def pytest_configure(config):
    warnings.filterwarnings("ignore", module="lightning")


@pytest.fixture(scope="session")
def pbmc_small():
    """400 real PBMC cells (two batches) x 150 genes, with extra obs columns for the configs."""
    ad = pytest.importorskip("anndata")
    a = ad.read_h5ad(MODELS / "example" / "pbmc_train.h5ad")
    a = a[:, :150].copy()
    rng = np.random.default_rng(0)
    n = a.n_obs
    a.obs["cell_type"] = np.array(["T", "B", "NK"])[rng.integers(0, 3, n)]
    a.obs["donor"] = np.array(["d1", "d2", "d3", "d4"])[rng.integers(0, 4, n)]
    a.obs["single"] = "only"  # a categorical covariate with one category (dropped by FCLayers)
    a.obs["many"] = [f"b{i}" for i in rng.integers(0, 12, n)]
    a.obs["pct"] = rng.normal(size=n).astype(np.float32)
    a.obs["depth"] = rng.uniform(size=n).astype(np.float32)
    tot = np.asarray(a.X.sum(1)).ravel()
    a.obs["sf"] = (tot / np.median(tot)).astype(np.float32)
    a.layers["counts"] = a.X.copy()
    return a
