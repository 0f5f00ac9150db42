"""A new user's first hour with their own files: counts in a layer, genes named by another
identifier, a missing or unseen obs column, a value error, and what the CLI says on success."""

from __future__ import annotations

import json
import logging
import warnings

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import scvi_onnx
from scvi_onnx.cli import main
from scvi_onnx.errors import (
    InvalidArgumentError,
    InvalidValuesError,
    MissingColumnError,
    MissingGenesError,
    NonIntegerCountsWarning,
    UnknownCategoryError,
)

from ..conftest import EXAMPLE_H5AD, SHIPPED_BUNDLE

CPU = ["--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def model():
    return scvi_onnx.load(SHIPPED_BUNDLE, device="cpu")


@pytest.fixture(scope="module")
def query():
    return ad.read_h5ad(EXAMPLE_H5AD)


@pytest.fixture(scope="module")
def reference(model, query):
    return {
        "latent": model.get_latent_representation(query),
        "elbo": model.get_elbo(query, return_mean=False),
    }


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---- counts in a layer ---------------------------------------------------------------------
def test_counts_in_a_layer(model, query, reference):
    """X holds normalised values, the counts are in a layer: layer= reads them, and the
    non-integer warning names that layer and the option."""
    a = query.copy()
    a.layers["raw_counts"] = a.X.copy()
    a.X = sp.csr_matrix(np.log1p(a.X.toarray()) / 3)
    with pytest.warns(NonIntegerCountsWarning, match=r"layers\['raw_counts'\].*layer='raw_counts'"):
        model.get_elbo(a)
    np.testing.assert_array_equal(
        model.get_elbo(a, return_mean=False, layer="raw_counts"), reference["elbo"]
    )
    np.testing.assert_array_equal(
        model.get_latent_representation(a, layer="raw_counts"), reference["latent"]
    )
    with pytest.raises(MissingColumnError, match="no layer 'counts'.*raw_counts"):
        model.get_latent_representation(a, layer="counts")


def test_cli_layer(capsys, tmp_path, query, reference):
    a = query.copy()
    a.layers["raw_counts"] = a.X.copy()
    a.X = a.X * 0.5
    f = tmp_path / "layered.h5ad"
    a.write_h5ad(f)
    code, out, err = _cli(
        capsys, "elbo", SHIPPED_BUNDLE, f, "--layer", "raw_counts", "--json", *CPU
    )
    assert code == 0, err
    res = json.loads(out)
    assert res["value"] == pytest.approx(float(reference["elbo"].mean()), rel=1e-12)
    assert res["layer"] == "raw_counts"


# ---- genes by another identifier ------------------------------------------------------------
@pytest.fixture(scope="module")
def ensembl(query):
    """The query with Ensembl-like IDs as var_names and the symbols in var['feature_name']."""
    a = query.copy()
    a.var["feature_name"] = a.var_names.astype(str)
    a.var_names = [f"ENSG{i:011d}" for i in range(a.n_vars)]
    return a


def test_no_gene_in_common_says_identifiers_may_differ(model, ensembl):
    with pytest.raises(MissingGenesError) as e:
        model.get_latent_representation(ensembl)
    msg = str(e.value)
    assert msg.startswith("none of the model's 2000 genes is in adata.var_names"), msg
    assert "symbols vs Ensembl IDs" in msg and "gene_key='feature_name'" in msg


def test_genes_matched_by_a_var_column(model, ensembl, reference, capsys, tmp_path):
    got = model.get_latent_representation(ensembl, gene_key="feature_name")
    np.testing.assert_array_equal(got, reference["latent"])
    f = tmp_path / "ensembl.h5ad"
    ensembl.write_h5ad(f)
    code, _, err = _cli(
        capsys,
        "latent",
        SHIPPED_BUNDLE,
        f,
        "-o",
        tmp_path / "z.npy",
        "--var-column",
        "feature_name",
        *CPU,
    )
    assert code == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "z.npy"), reference["latent"])
    with pytest.raises(MissingColumnError, match="no column 'symbol'.*feature_name"):
        model.get_latent_representation(ensembl, gene_key="symbol")


