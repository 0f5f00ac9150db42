"""AnnDataSource: minibatches of the model's genes, typed and laid out as the maths needs them,
identical from every storage format, in memory or backed, in any index order."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scvi_onnx.bundle import CategoricalField, Manifest, Registry
from scvi_onnx.data import AnnDataSource, resolve_indices
from scvi_onnx.data.entries import Entries
from scvi_onnx.errors import (
    InputDataError,
    InvalidArgumentError,
    InvalidValuesError,
    NonIntegerCountsWarning,
)

from .helpers import (
    ENTRIES,
    FULL,
    GENES,
    G,
    N,
    assert_entries_match,
    assert_same,
    collect,
    counts,
    make_adata,
    make_manifest,
    make_obs,
)


def test_minibatch_layout_and_dtypes():
    m = make_manifest(**FULL)
    src = AnnDataSource(make_adata(), m)
    assert src.n_obs == N and list(src.obs_names[:2]) == ["cell0", "cell1"]
    mbs = list(src.minibatches(None, 5))
    assert [mb.x.shape[0] for mb in mbs] == [5, 5, 2]
    mb = mbs[0]
    assert mb.x.dtype == np.float32 and mb.x.flags.c_contiguous
    assert mb.x.shape == (5, len(GENES))
    assert mb.batch.dtype == np.int64 and mb.batch.shape == (5, 1)
    assert mb.labels.dtype == np.int64 and mb.labels.shape == (5, 1)
    assert mb.cat_covs.dtype == np.int64 and mb.cat_covs.shape == (5, 1)
    assert mb.cont_covs.dtype == np.float32 and mb.cont_covs.shape == (5, 2)
    assert mb.size_factor.dtype == np.float32 and mb.size_factor.shape == (5, 1)
    assert mb.cells.dtype == np.int64 and mb.cells.shape == (5,)

    obs = make_obs()
    allb = collect(src)
    np.testing.assert_array_equal(allb.x, counts())
    np.testing.assert_array_equal(allb.batch[:, 0], (obs["batch"].astype(str) == "b1").astype(int))
    np.testing.assert_array_equal(
        allb.labels[:, 0], obs["cell_type"].map({"B": 0, "T": 1, "NK": 2})
    )
    np.testing.assert_array_equal(allb.cat_covs[:, 0], obs["donor"] - 1)
    np.testing.assert_allclose(allb.cont_covs[:, 1], obs["n_counts"])
    np.testing.assert_allclose(allb.size_factor[:, 0], obs["sf"], rtol=1e-6)
    np.testing.assert_array_equal(allb.cells, np.arange(N))


def test_unregistered_fields_are_absent_or_zero():
    src = AnnDataSource(make_adata(), make_manifest())
    mb = next(iter(src.minibatches(None, 100)))
    assert mb.cat_covs is None and mb.cont_covs is None and mb.size_factor is None
    assert mb.entries is None and mb.log_library is None
    assert not mb.batch.any() and not mb.labels.any()


@pytest.mark.parametrize("backed", [False, True], ids=["memory", "backed"])
@pytest.mark.filterwarnings("ignore:adata.X holds 1 non-integer")  # the 0.5 below, on purpose
def test_csr_sources_give_their_non_zeros(tmp_path, backed, monkeypatch):
    """Every minibatch carries its non-zeros (``entries=True``), equal to the dense X's. A CSR
    source hands over its own (no pass over the dense rows) exactly when its rows list them in
    the model's gene order; other sources list them from the dense rows, once per minibatch."""
    dense_passes = []
    from_dense = Entries.from_dense
    monkeypatch.setattr(
        Entries, "from_dense", classmethod(lambda cls, a: dense_passes.append(1) or from_dense(a))
    )
    x = counts().astype(np.float32)
    x[4] = 0
    x[5, 3] = 0.5
    rng = np.random.default_rng(2)
    perm = rng.permutation(G)
    with_zero = sp.csr_matrix(x)
    with_zero.data[0] = 0.0  # an explicit zero, stored
    unsorted = sp.csr_matrix(x)
    for i in range(N):  # every row's entries in decreasing column order
        lo, hi = unsorted.indptr[i], unsorted.indptr[i + 1]
        unsorted.indices[lo:hi] = unsorted.indices[lo:hi][::-1].copy()
        unsorted.data[lo:hi] = unsorted.data[lo:hi][::-1].copy()
    unsorted.has_sorted_indices = False
    assert not unsorted.has_canonical_format
    keep = [0, 1, 3, 4, 5, 7]  # g2 and g6 missing, an extra gene between
    extra = np.concatenate([x[:, keep[:3]], np.ones((N, 1), np.float32), x[:, keep[3:]]], axis=1)
    extra_genes = [GENES[i] for i in keep[:3]] + ["extra"] + [GENES[i] for i in keep[3:]]
    cases = {
        "same order": (sp.csr_matrix(x), GENES, True),
        "explicit zero": (with_zero, GENES, True),
        "missing and extra genes": (sp.csr_matrix(extra), extra_genes, True),
        "genes reordered": (sp.csr_matrix(x[:, perm]), [GENES[i] for i in perm], False),
        "unsorted entries": (unsorted, GENES, False),
        "dense": (x, GENES, False),
    }
    for name, (matrix, genes, given) in cases.items():
        a = make_adata(matrix, genes)
        if backed:
            a.write_h5ad(tmp_path / "c.h5ad")
            a = ad.read_h5ad(tmp_path / "c.h5ad", backed="r")
        try:
            src = AnnDataSource(a, make_manifest(), missing_genes="zero", min_gene_overlap=0.7)
            for indices in (None, [9, 2, 4, 11, 0]):  # in order, and rows read out of order
                dense_passes.clear()
                mbs = list(src.minibatches(indices, 4, needs=ENTRIES))
                assert len(dense_passes) == (0 if given else len(mbs)), name
                for mb in mbs:
                    assert_entries_match(mb)
                    assert 0.0 not in mb.entries.vals
                assert all(mb.entries is None for mb in src.minibatches(indices, 4))
        finally:
            if backed:
                a.file.close()


