"""obs columns: layers, categories mapped by name to the training codes, numeric covariates and
size factors checked."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from scvi_onnx.data import AnnDataSource
from scvi_onnx.errors import InvalidValuesError, MissingColumnError, UnknownCategoryError

from .helpers import FULL, N, assert_same, collect, make_adata, make_manifest, make_obs


def test_missing_layer():
    with pytest.raises(MissingColumnError) as e:
        AnnDataSource(make_adata(), make_manifest(layer="counts"))
    assert "'counts'" in str(e.value) and "none" in str(e.value)


@pytest.mark.parametrize("col", ["batch", "cell_type", "sf", "donor", "pct_mito", "n_counts"])
def test_missing_obs_column(col):
    adata = make_adata()
    del adata.obs[col]
    with pytest.raises(MissingColumnError) as e:
        AnnDataSource(adata, make_manifest(**FULL))
    msg = str(e.value)
    assert repr(col) in msg and "'pct_mito'" in msg  # names the column and what the model needs


def test_int_and_str_coded_categories_agree():
    m = make_manifest(labels_key="lab", labels_cats=(0, 1, 2), batch_key="b", batch_cats=("1", "2"))
    obs = pd.DataFrame(
        {"lab": np.arange(N) % 3, "b": np.arange(N) % 2 + 1}, index=[f"c{i}" for i in range(N)]
    )
    obs_str = obs.astype(str).astype("category")
    obs_float = obs.astype(float)  # int columns turn float when they hold a NaN somewhere
    a = collect(AnnDataSource(make_adata(obs=obs), m))
    assert_same(a, collect(AnnDataSource(make_adata(obs=obs_str), m)))
    assert_same(a, collect(AnnDataSource(make_adata(obs=obs_float), m)))
    np.testing.assert_array_equal(a.labels[:, 0], np.arange(N) % 3)
    np.testing.assert_array_equal(a.batch[:, 0], np.arange(N) % 2)


def test_unknown_category():
    obs = make_obs()
    obs["cell_type"] = obs["cell_type"].astype(object)
    obs.iloc[[1, 4], obs.columns.get_loc("cell_type")] = "Platelet"
    with pytest.raises(UnknownCategoryError) as e:
        AnnDataSource(make_adata(obs=obs), make_manifest(**FULL))
    msg = str(e.value)
    assert "'cell_type'" in msg and "'Platelet'" in msg and "2 cells" in msg
    assert "'B', 'T', 'NK'" in msg


def test_unknown_int_category_in_covariate():
    obs = make_obs()
    obs.loc["cell3", "donor"] = 9
    with pytest.raises(UnknownCategoryError) as e:
        AnnDataSource(make_adata(obs=obs), make_manifest(**FULL))
    assert "'donor'" in str(e.value) and "9" in str(e.value)


def test_nan_category():
    obs = make_obs()
    obs["batch"] = obs["batch"].astype(object)
    obs.loc["cell2", "batch"] = np.nan
    with pytest.raises(UnknownCategoryError) as e:
        AnnDataSource(make_adata(obs=obs), make_manifest(**FULL))
    assert "'batch'" in str(e.value) and "NaN" in str(e.value)
    # said as missing values, counted once (not "in 1 cell (1 cell)", not "never saw")
    assert "missing values (NaN) in 1 cell." in str(e.value)
    assert "none of its categories" in str(e.value) and "never saw" not in str(e.value)


@pytest.mark.parametrize(
    "col, value, needle",
    [
        ("pct_mito", np.nan, "'cell5'"),
        ("n_counts", np.inf, "'cell5'"),
        ("sf", 0.0, "> 0"),
        ("sf", np.nan, "'cell5'"),
    ],
)
def test_bad_numeric_obs(col, value, needle):
    obs = make_obs()
    obs[col] = obs[col].astype(float)
    obs.loc["cell5", col] = value
    with pytest.raises(InvalidValuesError) as e:
        AnnDataSource(make_adata(obs=obs), make_manifest(**FULL))
    assert repr(col) in str(e.value) and needle in str(e.value)


def test_non_numeric_continuous_covariate():
    obs = make_obs()
    obs["pct_mito"] = "high"
    with pytest.raises(InvalidValuesError) as e:
        AnnDataSource(make_adata(obs=obs), make_manifest(**FULL))
    assert "'pct_mito'" in str(e.value) and "dtype" in str(e.value)
