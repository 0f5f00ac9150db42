"""Expression values: NaN, infinite and negative counts refused (naming the cell), zero
libraries refused where the model needs a positive one, non-integer counts warned once."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from scvi_onnx.data import AnnDataSource, DataNeeds
from scvi_onnx.errors import InvalidValuesError, NonIntegerCountsWarning, ZeroLibrarySizeError

from .helpers import GENES, N, collect, counts, make_adata, make_manifest


@pytest.mark.parametrize("value, needle", [(np.nan, "NaN"), (np.inf, "infinite"), (-1.0, "negat")])
@pytest.mark.parametrize("build", [np.asarray, sp.csr_matrix])
def test_bad_expression_values(value, needle, build):
    x = counts().astype(np.float64)
    x[7, 3] = value
    src = AnnDataSource(make_adata(build(x)), make_manifest())
    it = src.minibatches(None, 5)
    next(it)  # the first minibatch (cells 0-4) is clean
    with pytest.raises(InvalidValuesError) as e:
        next(it)
    assert needle in str(e.value) and "'cell7'" in str(e.value)


@pytest.mark.parametrize("build", [np.asarray, sp.csr_matrix])
def test_values_in_ignored_genes_are_not_checked(build):
    x = np.concatenate([counts(), np.full((N, 1), np.nan)], axis=1)
    src = AnnDataSource(make_adata(build(x), list(GENES) + ["junk"]), make_manifest())
    assert np.isfinite(collect(src).x).all()


@pytest.mark.parametrize("build", [np.asarray, sp.csr_matrix])
def test_zero_library(build):
    x = counts()
    x[[2, 9]] = 0
    adata = make_adata(build(x))
    collect(AnnDataSource(adata, make_manifest()))  # allowed by default
    src = AnnDataSource(adata, make_manifest())
    with pytest.raises(ZeroLibrarySizeError) as e:
        collect(src, [9, 2, 0], 3, DataNeeds(entries=True, positive_library=True))
    msg = str(e.value)
    assert "2 cells" in msg and "'cell9', 'cell2'" in msg and "filter_cells" in msg


@pytest.mark.parametrize("build", [np.asarray, sp.csr_matrix])
def test_single_non_integer_warning(build):
    x = counts().astype(np.float32)
    x[1, 1] += 0.5
    x[1, 2] += 0.25
    x[10, 0] += 0.5
    src = AnnDataSource(make_adata(build(x)), make_manifest())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        mbs = list(src.minibatches(None, 3))
    hits = [r for r in w if issubclass(r.category, NonIntegerCountsWarning)]
    assert len(mbs) == 4 and len(hits) == 1
    assert "3 non-integer value(s) in 2 cells" in str(hits[0].message)
    # no warning for integer data, nor when the model is not a count model
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonIntegerCountsWarning)
        list(AnnDataSource(make_adata(), make_manifest()).minibatches(None, 3))
        list(
            AnnDataSource(make_adata(x), make_manifest()).minibatches(
                None, 3, needs=DataNeeds(count_data=False)
            )
        )
