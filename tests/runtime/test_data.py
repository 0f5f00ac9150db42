"""Tests of scvi_onnx.data: AnnData / dataloader input -> validated numpy minibatches."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scvi_onnx.bundle import CategoricalField, Manifest, Registry
from scvi_onnx.data import (
    AnnDataSource,
    DataNeeds,
    Minibatch,
    normalize_dataloader,
    resolve_indices,
)
from scvi_onnx.data.dataloader import (
    BATCH_KEY,
    CAT_COVS_KEY,
    CONT_COVS_KEY,
    LABELS_KEY,
    SIZE_FACTOR_KEY,
    X_KEY,
)
from scvi_onnx.data.entries import Entries
from scvi_onnx.errors import (
    InputDataError,
    InvalidArgumentError,
    InvalidValuesError,
    MissingColumnError,
    MissingGenesError,
    NonIntegerCountsWarning,
    UnknownCategoryError,
    ZeroLibrarySizeError,
)

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
GENES = tuple(f"g{i}" for i in range(8))
G = len(GENES)
N = 12


# ----------------------------------------------------------------------------------------------
# fixtures / builders
# ----------------------------------------------------------------------------------------------


def make_manifest(
    genes=GENES,
    *,
    layer=None,
    batch_key=None,
    batch_cats=(0,),
    labels_key=None,
    labels_cats=(0,),
    size_factor_key=None,
    cat_covs=(),
    cont_covs=(),
) -> Manifest:
    reg = Registry(
        layer=layer,
        batch=CategoricalField(batch_key, tuple(batch_cats)),
        labels=CategoricalField(labels_key, tuple(labels_cats)),
        size_factor_key=size_factor_key,
        categorical_covariates=tuple(CategoricalField(k, tuple(c)) for k, c in cat_covs),
        continuous_covariates=tuple(cont_covs),
    )
    return Manifest(
        schema_version=1, model_class="SCVI", config={}, genes=tuple(genes), registry=reg, graphs={}
    )


FULL = dict(
    batch_key="batch",
    batch_cats=("b0", "b1"),
    labels_key="cell_type",
    labels_cats=("B", "T", "NK"),
    size_factor_key="sf",
    cat_covs=(("donor", (1, 2, 3)),),
    cont_covs=("pct_mito", "n_counts"),
)


def counts(n=N, g=G, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.poisson(2.0, size=(n, g)).astype(np.int64)
    x[:, 0] += 1  # every cell has a positive library
    return x


def make_obs(n=N) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    return pd.DataFrame(
        {
            "batch": pd.Categorical(rng.choice(["b0", "b1"], n)),
            "cell_type": rng.choice(["B", "T", "NK"], n).astype(object),
            "sf": rng.uniform(0.5, 2.0, n),
            "donor": rng.choice([1, 2, 3], n),  # int-coded column vs int categories
            "pct_mito": rng.uniform(0, 0.2, n),
            "n_counts": rng.integers(100, 1000, n),
        },
        index=[f"cell{i}" for i in range(n)],
    )


def make_adata(x=None, genes=GENES, obs=None) -> ad.AnnData:
    x = counts() if x is None else x
    obs = make_obs(x.shape[0]) if obs is None else obs
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=list(genes)))


ENTRIES = DataNeeds(entries=True)
FIELDS = ("x", "cells", "batch", "labels", "cat_covs", "cont_covs", "size_factor")


def assert_entries_match(mb: Minibatch) -> None:
    """A minibatch's non-zero entries, when the source gave them, are exactly the dense X's."""
    e = mb.entries
    if e is None:
        return
    want = Entries.from_dense(mb.x)
    for got_part, want_part in zip(e, want, strict=True):
        np.testing.assert_array_equal(got_part, want_part)
    assert e.vals.dtype == np.float32


def collect(src: AnnDataSource, indices=None, batch_size=5, needs=ENTRIES) -> Minibatch:
    """All the minibatches' fields concatenated (the non-zero entries checked on the way)."""
    mbs = list(src.minibatches(indices, batch_size, needs=needs))
    for m in mbs:
        assert_entries_match(m)
    return Minibatch(
        **{
            f: None if getattr(mbs[0], f) is None else np.concatenate([getattr(m, f) for m in mbs])
            for f in FIELDS
        }
    )


def assert_same(a: Minibatch, b: Minibatch) -> None:
    """Same minibatch fields and values; the non-zero entries, where given, match the X."""
    assert_entries_match(a)
    assert_entries_match(b)
    for k in FIELDS:
        va, vb = getattr(a, k), getattr(b, k)
        assert (va is None) == (vb is None), k
        if va is not None:
            assert va.dtype == vb.dtype, k
            np.testing.assert_array_equal(va, vb, err_msg=k)