def test_not_anndata_and_empty():
    with pytest.raises(InputDataError, match="AnnData"):
        AnnDataSource(counts(), make_manifest())
    with pytest.raises(InputDataError, match="empty AnnData"):
        AnnDataSource(make_adata(counts(n=0), obs=make_obs(0)), make_manifest())


# ----------------------------------------------------------------------------------------------


@pytest.fixture
def formats(tmp_path):
    """The same data as dense int/float32/float64, CSR/CSC (matrix and array), backed h5ad."""
    x = counts()
    base = make_adata(x)
    out = {
        "int": base,
        "float32": make_adata(x.astype(np.float32)),
        "float64": make_adata(x.astype(np.float64)),
        "csr": make_adata(sp.csr_matrix(x.astype(np.float32))),
        "csc": make_adata(sp.csc_matrix(x.astype(np.float32))),
        "csr_array": make_adata(sp.csr_array(x.astype(np.float64))),
        "csc_array": make_adata(sp.csc_array(x)),
    }
    for name, mat in (
        ("dense", x.astype(np.float32)),
        ("csr", sp.csr_matrix(x.astype(np.float32))),
        ("csc", sp.csc_matrix(x.astype(np.float32))),
    ):
        path = tmp_path / f"{name}.h5ad"
        make_adata(mat).write_h5ad(path)
        out[f"backed_{name}"] = ad.read_h5ad(path, backed="r")
    layered = make_adata(np.zeros_like(x))
    layered.layers["counts"] = sp.csr_matrix(x)
    out["layer"] = layered
    yield out
    for a in out.values():
        if a.isbacked:
            a.file.close()