# ---- obs columns ----------------------------------------------------------------------------
def test_missing_column_lists_the_categories_the_model_knows(model, query):
    a = query.copy()
    del a.obs["batch"]
    with pytest.raises(MissingColumnError) as e:
        model.get_elbo(a)
    msg = str(e.value)
    assert "'pbmc_5k', 'pbmc_10k'" in msg and "--obs batch=pbmc_5k" in msg


def test_cli_obs_sets_a_column_for_every_cell(capsys, tmp_path, model, query):
    a = query.copy()
    del a.obs["batch"]
    f = tmp_path / "one_sample.h5ad"
    a.write_h5ad(f)
    code, out, err = _cli(
        capsys, "elbo", SHIPPED_BUNDLE, f, "--obs", "batch=pbmc_10k", "--json", *CPU
    )
    assert code == 0, err
    b = query.copy()
    b.obs["batch"] = "pbmc_10k"
    assert json.loads(out)["value"] == pytest.approx(model.get_elbo(b), rel=1e-12)
    code, out, err = _cli(capsys, "elbo", SHIPPED_BUNDLE, f, "--obs", "donor=x", *CPU)
    assert code == 2 and "no obs column 'donor'" in err


def test_unseen_batch_latent_is_computed_and_noted(capsys, tmp_path, model, query, reference):
    """The shipped model's encoder does not take the batch: cells of a new sample embed as
    they would under any batch, and the user is told once how many and why."""
    a = query.copy()
    a.obs["batch"] = "my_new_sample"
    np.testing.assert_array_equal(model.get_latent_representation(a), reference["latent"])
    f = tmp_path / "new.h5ad"
    a.write_h5ad(f)
    out = tmp_path / "z.h5ad"
    code, stdout, err = _cli(capsys, "latent", SHIPPED_BUNDLE, f, "-o", out, *CPU)
    assert code == 0, err
    assert stdout == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    for needle in (str(out), "200 cells", "'my_new_sample'", "does not depend on 'batch'"):
        assert needle in line, (needle, line)
    np.testing.assert_array_equal(ad.read_h5ad(out).obsm["X_scVI"], reference["latent"])


def test_unseen_batch_scoring_refused_then_mapped_and_recorded(capsys, tmp_path, model, query):
    a = query.copy()
    a.obs["batch"] = "my_new_sample"
    with pytest.raises(UnknownCategoryError, match="unseen_as"):
        model.get_reconstruction_error(a)
    with pytest.raises(InvalidArgumentError, match="not a training category"):
        model.get_elbo(a, unseen_as={"batch": "pbmc_99k"})
    with pytest.raises(InvalidArgumentError, match="not a categorical column"):
        model.get_elbo(a, unseen_as={"donor": "x"})
    f = tmp_path / "new.h5ad"
    a.write_h5ad(f)
    code, _, err = _cli(capsys, "elbo", SHIPPED_BUNDLE, f, *CPU)
    assert code == 2 and "--unseen-as batch=" in err and "load_query_data" in err
    code, out, err = _cli(
        capsys, "elbo", SHIPPED_BUNDLE, f, "--unseen-as", "batch=pbmc_10k", "--json", *CPU
    )
    assert code == 0, err
    res = json.loads(out)
    assert res["unseen_as"] == {"batch": "pbmc_10k"}
    assert any("computed as batch='pbmc_10k'" in n for n in res["notes"])
    b = query.copy()
    b.obs["batch"] = "pbmc_10k"
    assert res["value"] == pytest.approx(model.get_elbo(b), rel=1e-12)
    out_h5ad = tmp_path / "z.h5ad"
    code, _, err = _cli(
        capsys, "latent", SHIPPED_BUNDLE, f, "-o", out_h5ad, "--unseen-as", "batch=pbmc_10k", *CPU
    )
    assert code == 0, err
    uns = ad.read_h5ad(out_h5ad).uns["scvi_onnx"]
    assert uns["unseen_as"]["batch"] == "pbmc_10k" and uns["model_class"] == "SCVI"