def as_loader_dict(mb: Minibatch) -> dict:
    """A minibatch as a user's dataloader hands it (scvi-tools' REGISTRY_KEYS names)."""
    keys = {
        "x": X_KEY,
        "batch": BATCH_KEY,
        "labels": LABELS_KEY,
        "cat_covs": CAT_COVS_KEY,
        "cont_covs": CONT_COVS_KEY,
        "size_factor": SIZE_FACTOR_KEY,
    }
    return {k: getattr(mb, f) for f, k in keys.items() if getattr(mb, f) is not None}


# ----------------------------------------------------------------------------------------------
# resolve_indices
# ----------------------------------------------------------------------------------------------


def test_resolve_indices_accepts():
    np.testing.assert_array_equal(resolve_indices(None, 4), [0, 1, 2, 3])
    out = resolve_indices([3, 0, 2], 4)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, [3, 0, 2])
    np.testing.assert_array_equal(resolve_indices(np.array([1, 2], dtype=np.uint8), 4), [1, 2])
    np.testing.assert_array_equal(resolve_indices([2.0, 1.0], 4), [2, 1])
    np.testing.assert_array_equal(resolve_indices([True, False, True, False], 4), [0, 2])
    np.testing.assert_array_equal(resolve_indices(pd.Series([False, True, True, False]), 4), [1, 2])


@pytest.mark.parametrize(
    "indices, needle",
    [
        ([0, 5, 7], "5, 7"),
        ([-1, 0], "-1"),
        ([1, 2, 2, 3, 3], "2, 3"),
        ([0.5, 1], "0.5"),
        ([True, False], "length 2"),
        ([], "no cells selected"),
        ([False] * 4, "no cells selected"),
        (np.array([[0, 1]]), "1-D"),
        (["a", "b"], "get_indexer"),
        (2, "[2]"),
        ([np.nan], "nan"),
    ],
)
def test_resolve_indices_refuses(indices, needle):
    with pytest.raises(InvalidArgumentError) as e:
        resolve_indices(indices, 4)
    assert needle in str(e.value)


def test_resolve_indices_lists_first_few():
    with pytest.raises(InvalidArgumentError) as e:
        resolve_indices(list(range(100, 120)), 4)
    msg = str(e.value)
    assert "100, 101" in msg and "and 15 more" in msg and "119" not in msg


# ----------------------------------------------------------------------------------------------
# genes
# ----------------------------------------------------------------------------------------------


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


def test_not_anndata_and_empty():
    with pytest.raises(InputDataError, match="AnnData"):
        AnnDataSource(counts(), make_manifest())
    with pytest.raises(InputDataError, match="empty AnnData"):
        AnnDataSource(make_adata(counts(n=0), obs=make_obs(0)), make_manifest())


# ----------------------------------------------------------------------------------------------
# storage formats and indices
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


# ----------------------------------------------------------------------------------------------
# obs columns, layers, categories
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# expression values
# ----------------------------------------------------------------------------------------------


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


def test_layer_and_non_numeric_matrix():
    adata = make_adata()
    adata.layers["counts"] = sp.csr_matrix(counts(seed=4))
    got = collect(AnnDataSource(adata, make_manifest(layer="counts")))
    np.testing.assert_array_equal(got.x, counts(seed=4))
    bad = make_adata(counts().astype(str).astype(object))
    with pytest.raises(InvalidValuesError, match="dtype"):
        AnnDataSource(bad, make_manifest())


# ----------------------------------------------------------------------------------------------
# normalize_dataloader
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# real data: pbmc_5k cells against pbmc_10k's genes
# ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    not (SHARED / "pbmc_5k_protein_v3.h5ad").is_file()
    or not (SHARED / "pbmc_10k_protein_v3.h5ad").is_file(),
    reason="shared pbmc data not present",
)
def test_real_pbmc_missing_and_extra_genes():
    ref = ad.read_h5ad(SHARED / "pbmc_10k_protein_v3.h5ad", backed="r")
    genes = tuple(ref.var_names)
    ref.file.close()
    q = ad.read_h5ad(SHARED / "pbmc_5k_protein_v3.h5ad", backed="r")
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
        dense = np.asarray(q.X[sorted(idx)])[np.argsort(np.argsort(idx))]
        pos = pd.Index(genes).get_indexer(common)
        np.testing.assert_array_equal(got[:, pos], dense[:, q.var_names.get_indexer(common)])
        missing = np.setdiff1d(np.arange(len(genes)), pos)
        assert not got[:, missing].any()
    finally:
        q.file.close()


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