@pytest.mark.parametrize(
    "indices",
    [None, [7, 2, 11, 0, 5, 3], np.array([11, 10, 9, 1, 0]), [4], np.arange(N) % 3 == 0],
)
def test_formats_give_identical_minibatches(formats, indices):
    m = make_manifest(**FULL)
    lm = make_manifest(**FULL, layer="counts")
    ref_idx = resolve_indices(indices, N)
    x = counts().astype(np.float32)
    results = {}
    for name, adata in formats.items():
        src = AnnDataSource(adata, lm if name == "layer" else m)
        results[name] = list(src.minibatches(indices, 4, needs=ENTRIES))
    ref = results["int"]
    np.testing.assert_array_equal(np.concatenate([b.x for b in ref]), x[ref_idx])
    np.testing.assert_array_equal(np.concatenate([b.cells for b in ref]), ref_idx)
    for name, mbs in results.items():
        assert len(mbs) == len(ref), name
        for a, b in zip(mbs, ref, strict=True):
            assert_same(a, b)


@pytest.mark.parametrize("prefetch", [1, 3])
def test_prefetch_gives_the_same_minibatches_errors_and_warning(formats, prefetch):
    m = make_manifest(**FULL)
    lm = make_manifest(**FULL, layer="counts")
    for name, adata in formats.items():
        src = AnnDataSource(adata, lm if name == "layer" else m)
        for indices in (None, [7, 2, 11, 0, 5, 3]):
            want = list(src.minibatches(indices, 4, needs=ENTRIES))
            got = list(src.minibatches(indices, 4, needs=ENTRIES, prefetch=prefetch))
            assert len(got) == len(want), name
            for a, b in zip(got, want, strict=True):
                assert_same(a, b)
    # an error surfaces at its own minibatch, after the earlier ones were yielded
    x = counts().astype(np.float64)
    x[7, 3] = np.nan
    it = AnnDataSource(make_adata(sp.csr_matrix(x)), make_manifest()).minibatches(
        None, 2, prefetch=prefetch
    )
    assert [mb.cells[0] for mb in (next(it), next(it), next(it))] == [0, 2, 4]
    with pytest.raises(InvalidValuesError, match="'cell7'"):
        next(it)
    # one warning, with the counts of every minibatch
    x = counts().astype(np.float32)
    x[[1, 10, 11], [1, 0, 5]] += 0.5
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        src = AnnDataSource(make_adata(sp.csr_matrix(x)), make_manifest())
        list(src.minibatches(None, 3, prefetch=prefetch))
    hits = [r for r in w if issubclass(r.category, NonIntegerCountsWarning)]
    assert len(hits) == 1 and "3 non-integer value(s) in 3 cells" in str(hits[0].message)
    with pytest.raises(InvalidArgumentError, match="prefetch"):
        src.minibatches(None, 3, prefetch=-1)


def test_backed_unsorted_scattered_rows(tmp_path):
    rng = np.random.default_rng(5)
    x = rng.poisson(3.0, size=(40, len(GENES))).astype(np.float32)
    genes = list(reversed(GENES)) + ["zz"]
    data = np.concatenate([x[:, ::-1], np.zeros((40, 1), np.float32)], axis=1)
    idx = rng.permutation(40)[:25]
    for name, mat in (("d", data), ("s", sp.csr_matrix(data))):
        path = tmp_path / f"{name}.h5ad"
        ad.AnnData(mat, var=pd.DataFrame(index=genes)).write_h5ad(path)
        a = ad.read_h5ad(path, backed="r")
        try:
            src = AnnDataSource(a, make_manifest())
            got = collect(src, idx, 7)
        finally:
            a.file.close()
        np.testing.assert_array_equal(got.x, x[idx])
        np.testing.assert_array_equal(got.cells, idx)


def test_minibatches_refuses_bad_args():
    src = AnnDataSource(make_adata(), make_manifest())
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        src.minibatches(None, 0)
    with pytest.raises(InvalidArgumentError, match="99"):
        src.minibatches([0, 99], 2)