def test_unseen_categories_are_logged_once(caplog, model, query):
    a = query.copy()
    a.obs["batch"] = "x"
    with caplog.at_level(logging.INFO, logger="scvi_onnx"):
        model.get_latent_representation(a, batch_size=16)
    notes = [r for r in caplog.records if getattr(r, "scvi_onnx_note", None)]
    assert len(notes) == 1 and "200 cells" in notes[0].getMessage()


# ---- values ---------------------------------------------------------------------------------
def test_value_error_says_which_cells_were_checked(model, query):
    a = query.copy()
    x = a.X.toarray()
    x[150, 3] = np.nan
    a.X = x
    with pytest.raises(InvalidValuesError) as e:
        model.get_elbo(a, batch_size=64)
    msg = str(e.value)
    assert "1 cell (found among cells 129-192 of 200" in msg, msg
    assert "were not checked yet" in msg and repr(a.obs_names[150]) in msg


# ---- the CLI's own conventions --------------------------------------------------------------
def test_output_equal_to_input_is_refused(capsys, tmp_path, query):
    f = tmp_path / "q.h5ad"
    query.write_h5ad(f)
    before = f.read_bytes()
    code, _, err = _cli(capsys, "latent", SHIPPED_BUNDLE, f, "-o", f, "--overwrite", *CPU)
    assert code == 2 and "is the input file" in err
    assert f.read_bytes() == before


def test_help_names_every_supported_model_class(capsys):
    from scvi_onnx.models.registry import MODELS

    for argv in (["--help"], ["export", "--help"]):
        assert main(argv) == 0
        out = capsys.readouterr().out.replace("\n", " ")
        for name in MODELS:
            assert name in out, (argv, name)


def test_info_shows_what_a_new_sample_needs(capsys):
    code, out, err = _cli(capsys, "info", SHIPPED_BUNDLE)
    assert code == 0, err
    assert "latent space reads:     no obs column" in out
    assert "scoring also reads:     obs['batch'] (the decoder takes it)" in out
    code, out, _ = _cli(capsys, "info", SHIPPED_BUNDLE, "--json")
    obs = json.loads(out)["obs_inputs"]
    assert obs == {"latent": {}, "scoring_only": {"batch": "the decoder takes it"}, "not_read": []}


def test_public_namespace_is_clean():
    names = dir(scvi_onnx)
    assert "load" in names and "verify" in names
    assert not {"Any", "annotations", "TYPE_CHECKING"} & set(names)


def test_unknown_keyword_argument_is_an_error(model, query):
    with pytest.raises(TypeError, match="batchsize"):
        model.get_elbo(query, batchsize=10)
    with pytest.raises(InvalidArgumentError, match="data_loader_kwargs"):
        model.get_elbo(query, data_loader_kwargs={"num_workers": 2})


def test_every_public_method_documents_its_parameters():
    import inspect

    for cls in (scvi_onnx.OnnxSCVI, scvi_onnx.OnnxLinearSCVI, scvi_onnx.OnnxSCANVI):
        for name, fn in inspect.getmembers(cls, inspect.isfunction):
            if name.startswith("_"):
                continue
            doc = inspect.getdoc(fn) or ""
            params = [p for p in inspect.signature(fn).parameters if p != "self"]
            if params:
                assert "Parameters\n----------" in doc, (cls.__name__, name)
                for p in params:
                    assert p in doc, (cls.__name__, name, p)
    assert "Parameters" in (scvi_onnx.load.__doc__ or "")
    assert "Parameters" in (scvi_onnx.verify.__doc__ or "")


def test_non_integer_warning_without_layer_hint(model, query):
    a = query.copy()
    a.X = a.X * 0.5
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        model.get_elbo(a)
    msgs = [str(r.message) for r in w if issubclass(r.category, NonIntegerCountsWarning)]
    assert len(msgs) == 1 and "layer=" not in msgs[0]
