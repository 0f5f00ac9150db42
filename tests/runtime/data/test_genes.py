"""Gene matching: the model's genes found by name in any order, extra genes ignored, missing
genes refused or zero-filled when asked."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scvi_onnx.data import AnnDataSource
from scvi_onnx.errors import InputDataError, InvalidArgumentError, MissingGenesError

from ...conftest import EXAMPLE_H5AD, TRAIN_H5AD
from .helpers import FULL, GENES, N, assert_same, collect, counts, make_adata, make_manifest


def test_reordered_and_extra_genes():
    m = make_manifest(**FULL)
    base = collect(AnnDataSource(make_adata(), m))
    rng = np.random.default_rng(3)
    perm = rng.permutation(len(GENES))
    x = counts()
    extra = rng.poisson(1.0, size=(N, 3))
    shuffled = np.concatenate([x[:, perm], extra], axis=1)
    genes = [GENES[p] for p in perm] + ["extraA", "extraB", "extraC"]
    for build in (np.asarray, sp.csr_matrix, sp.csc_matrix):
        src = AnnDataSource(make_adata(build(shuffled), genes), m)
        assert src.genes.overlap == 1.0 and src.genes.n_found == len(GENES)
        assert_same(collect(src), base)


def test_missing_genes_error():
    genes = GENES[:5] + ("other1", "other2", "other3")
    with pytest.raises(MissingGenesError) as e:
        AnnDataSource(make_adata(genes=genes), make_manifest())
    msg = str(e.value)
    assert "3 of the model's 8 genes" in msg
    assert "'g5', 'g6', 'g7'" in msg and 'missing_genes="zero"' in msg


def test_missing_genes_error_lists_first_ten():
    genes = tuple(f"m{i}" for i in range(30))
    keep = genes[:10]
    with pytest.raises(MissingGenesError) as e:
        AnnDataSource(
            make_adata(counts(g=10), genes=keep),
            make_manifest(genes),
            missing_genes="zero",
            min_gene_overlap=0.5,
        )
    msg = str(e.value)
    assert "33.3%" in msg and "min_gene_overlap=0" in msg
    assert "'m19'" in msg and "'m20'" not in msg and "and 10 more" in msg


def test_missing_genes_zero_fill(caplog):
    x = counts()
    # data lacks g2 and g6 (2 of 8 -> 75% overlap), has an extra gene
    keep = [0, 1, 3, 4, 5, 7]
    genes = [GENES[i] for i in keep] + ["extra"]
    data = np.concatenate([x[:, keep], np.ones((N, 1), dtype=x.dtype)], axis=1)
    expected = x.astype(np.float32).copy()
    expected[:, [2, 6]] = 0
    with pytest.raises(MissingGenesError) as e:
        AnnDataSource(make_adata(data, genes), make_manifest(), missing_genes="zero")
    assert "75.0%" in str(e.value) and "min_gene_overlap=0" in str(e.value)
    for build in (np.asarray, sp.csr_matrix, sp.csc_matrix):
        with caplog.at_level(logging.INFO, logger="scvi_onnx.data"):
            src = AnnDataSource(
                make_adata(build(data), genes),
                make_manifest(),
                missing_genes="zero",
                min_gene_overlap=0.7,
            )
        assert src.genes.n_found == 6 and src.genes.overlap == pytest.approx(0.75)
        np.testing.assert_array_equal(collect(src).x, expected)
    assert any("6 of the model's 8 genes" in r.getMessage() for r in caplog.records)


def test_bad_missing_genes_args():
    with pytest.raises(InvalidArgumentError, match="missing_genes"):
        AnnDataSource(make_adata(), make_manifest(), missing_genes="drop")
    with pytest.raises(InvalidArgumentError, match="min_gene_overlap"):
        AnnDataSource(make_adata(), make_manifest(), min_gene_overlap=1.5)


def test_duplicated_var_names():
    genes = list(GENES[:-1]) + ["g0"]
    with pytest.raises(InputDataError) as e:
        AnnDataSource(make_adata(genes=genes), make_manifest())
    assert "'g0'" in str(e.value) and "var_names_make_unique" in str(e.value)


def test_real_pbmc_missing_and_extra_genes():
    """Real cells against a real gene list of another file (models/example): the query's last
    1,000 genes, in its order, as the model's; the training cells lack some, have others."""
    ref = ad.read_h5ad(EXAMPLE_H5AD, backed="r")
    genes = tuple(ref.var_names[-1000:])
    ref.file.close()
    q = ad.read_h5ad(TRAIN_H5AD, backed="r")
    try:
        m = make_manifest(genes)
        common = q.var_names.intersection(pd.Index(genes))
        n_missing = len(genes) - len(common)
        assert 0 < n_missing and len(common) < q.n_vars  # some missing, some extra
        with pytest.raises(MissingGenesError) as e:
            AnnDataSource(q, m)
        assert f"{n_missing} of the model's {len(genes)} genes" in str(e.value)
        src = AnnDataSource(q, m, missing_genes="zero")
        assert src.genes.n_found == len(common)
        idx = [150, 3, 77, 120, 5]
        got = collect(src, idx, 2).x
        assert got.shape == (5, len(genes))
        rows = q.X[sorted(idx)]
        dense = (rows.toarray() if sp.issparse(rows) else np.asarray(rows))[
            np.argsort(np.argsort(idx))
        ]
        pos = pd.Index(genes).get_indexer(common)
        np.testing.assert_array_equal(got[:, pos], dense[:, q.var_names.get_indexer(common)])
        missing = np.setdiff1d(np.arange(len(genes)), pos)
        assert not got[:, missing].any()
    finally:
        q.file.close()