def test_layer_and_non_numeric_matrix():
    adata = make_adata()
    adata.layers["counts"] = sp.csr_matrix(counts(seed=4))
    got = collect(AnnDataSource(adata, make_manifest(layer="counts")))
    np.testing.assert_array_equal(got.x, counts(seed=4))
    bad = make_adata(counts().astype(str).astype(object))
    with pytest.raises(InvalidValuesError, match="dtype"):
        AnnDataSource(bad, make_manifest())


@pytest.mark.parametrize("backed", [False, True])
@pytest.mark.parametrize("order", ["same", "shuffled"])
def test_non_canonical_csr_duplicates_add_up(tmp_path, backed, order):
    """Duplicated / unsorted CSR entries sum as in scipy, in memory and backed, any gene order."""
    rng = np.random.default_rng(5)
    genes = [f"g{i}" for i in range(30)]
    n = 40
    dense = rng.poisson(1.0, (n, 30)).astype(np.float32)
    rows, cols = np.nonzero(dense)
    vals = dense[rows, cols]
    # split every entry in two halves stored twice, in reversed column order within rows
    order_idx = np.lexsort((-cols, rows))
    rows, cols, vals = rows[order_idx], cols[order_idx], vals[order_idx]
    data = np.concatenate([vals / 2, vals / 2])
    r2 = np.concatenate([rows, rows])
    c2 = np.concatenate([cols, cols])
    srt = np.argsort(r2, kind="stable")
    indptr = np.concatenate([[0], np.cumsum(np.bincount(r2, minlength=n))])
    X = sp.csr_matrix((data[srt], c2[srt], indptr), shape=(n, 30))
    assert not X.has_canonical_format
    var = genes if order == "same" else list(np.array(genes)[rng.permutation(30)])
    perm = [genes.index(g) for g in var]
    a = ad.AnnData(X=X[:, perm] if order == "shuffled" else X, var=pd.DataFrame(index=var))
    a.obs_names = [f"c{i}" for i in range(n)]
    if backed:
        path = tmp_path / "nc.h5ad"
        a.write_h5ad(path)
        a = ad.read_h5ad(path, backed="r")
    man = Manifest(
        schema_version=1,
        model_class="SCVI",
        config={},
        genes=tuple(genes),
        registry=Registry(
            layer=None, batch=CategoricalField(None, (0,)), labels=CategoricalField(None, (0,))
        ),
        graphs={},
    )
    src = AnnDataSource(a, man)
    idx = np.array([3, 0, 39, 17, 18, 19, 5])
    got = np.concatenate([mb.x for mb in src.minibatches(idx, 3)])
    np.testing.assert_allclose(got, dense[idx], rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.uint16])
def test_rows_matrix_shares_a_chunks_arrays_and_densifies_as_scipy(dtype):
    """A minibatch's rows sliced out of a larger CSR block (a Dask chunk's) are densified from
    views of its arrays, not copies (scipy's constructor copies such views), with scipy's
    dense rows and format flags, duplicated and unsorted entries included."""
    from scvi_onnx.data.readers import _rows_matrix

    rng = np.random.default_rng(2)
    lengths = rng.integers(0, 6, size=50)
    nnz = int(lengths.sum())
    cols = rng.integers(0, 12, size=nnz).astype(np.int32)  # unsorted, some duplicated
    vals = rng.integers(1, 9, size=nnz).astype(dtype)
    big_cols = np.concatenate([np.zeros(10 * nnz, np.int32), cols])
    big_vals = np.concatenate([np.zeros(10 * nnz, dtype), vals])
    view_cols, view_vals = big_cols[10 * nnz :], big_vals[10 * nnz :]
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    want = sp.csr_matrix((vals, cols, indptr), shape=(50, 12))
    for first in (0, 20):  # rows from the start, and from inside the block
        a, b = int(indptr[first]), nnz
        got = _rows_matrix(lengths[first:], view_cols[a:b], view_vals[a:b], 12)
        np.testing.assert_array_equal(got.toarray(), want[first:].toarray())
        assert got.has_canonical_format == want[first:].has_canonical_format
        assert got.data.base is big_vals and got.indices.base is big_cols
    assert not want.has_canonical_format
