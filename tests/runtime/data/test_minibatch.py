"""The minibatch's completion: the observed log-library is ``log(sum_g x)`` over the model's genes,
exactly (scvi-tools' ``torch.log(x.sum(1))``: no pseudo-count), from every source."""

from __future__ import annotations

import dataclasses

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from scvi_onnx.data import AnnDataSource, DataNeeds, Minibatch, normalize_dataloader
from scvi_onnx.data.dataloader import X_KEY
from scvi_onnx.data.entries import Entries

from .helpers import GENES, G, N, counts, make_adata, make_manifest

LIBRARY = DataNeeds(log_library=True)


def _minibatch(x: np.ndarray) -> Minibatch:
    n = x.shape[0]
    zeros = np.zeros((n, 1), dtype=np.int64)
    return Minibatch(x=x, cells=np.arange(n, dtype=np.int64), batch=zeros, labels=zeros)


def _small_libraries() -> np.ndarray:
    """Cells with totals 1, 2, 0.5 and 7: where log(sum + 1) is far from log(sum)."""
    x = np.zeros((4, G), dtype=np.float32)
    x[0, 3] = 1.0
    x[1, [0, 7]] = 1.0
    x[2, 5] = 0.5
    x[3, :7] = 1.0
    return x


def test_completion_adds_log_of_the_total_count():
    x = _small_libraries()
    done = _minibatch(x).complete(LIBRARY)
    assert done.log_library.dtype == np.float64 and done.log_library.shape == (4,)
    np.testing.assert_array_equal(done.log_library, np.log([1.0, 2.0, 0.5, 7.0]))
    assert done.log_library[0] == 0.0  # a single count: log 1, not log 2
    # the entries the library was summed from come along (the scoring methods need them)
    for got, want in zip(done.entries, Entries.from_dense(x), strict=True):
        np.testing.assert_array_equal(got, want)


def test_completion_on_random_counts_equals_numpy():
    x = counts(n=50, seed=7).astype(np.float32) * np.float32(3.0)
    done = _minibatch(x).complete(LIBRARY)
    np.testing.assert_allclose(
        done.log_library, np.log(x.astype(np.float64).sum(1)), rtol=1e-15, atol=0
    )


def test_completion_only_adds_what_is_needed():
    mb = _minibatch(_small_libraries())
    assert mb.complete(DataNeeds()) is mb
    with_entries = mb.complete(DataNeeds(entries=True))
    assert with_entries.entries is not None and with_entries.log_library is None
    assert LIBRARY.for_latent().log_library is False
    # a library the source gave is kept, not recomputed
    given = dataclasses.replace(mb, log_library=np.full(4, 9.0))
    np.testing.assert_array_equal(given.complete(LIBRARY).log_library, np.full(4, 9.0))


@pytest.mark.parametrize("layout", ["dense", "csr", "backed-csr", "extra-genes-csr"])
def test_anndata_minibatches_carry_log_of_the_model_genes_total(tmp_path, layout):
    x = counts().astype(np.float32)
    x[2] = 0
    x[2, 4] = 1.0  # a cell with one count
    genes, matrix = list(GENES), x
    if layout == "extra-genes-csr":
        # counts in genes the model does not have never enter its library
        genes = genes + ["extra"]
        matrix = np.concatenate([x, np.full((N, 1), 100.0, np.float32)], axis=1)
    a = make_adata(matrix if layout == "dense" else sp.csr_matrix(matrix), genes)
    if layout == "backed-csr":
        a.write_h5ad(tmp_path / "a.h5ad")
        a = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    try:
        src = AnnDataSource(a, make_manifest())
        mbs = list(src.minibatches([9, 2, 0, 11], 3, needs=LIBRARY))
    finally:
        if layout == "backed-csr":
            a.file.close()
    got = np.concatenate([mb.log_library for mb in mbs])
    want = np.log(x[[9, 2, 0, 11]].astype(np.float64).sum(1))
    np.testing.assert_array_equal(got, want)
    assert got[1] == 0.0


@pytest.mark.filterwarnings("ignore:the dataloader's X holds 1 non-integer")  # the 0.5, on purpose
def test_dataloader_minibatches_carry_the_same_log_library():
    x = _small_libraries()
    (mb,) = normalize_dataloader([{X_KEY: x}], make_manifest(), needs=LIBRARY)
    np.testing.assert_array_equal(mb.log_library, np.log([1.0, 2.0, 0.5, 7.0]))


def test_row_sums_in_blocks_equal_one_reduceat(monkeypatch):
    """Entries.row_sums adds rows in blocks of about ROW_SUM_BLOCK entries (bounding its
    float64 temporary): every row's sum is bit-identical to one reduceat over all entries,
    with empty rows, a row longer than a block, and blocks that end inside a row."""
    from scvi_onnx.data import entries as E

    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 40, size=300)
    lengths[[0, 7, 299]] = 0
    lengths[150] = 500  # longer than a block below
    indptr = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    vals = rng.gamma(0.5, 3.0, size=int(indptr[-1])).astype(np.float32)
    e = E.Entries(indptr, np.zeros(vals.size, dtype=np.int32), vals)
    want = np.zeros(lengths.size)
    nz = lengths > 0
    want[nz] = np.add.reduceat(vals, indptr[:-1][nz], dtype=np.float64)
    for block in (64, 257, 1 << 18):
        monkeypatch.setattr(E, "ROW_SUM_BLOCK", block)
        np.testing.assert_array_equal(e.row_sums(vals), want)
