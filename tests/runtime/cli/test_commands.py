"""The ``scvi-onnx`` commands: outputs equal the Python API's, bit for bit where they are the same
call; metric lines, JSON and per-cell files; info and verify."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import scvi_onnx
from scvi_onnx import bundle as B
from scvi_onnx.cli import main

from ...conftest import EXAMPLE_H5AD, SHIPPED_BUNDLE
from ..helpers import CPU, assert_refused, cli, copy_bundle

BUNDLE = str(SHIPPED_BUNDLE)
QUERY = str(EXAMPLE_H5AD)


# ----------------------------------------------------------------------------- help, version
def test_help_and_version(capsys):
    code, out, _ = cli(capsys, "--help")
    assert code == 0
    for cmd in (
        "export",
        "latent",
        "elbo",
        "reconstruction-error",
        "marginal-ll",
        "info",
        "verify",
    ):
        assert cmd in out
    code, out, _ = cli(capsys, "latent", "--help")
    assert code == 0 and "--return-dist" in out and "--missing-genes" in out
    code, out, _ = cli(capsys, "--version")
    assert code == 0 and out.strip() == f"scvi-onnx {scvi_onnx.__version__}"
    code, out, err = cli(capsys)
    assert_refused((code, out, err))


# ----------------------------------------------------------------------------- latent
@pytest.mark.parametrize("suffix", [".h5ad", ".npy", ".csv"])
def test_latent_outputs_equal_api(capsys, tmp_path, model, query, suffix):
    out = tmp_path / f"z{suffix}"
    code, stdout, err = cli(capsys, "latent", BUNDLE, QUERY, "-o", out, *CPU)
    assert code == 0, err
    assert stdout == ""
    want = model.get_latent_representation(query)
    if suffix == ".h5ad":
        got = ad.read_h5ad(out)
        assert list(got.obs_names) == list(query.obs_names)
        assert got.shape == query.shape
        np.testing.assert_array_equal(got.obsm["X_scVI"], want)
    elif suffix == ".npy":
        np.testing.assert_array_equal(np.load(out), want)
    else:
        df = pd.read_csv(out, index_col=0)
        assert list(df.index) == list(query.obs_names)
        assert list(df.columns) == [f"latent_{i}" for i in range(model.n_latent)]
        np.testing.assert_array_equal(df.to_numpy().astype(np.float32), want)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary left


def test_latent_return_dist_sample_and_key(capsys, tmp_path, model, query):
    out = tmp_path / "z.h5ad"
    code, _, err = cli(capsys, "latent", BUNDLE, QUERY, "-o", out, "--return-dist", "--key", "Z")
    assert code == 0, err
    got = ad.read_h5ad(out)
    m, v = model.get_latent_representation(query, return_dist=True)
    np.testing.assert_array_equal(got.obsm["Z"], m)
    np.testing.assert_array_equal(got.obsm["Z_var"], v)

    out = tmp_path / "s.npy"
    code, _, err = cli(capsys, "latent", BUNDLE, QUERY, "-o", out, "--sample", "--seed", 3, *CPU)
    assert code == 0, err
    want = model.get_latent_representation(query, give_mean=False, seed=3)
    np.testing.assert_array_equal(np.load(out), want)

    code, out, err = cli(capsys, "latent", BUNDLE, QUERY, "-o", tmp_path / "d.npy", "--return-dist")
    assert_refused((code, out, err))


def test_latent_overwrite(capsys, tmp_path, model, query):
    out = tmp_path / "z.npy"
    out.write_bytes(b"old")
    code, stdout, err = cli(capsys, "latent", BUNDLE, QUERY, "-o", out, *CPU)
    assert_refused((code, stdout, err))
    assert out.read_bytes() == b"old"
    code, _, err = cli(capsys, "latent", BUNDLE, QUERY, "-o", out, "--overwrite", *CPU)
    assert code == 0, err
    np.testing.assert_array_equal(np.load(out), model.get_latent_representation(query))


def test_failed_write_leaves_nothing(capsys, tmp_path, monkeypatch):
    def broken_write(self, filename, *args, **kwargs):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device", str(filename))

    monkeypatch.setattr(ad.AnnData, "write_h5ad", broken_write)
    code, out, err = cli(capsys, "latent", BUNDLE, QUERY, "-o", tmp_path / "z.h5ad", *CPU)
    assert_refused((code, out, err))
    assert "No space left on device" in err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- metrics
def test_metric_lines_equal_api(capsys, model, query):
    code, out, err = cli(capsys, "elbo", BUNDLE, QUERY, *CPU)
    assert code == 0, err
    name, value = out.strip().split(": ")
    assert name == "elbo" and float(value) == pytest.approx(model.get_elbo(query), abs=1e-4)

    code, out, err = cli(capsys, "reconstruction-error", BUNDLE, QUERY, "--seed", 5, *CPU)
    assert code == 0, err
    name, value = out.strip().split(": ")
    want = model.get_reconstruction_error(query, seed=5)["reconstruction_loss"]
    assert name == "reconstruction_loss" and float(value) == pytest.approx(want, abs=1e-4)

    code, out, err = cli(capsys, "marginal-ll", BUNDLE, QUERY, "--n-mc-samples", 10, *CPU)
    assert code == 0, err
    name, value = out.strip().split(": ")
    want = model.get_marginal_ll(query, n_mc_samples=10)
    assert name == "marginal_ll" and float(value) == pytest.approx(want, abs=1e-4)
    # what the printed value is, said where it moves with --batch-size
    assert "marginal_ll (mean of per-minibatch means " in err
    code, out, _ = cli(capsys, "marginal-ll", "--help")
    assert "mean of per-minibatch means, which does" in " ".join(out.split())


@pytest.mark.parametrize(
    ("command", "extra", "api"),
    [
        ("elbo", [], lambda m, a, **kw: m.get_elbo(a, seed=7, **kw)),
        (
            "reconstruction-error",
            [],
            lambda m, a, **kw: m.get_reconstruction_error(a, seed=7, **kw)["reconstruction_loss"],
        ),
        (
            "marginal-ll",
            ["--n-mc-samples", "10", "--batch-size", "64"],
            lambda m, a, **kw: m.get_marginal_ll(a, n_mc_samples=10, batch_size=64, seed=7, **kw),
        ),
    ],
)
def test_metric_json_and_per_cell(capsys, tmp_path, model, query, command, extra, api):
    code, out, err = cli(capsys, command, BUNDLE, QUERY, "--json", "--seed", 7, *extra, *CPU)
    assert code == 0, err
    res = json.loads(out)
    assert {"metric", "value", "n_cells", "bundle", "provider", "seed"} <= set(res)
    assert res["n_cells"] == query.n_obs and res["seed"] == 7
    assert res["provider"] == "CPUExecutionProvider"
    want = api(model, query)
    assert res["value"] == want
    if command == "marginal-ll":
        assert res["reduction"] == "mean of per-minibatch means"

    # --per-cell: same printed value, per-cell values as the API's return_mean=False
    per_cell = tmp_path / "cells.csv"
    code, out, err = cli(
        capsys, command, BUNDLE, QUERY, "--json", "--seed", 7, *extra, "--per-cell", per_cell, *CPU
    )
    assert code == 0, err
    assert json.loads(out)["value"] == pytest.approx(want, rel=1e-12)
    df = pd.read_csv(per_cell, index_col=0)
    assert list(df.index) == list(query.obs_names) and list(df.columns) == [res["metric"]]
    npy = tmp_path / "cells.npy"
    code, _, err = cli(capsys, command, BUNDLE, QUERY, "--seed", 7, *extra, "--per-cell", npy, *CPU)
    assert code == 0, err
    cells = np.load(npy)
    np.testing.assert_allclose(df.iloc[:, 0].to_numpy(), cells, rtol=1e-12)
    assert cells.shape == (query.n_obs,)
    # every command's per-cell values are the API's return_mean=False values, bit for bit
    np.testing.assert_array_equal(cells, api(model, query, return_mean=False))


# ----------------------------------------------------------------------------- info, verify
def test_info_text_and_json(capsys):
    code, out, err = cli(capsys, "info", BUNDLE)
    assert code == 0, err
    assert "SCVI" in out and "2000" in out and "MALAT1" in out
    assert "pbmc_5k" in out and "zinb" in out and "opset 17" in out
    assert "decoder.onnx" in out and "sha256 ok" in out
    code, out, err = cli(capsys, "info", BUNDLE, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["model_class"] == "SCVI" and info["n_genes"] == 2000 and len(info["genes"]) == 2000
    assert info["n_latent"] == 10 and info["batch"]["key"] == "batch"
    assert info["versions"]["opset"] == 17 and info["checksums_ok"] is True
    assert {f["name"] for f in info["files"]} >= {"encoder.onnx", "decoder.onnx", "probes.npz"}


def test_info_says_which_likelihood_kernel_runs(capsys, monkeypatch):
    from scvi_onnx.maths import native

    code, out, err = cli(capsys, "info", BUNDLE)
    built = native._library() is not None
    assert ("likelihood kernel compiled" if built else "was not built") in out
    monkeypatch.setenv(native.ENV, "numpy")
    code, out, err = cli(capsys, "info", BUNDLE, "--json")
    assert json.loads(out)["likelihood_kernel"] == "numpy's (SCVI_ONNX_KERNELS=numpy)"


def test_verify_passes_on_shipped_bundle(capsys):
    code, out, err = cli(capsys, "verify", BUNDLE, "--device", "cpu")
    assert code == 0, err
    assert "PASS" in out and "FAIL" not in out
    code, out, _ = cli(capsys, "verify", BUNDLE, "--device", "cpu", "--json")
    assert code == 0 and json.loads(out)["ok"] is True


def test_verify_fails_on_altered_probes(capsys, tmp_path):
    copy = copy_bundle(tmp_path)
    probes = B.load_npz(copy / B.PROBES_FILE)
    probes["enc_out.qz_m"] = probes["enc_out.qz_m"] * np.float32(1.1)
    with open(copy / B.PROBES_FILE, "wb") as f:
        np.savez_compressed(f, **probes)
    man = json.loads((copy / B.MANIFEST_FILE).read_text())
    man["files"][B.PROBES_FILE] = B.sha256_file(copy / B.PROBES_FILE)
    (copy / B.MANIFEST_FILE).write_text(json.dumps(man))
    code, out, err = cli(capsys, "verify", copy, "--device", "cpu")
    assert code == 1, err
    assert "encoder.qz_m" in out and "FAIL" in out
    code, out, _ = cli(capsys, "verify", copy, "--device", "cpu", "--json")
    assert code == 1 and json.loads(out)["ok"] is False


def test_missing_genes_zero_fills(capsys, tmp_path, model, bad_inputs):
    out = tmp_path / "z.npy"
    data = bad_inputs / "missing_genes.h5ad"
    code, _, err = cli(capsys, "latent", BUNDLE, data, "-o", out, "--missing-genes", "zero", *CPU)
    assert code == 0, err
    z = np.load(out)
    assert z.shape == (200, 10)
    want = model.get_latent_representation(ad.read_h5ad(data), missing_genes="zero")
    np.testing.assert_array_equal(z, want)


def test_missing_genes_zero_fill_reports_overlap(tmp_path, capsys):
    import anndata as ad

    import scvi_onnx

    from ..conftest import EXAMPLE_H5AD, SHIPPED_BUNDLE

    a = ad.read_h5ad(EXAMPLE_H5AD)
    m = scvi_onnx.load(SHIPPED_BUNDLE, device="cpu")
    drop = set(list(m.genes)[:150])
    b = a[:, [g for g in a.var_names if g not in drop]].copy()
    path = tmp_path / "q.h5ad"
    b.write_h5ad(path)
    assert main(["elbo", str(SHIPPED_BUNDLE), str(path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "150 of the model's 2000 genes are missing" in err and "--missing-genes zero" in err
    assert (
        main(
            [
                "elbo",
                str(SHIPPED_BUNDLE),
                str(path),
                "--device",
                "cpu",
                "--json",
                "--missing-genes",
                "zero",
            ]
        )
        == 0
    )
    cap = capsys.readouterr()
    assert "1850 of 2000 model genes found (92.5%); 150 filled with zeros" in cap.err
    import json

    want = m.get_elbo(b, missing_genes="zero")
    assert json.loads(cap.out)["value"] == pytest.approx(want)
    c = a[:, [g for g in a.var_names if g not in set(list(m.genes)[:600])]].copy()
    c.write_h5ad(path)
    assert main(["elbo", str(SHIPPED_BUNDLE), str(path), "--missing-genes", "zero"]) == 2
    assert "below --min-gene-overlap 0.8" in capsys.readouterr().err
    assert (
        main(
            [
                "elbo",
                str(SHIPPED_BUNDLE),
                str(path),
                "--missing-genes",
                "zero",
                "--min-gene-overlap",
                "0",
            ]
        )
        == 0
    )
    assert m.gene_overlap(c)["n_found"] == 1400


def test_log_records_with_an_exception_keep_the_traceback():
    """The CLI's log lines are one line each, but a record carrying an exception (a server's
    internal error: `request ... failed`) keeps its traceback: the only place an operator can
    read it (it was dropped, even with --debug)."""
    import logging

    from scvi_onnx.cli.main import _Formatter

    try:
        raise RuntimeError("boom in a worker")
    except RuntimeError:
        import sys

        info = sys.exc_info()
    record = logging.LogRecord("scvi_onnx.serve", logging.ERROR, __file__, 1, "request %s failed",
                               ("abc",), info)  # fmt: skip
    text = _Formatter().format(record)
    assert text.splitlines()[0] == "scvi-onnx: error: request abc failed"
    assert "Traceback" in text and "RuntimeError: boom in a worker" in text
    plain = logging.LogRecord("x", logging.WARNING, __file__, 1, "a\nb", (), None)
    assert "\n" not in _Formatter().format(plain)
