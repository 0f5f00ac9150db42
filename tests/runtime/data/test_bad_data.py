"""Bad and unusual data on the shipped bundle: every refusal through the four methods (typed
error naming the cells, genes or column) and through the CLI (one line, exit 2, nothing
written); zero-filled missing genes and non-integer counts, accepted where asked, give the
numbers of the data they stand for."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from scvi_onnx.errors import (
    InputDataError,
    InvalidValuesError,
    MissingColumnError,
    MissingGenesError,
    NonIntegerCountsWarning,
    UnknownCategoryError,
    ZeroLibrarySizeError,
)

from ...conftest import EXAMPLE_H5AD, SHIPPED_BUNDLE
from ..helpers import CPU, all_methods, assert_refused, cli, raises, scoring_methods


def _gene_col(q, gene: str) -> int:
    return int(q.var_names.get_loc(gene))


def _with_x(q, fn):
    a = q.copy()
    x = a.X.toarray()
    fn(x, a)
    a.X = sp.csr_matrix(x)
    return a


def _case_missing_genes(q, genes):
    return q[:, [g for g in q.var_names if g not in set(genes[:30])]].copy(), [
        "30 of the model's 2000 genes are missing",
        repr(genes[0]),
        repr(genes[9]),
        'missing_genes="zero"',
    ]


def _case_zero_genes(q, genes):
    return q[:, []].copy(), ["none of the model's 2000 genes", "identifiers may differ"]


def _case_duplicated_var_names(q, genes):
    a = q.copy()
    names = list(a.var_names)
    j = names.index(genes[3])
    names[j + 1 if j + 1 < len(names) else j - 1] = genes[3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        a.var_names = names
    return a, ["duplicated", repr(genes[3]), "var_names_make_unique"]


def _case_nan(q, genes):
    def f(x, a):
        x[3, _gene_col(a, genes[0])] = np.nan

    return _with_x(q, f), ["NaN", repr(q.obs_names[3]), "clean"]


def _case_inf(q, genes):
    def f(x, a):
        x[5, _gene_col(a, genes[1])] = np.inf

    return _with_x(q, f), ["infinite", repr(q.obs_names[5]), "clean"]


def _case_negative(q, genes):
    def f(x, a):
        x[7, _gene_col(a, genes[2])] = -2.0

    return _with_x(q, f), ["negative", repr(q.obs_names[7]), "raw non-negative counts"]


def _case_empty(q, genes):
    return q[:0].copy(), ["0 cells", "at least one cell"]


def _case_zero_library(q, genes):
    def f(x, a):
        x[[2, 5]] = 0.0

    return _with_x(q, f), [
        "2 cells",
        "zero total counts",
        repr(q.obs_names[2]),
        repr(q.obs_names[5]),
        "filter",
    ]


def _case_zero_library_over_model_genes(q, genes):
    # counts only in genes the model ignores: the library over the model's genes is zero
    def f(x, a):
        cols = [_gene_col(a, g) for g in genes]
        x[11, cols] = 0.0

    a = _with_x(q, f)
    assert a.X[11].sum() > 0
    return a, ["1 cell", "zero total counts over the model's genes", repr(q.obs_names[11])]


def _case_no_batch_column(q, genes):
    a = q.copy()
    del a.obs["batch"]
    return a, ["no column 'batch'", "Add the column"]


def _case_unseen_batch(q, genes):
    a = q.copy()
    a.obs["batch"] = a.obs["batch"].astype(str)
    a.obs.iloc[4, a.obs.columns.get_loc("batch")] = "pbmc_99k"
    return a, ["'pbmc_99k'", "never seen in training", "'pbmc_5k', 'pbmc_10k'", "1 cell"]


def _case_float_batch(q, genes):
    a = q.copy()
    a.obs["batch"] = np.full(a.n_obs, 1.5)
    return a, ["'batch'", "1.5", "never seen in training"]


def _case_int_coded_batch(q, genes):
    # codes instead of names: 1 is not "pbmc_10k", refused rather than silently mapped
    a = q.copy()
    a.obs["batch"] = np.ones(a.n_obs, dtype=np.int64)
    return a, ["'batch'", "never seen in training", "200 cells"]


def _case_nan_batch(q, genes):
    a = q.copy()
    a.obs["batch"] = a.obs["batch"].astype(object)
    a.obs.iloc[6, a.obs.columns.get_loc("batch")] = np.nan
    return a, ["'batch'", "NaN", "1 cell"]


BAD_DATA = {
    "missing-genes": (_case_missing_genes, MissingGenesError),
    "zero-genes": (_case_zero_genes, MissingGenesError),
    "duplicated-var-names": (_case_duplicated_var_names, InputDataError),
    "nan": (_case_nan, InvalidValuesError),
    "inf": (_case_inf, InvalidValuesError),
    "negative": (_case_negative, InvalidValuesError),
    "empty": (_case_empty, InputDataError),
    "zero-library": (_case_zero_library, ZeroLibrarySizeError),
    "zero-library-over-model-genes": (_case_zero_library_over_model_genes, ZeroLibrarySizeError),
    "no-batch-column": (_case_no_batch_column, MissingColumnError),
    "unseen-batch": (_case_unseen_batch, UnknownCategoryError),
    "float-batch": (_case_float_batch, UnknownCategoryError),
    "int-coded-batch": (_case_int_coded_batch, UnknownCategoryError),
    "nan-batch": (_case_nan_batch, UnknownCategoryError),
}


#: Cases the shipped model's latent space does not depend on: its encoder does not take the
#: batch (encode_covariates=False), so the latent space is computed (as scvi-tools' zero-shot
#: query model does) and only the scoring methods, whose decoder takes the batch, refuse.
LATENT_FREE = {"no-batch-column", "unseen-batch", "float-batch", "int-coded-batch", "nan-batch"}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_python_api(model, query, case):
    build, exc_type = BAD_DATA[case]
    adata, needles = build(query, model.genes)
    methods = scoring_methods if case in LATENT_FREE else all_methods
    for call in methods(model, adata):
        raises(exc_type, call, *needles)
    for call in methods(model, adata, batch_size=7):
        raises(exc_type, call, *needles)
    if case in LATENT_FREE:
        np.testing.assert_array_equal(
            model.get_latent_representation(adata, batch_size=7),
            model.get_latent_representation(query),
        )


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, query, model):
    d = tmp_path_factory.mktemp("bad_files")
    files = {}
    for case, (build, _) in BAD_DATA.items():
        adata, needles = build(query, model.genes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adata.write_h5ad(d / f"{case}.h5ad")
        files[case] = (d / f"{case}.h5ad", needles)
    return files


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_cli(capsys, out_dir, bad_files, case):
    path, needles = bad_files[case]
    # the CLI names its flags where the library names keywords
    needles = [n.replace('missing_genes="zero"', "--missing-genes zero") for n in needles]
    latent = [
        ["latent", SHIPPED_BUNDLE, path, "-o", out_dir / "z.h5ad"],  # read into memory
        ["latent", SHIPPED_BUNDLE, path, "-o", out_dir / "z.csv", "--batch-size", 7],  # backed
    ]
    commands = [
        ["elbo", SHIPPED_BUNDLE, path, "--per-cell", out_dir / "e.npy"],
        ["reconstruction-error", SHIPPED_BUNDLE, path, "--json"],
        ["marginal-ll", SHIPPED_BUNDLE, path, "--n-mc-samples", 3, "--per-cell", out_dir / "m.csv"],
    ]
    if case not in LATENT_FREE:
        commands = latent + commands
    for argv in commands:
        assert_refused(cli(capsys, *argv, *CPU), *needles)
    assert list(out_dir.iterdir()) == []


def _zeroed(q, genes, dropped):
    """``q`` on the model's genes with the counts of ``dropped`` set to zero."""
    x = q[:, list(genes)].X.toarray()
    x[:, [list(genes).index(g) for g in dropped]] = 0
    return ad.AnnData(sp.csr_matrix(x), obs=q.obs.copy(), var=q.var.loc[list(genes)].copy())


