"""normalize_dataloader: a user's minibatches (scvi-tools' REGISTRY_KEYS names) give the
AnnData source's minibatches, and are checked as strictly."""

from __future__ import annotations

import numpy as np
import pytest

from scvi_onnx.data import AnnDataSource, DataNeeds, normalize_dataloader
from scvi_onnx.data.dataloader import (
    BATCH_KEY,
    CAT_COVS_KEY,
    CONT_COVS_KEY,
    LABELS_KEY,
    SIZE_FACTOR_KEY,
    X_KEY,
)
from scvi_onnx.errors import (
    InputDataError,
    InvalidArgumentError,
    InvalidValuesError,
    MissingColumnError,
    NonIntegerCountsWarning,
    UnknownCategoryError,
    ZeroLibrarySizeError,
)

from .helpers import FULL, N, as_loader_dict, assert_same, counts, make_adata, make_manifest


class FakeTensor:
    """Stands for a CPU torch tensor: only ``__array__``."""

    def __init__(self, a):
        self._a = np.asarray(a)

    def __array__(self, dtype=None, copy=None):
        return self._a if dtype is None else self._a.astype(dtype)


def test_dataloader_matches_anndata_source():
    m = make_manifest(**FULL)
    ref = list(AnnDataSource(make_adata(), m).minibatches(None, 5))
    loader = []
    for mb in ref:
        d = as_loader_dict(mb)
        # scvi-tools dataloaders hand float32 tensors for codes; lists and 1-D columns also fine
        d[X_KEY] = FakeTensor(d[X_KEY])
        d[BATCH_KEY] = FakeTensor(d[BATCH_KEY].astype(np.float32))
        d[LABELS_KEY] = d[LABELS_KEY][:, 0].tolist()
        d[SIZE_FACTOR_KEY] = d[SIZE_FACTOR_KEY][:, 0]
        d["unused_key"] = np.zeros(3)
        loader.append(d)
    got = list(normalize_dataloader(loader, m))
    assert len(got) == len(ref)
    for a, b in zip(got, ref, strict=True):
        assert_same(a, b)


def test_dataloader_defaults_and_running_index():
    x = counts()
    loader = [{X_KEY: x[:5]}, {X_KEY: x[5:5]}, {X_KEY: x[5:].tolist()}]
    got = list(normalize_dataloader(loader, make_manifest()))
    assert len(got) == 2
    np.testing.assert_array_equal(np.concatenate([g.cells for g in got]), np.arange(N))
    assert got[1].x.dtype == np.float32 and got[1].batch.shape == (N - 5, 1)
    assert not got[0].labels.any()


@pytest.mark.parametrize(
    "mb, exc, needle",
    [
        ({X_KEY: np.zeros((2, 3))}, InputDataError, "(2, 3)"),
        ({"x": np.zeros((2, 8))}, MissingColumnError, "'X'"),
        ({X_KEY: np.ones((2, 8)), LABELS_KEY: [0, 0]}, MissingColumnError, "'batch'"),
        (
            {X_KEY: np.ones((2, 8)), BATCH_KEY: [0, 2], LABELS_KEY: [0, 0]},
            UnknownCategoryError,
            "cell 1",
        ),
        (
            {X_KEY: np.ones((2, 8)), BATCH_KEY: [0, 0.5], LABELS_KEY: [0, 0]},
            InvalidValuesError,
            "0.5",
        ),
        (
            {X_KEY: np.ones((2, 8)), BATCH_KEY: [0, 1, 1], LABELS_KEY: [0, 0]},
            InputDataError,
            "(3,)",
        ),
        (
            {X_KEY: np.array([[1.0] * 8, [np.nan] * 8]), BATCH_KEY: [0, 1], LABELS_KEY: [0, 0]},
            InvalidValuesError,
            "'cell 1'",
        ),
        (
            {X_KEY: -np.ones((2, 8)), BATCH_KEY: [0, 1], LABELS_KEY: [0, 0]},
            InvalidValuesError,
            "negative",
        ),
        (
            {X_KEY: np.ones((2, 8)), BATCH_KEY: [0, 1], LABELS_KEY: [0, 0], "size_factor": [1, 0]},
            InvalidValuesError,
            "> 0",
        ),
        ("not a dict", InputDataError, "str"),
    ],
)
def test_dataloader_refuses(mb, exc, needle):
    m = make_manifest(batch_key="b", batch_cats=("x", "y"), labels_key="l", size_factor_key=None)
    if isinstance(mb, dict) and "size_factor" in mb:
        m = make_manifest(batch_key="b", batch_cats=("x", "y"), labels_key="l", size_factor_key="s")
    with pytest.raises(exc) as e:
        list(normalize_dataloader([mb], m))
    assert needle in str(e.value)


def test_dataloader_requires_registered_covariates():
    m = make_manifest(**FULL)
    mb = {X_KEY: np.ones((2, 8)), BATCH_KEY: [0, 1], LABELS_KEY: [0, 2], SIZE_FACTOR_KEY: [1, 1]}
    with pytest.raises(MissingColumnError, match=CAT_COVS_KEY):
        list(normalize_dataloader([mb], m))
    mb[CAT_COVS_KEY] = [[0], [3]]
    with pytest.raises(UnknownCategoryError, match="'donor'"):
        list(normalize_dataloader([mb], m))
    mb[CAT_COVS_KEY] = [[0], [2]]
    with pytest.raises(MissingColumnError, match=CONT_COVS_KEY):
        list(normalize_dataloader([mb], m))
    mb[CONT_COVS_KEY] = [[0.1, 5.0], [0.2, 6.0]]
    (out,) = normalize_dataloader([mb], m)
    assert out.cat_covs.dtype == np.int64 and out.cont_covs.dtype == np.float32


def test_dataloader_zero_library_and_warning():
    ok = np.ones((3, 8), dtype=np.float32)
    x = ok.copy()
    x[2] = 0
    m = make_manifest()
    with pytest.raises(ZeroLibrarySizeError, match="'cell 5'"):
        list(
            normalize_dataloader(
                [{X_KEY: ok}, {X_KEY: x}], m, needs=DataNeeds(positive_library=True)
            )
        )
    x[0, 0] = 0.5
    with pytest.warns(NonIntegerCountsWarning, match="2 non-integer value"):
        list(normalize_dataloader([{X_KEY: x}, {X_KEY: x}], m))


def test_dataloader_bad_argument():
    with pytest.raises(InvalidArgumentError):
        normalize_dataloader({X_KEY: np.ones((2, 8))}, make_manifest())
    with pytest.raises(InvalidArgumentError):
        normalize_dataloader(3, make_manifest())
