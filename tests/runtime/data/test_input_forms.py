"""The forms an input can take give the same numbers, bit for bit: integer, float32 or float64
counts; dense, CSR, CSC or backed matrices; extra and reordered genes; a boolean mask or the
integer indices it selects."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from scvi_onnx.errors import NonIntegerCountsWarning

from ..helpers import assert_same_results, results_of


@pytest.fixture(scope="module")
def reference(model, query):
    """Results on the query as shipped (CSR float32), default batch size."""
    return results_of(model, query)


def test_extra_and_reordered_genes_give_identical_results(model, query):
    genes = list(model.genes)
    assert query.n_vars > len(genes) and list(query.var_names[: len(genes)]) != genes
    ordered = query[:, genes].copy()
    reversed_ = query[:, genes[::-1]].copy()
    for a in (ordered, reversed_):
        np.testing.assert_array_equal(
            model.get_latent_representation(a), model.get_latent_representation(query)
        )
        np.testing.assert_array_equal(
            model.get_elbo(a, return_mean=False), model.get_elbo(query, return_mean=False)
        )
        np.testing.assert_array_equal(
            model.get_marginal_ll(a, n_mc_samples=10, return_mean=False),
            model.get_marginal_ll(query, n_mc_samples=10, return_mean=False),
        )


@pytest.mark.parametrize(
    "dtype", [np.int32, np.int64, np.uint16, np.float64], ids=lambda d: d.__name__
)
@pytest.mark.parametrize("layout", ["dense", "csr"])
def test_integer_and_float64_matrices_equal_float32(model, query, reference, dtype, layout):
    a = query.copy()
    x = query.X.toarray().astype(dtype)
    assert np.array_equal(x.astype(np.float32), query.X.toarray())  # counts are exact
    a.X = x if layout == "dense" else sp.csr_matrix(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonIntegerCountsWarning)
        assert_same_results(results_of(model, a), reference)


@pytest.mark.parametrize("layout", ["dense", "csr", "csc", "backed-csr", "backed-dense"])
def test_dense_sparse_and_backed_inputs_are_identical(tmp_path, model, query, reference, layout):
    a = query.copy()
    if layout in ("dense", "backed-dense"):
        a.X = query.X.toarray()
    elif layout == "csc":
        a.X = sp.csc_matrix(query.X)
    if layout.startswith("backed"):
        path = tmp_path / "q.h5ad"
        a.write_h5ad(path)
        a = ad.read_h5ad(path, backed="r")
        assert a.isbacked
    try:
        assert_same_results(results_of(model, a), reference)
        idx = np.array([150, 3, 77, 199, 0])
        part = results_of(model, a, indices=idx, batch_size=2)
        for key in reference:
            np.testing.assert_array_equal(part[key], reference[key][idx], err_msg=key)
    finally:
        if layout.startswith("backed"):
            a.file.close()


def test_boolean_mask_equals_integer_indices(model, query):
    rng = np.random.default_rng(1)
    mask = rng.random(query.n_obs) < 0.3
    idx = np.flatnonzero(mask)
    by_mask = results_of(model, query, indices=mask)
    by_idx = results_of(model, query, indices=idx)
    by_list = results_of(model, query, indices=idx.tolist())
    assert_same_results(by_mask, by_idx)
    assert_same_results(by_list, by_idx)