def test_missing_genes_zero_fill_is_opt_in(capsys, out_dir, model, query, bad_files):
    path, _ = bad_files["missing-genes"]
    adata = ad.read_h5ad(path)
    z = model.get_latent_representation(adata, missing_genes="zero")
    # the same numbers as the query with those genes' counts set to zero (the filled values)
    zeroed = _zeroed(query, model.genes, model.genes[:30])
    np.testing.assert_array_equal(z, model.get_latent_representation(zeroed))
    np.testing.assert_array_equal(
        model.get_elbo(adata, missing_genes="zero", return_mean=False),
        model.get_elbo(zeroed, return_mean=False),
    )
    assert not np.array_equal(z, model.get_latent_representation(query))
    code, _, err = cli(
        capsys, "latent", SHIPPED_BUNDLE, path, "-o", out_dir / "z.npy", "--missing-genes", "zero"
    )
    assert code == 0, err
    np.testing.assert_array_equal(np.load(out_dir / "z.npy"), z)
    # zero-filling is not a licence to score data that shares almost no genes with the model
    path, _ = bad_files["zero-genes"]
    raises(
        MissingGenesError,
        lambda: model.get_elbo(ad.read_h5ad(path), missing_genes="zero", min_gene_overlap=0),
        "identifiers may differ",
    )


def _value(res):
    return res["reconstruction_loss"] if isinstance(res, dict) else res


def test_non_integer_counts_accepted_with_exactly_one_warning(capsys, tmp_path, model, query):
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonIntegerCountsWarning)
        model.get_elbo(query)  # integer-valued float32 counts: no warning

    frac = query.copy()
    frac.X = frac.X * np.float32(1.5)
    x = frac[:, list(model.genes)].X.toarray()
    nonint = x != np.floor(x)
    n_values, n_cells = int(nonint.sum()), int(nonint.any(axis=1).sum())
    assert n_values > 0
    # the values are scored as they are: the numbers of the same counts held densely in
    # float64, not those of the counts rounded down
    dense = frac.copy()
    dense.X = frac.X.toarray().astype(np.float64)
    floored = frac.copy()
    floored.X = frac.X.floor()
    calls = zip(
        all_methods(model, frac, batch_size=13),
        all_methods(model, dense, batch_size=13),
        all_methods(model, floored, batch_size=13),
        strict=True,
    )
    for call, on_dense, on_floored in calls:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = call()
        ours = [w for w in caught if issubclass(w.category, NonIntegerCountsWarning)]
        assert len(ours) == 1, [str(w.message) for w in caught]
        assert f"{n_values} non-integer value(s) in {n_cells} cells" in str(ours[0].message)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NonIntegerCountsWarning)
            np.testing.assert_array_equal(_value(res), _value(on_dense()))
            assert not np.array_equal(_value(res), _value(on_floored()))

    path = tmp_path / "frac.h5ad"
    frac.write_h5ad(path)
    code, out, err = cli(capsys, "elbo", SHIPPED_BUNDLE, path, *CPU)
    assert code == 0 and out.startswith("elbo: ")
    # one warning line, then the success summary line
    lines = err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("scvi-onnx: warning: "), err
    assert lines[1].startswith("scvi-onnx: elbo (mean "), err
    assert f"{n_values} non-integer" in lines[0]


def test_not_anndata_is_a_typed_error(model, tmp_path):
    for data in (str(tmp_path / "missing.h5ad"), str(EXAMPLE_H5AD), np.ones((3, 2000))):
        for call in all_methods(model, data):
            raises(InputDataError, call, "anndata.read_h5ad")
