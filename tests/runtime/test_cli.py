"""The ``scvi-onnx`` command line: outputs equal the Python API, errors are one line, exit 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import scvi_onnx
from scvi_onnx import bundle as B
from scvi_onnx.cli import main

from ..conftest import EXAMPLE_H5AD, MODELS, SHIPPED_BUNDLE

BUNDLE = str(SHIPPED_BUNDLE)
QUERY = str(EXAMPLE_H5AD)
CPU = ["--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def model():
    return scvi_onnx.load(SHIPPED_BUNDLE, device="cpu")


@pytest.fixture(scope="module")
def query():
    return ad.read_h5ad(EXAMPLE_H5AD)


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, query, model):
    """Input files the CLI must refuse: not an h5ad, missing genes, an unseen batch."""
    d = tmp_path_factory.mktemp("bad_inputs")
    text = d / "text.h5ad"
    text.write_text("cell,gene\nc1,3\n")
    keep = [g for g in query.var_names if g not in set(model.genes[:50])]
    query[:, keep].copy().write_h5ad(d / "missing_genes.h5ad")
    unseen = query.copy()
    unseen.obs["batch"] = unseen.obs["batch"].astype(str)
    unseen.obs.iloc[:3, unseen.obs.columns.get_loc("batch")] = "pbmc_99k"
    unseen.write_h5ad(d / "unknown_batch.h5ad")
    return d


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_error(code: int, out: str, err: str) -> None:
    assert code == 2, (out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("scvi-onnx: error: "), err
    assert out == ""


def _tamper_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(SHIPPED_BUNDLE, copy)
    return copy


# ----------------------------------------------------------------------------- help, version
def test_help_and_version(capsys):
    code, out, _ = _run(capsys, "--help")
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
    code, out, _ = _run(capsys, "latent", "--help")
    assert code == 0 and "--return-dist" in out and "--missing-genes" in out
    code, out, _ = _run(capsys, "--version")
    assert code == 0 and out.strip() == f"scvi-onnx {scvi_onnx.__version__}"
    code, out, err = _run(capsys)
    _assert_one_error(code, out, err)


# ----------------------------------------------------------------------------- latent
@pytest.mark.parametrize("suffix", [".h5ad", ".npy", ".csv"])
def test_latent_outputs_equal_api(capsys, tmp_path, model, query, suffix):
    out = tmp_path / f"z{suffix}"
    code, stdout, err = _run(capsys, "latent", BUNDLE, QUERY, "-o", out, *CPU)
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
    code, _, err = _run(capsys, "latent", BUNDLE, QUERY, "-o", out, "--return-dist", "--key", "Z")
    assert code == 0, err
    got = ad.read_h5ad(out)
    m, v = model.get_latent_representation(query, return_dist=True)
    np.testing.assert_array_equal(got.obsm["Z"], m)
    np.testing.assert_array_equal(got.obsm["Z_var"], v)

    out = tmp_path / "s.npy"
    code, _, err = _run(capsys, "latent", BUNDLE, QUERY, "-o", out, "--sample", "--seed", 3, *CPU)
    assert code == 0, err
    want = model.get_latent_representation(query, give_mean=False, seed=3)
    np.testing.assert_array_equal(np.load(out), want)

    code, out, err = _run(
        capsys, "latent", BUNDLE, QUERY, "-o", tmp_path / "d.npy", "--return-dist"
    )
    _assert_one_error(code, out, err)


def test_latent_overwrite(capsys, tmp_path, model, query):
    out = tmp_path / "z.npy"
    out.write_bytes(b"old")
    code, stdout, err = _run(capsys, "latent", BUNDLE, QUERY, "-o", out, *CPU)
    _assert_one_error(code, stdout, err)
    assert out.read_bytes() == b"old"
    code, _, err = _run(capsys, "latent", BUNDLE, QUERY, "-o", out, "--overwrite", *CPU)
    assert code == 0, err
    np.testing.assert_array_equal(np.load(out), model.get_latent_representation(query))


def test_failed_write_leaves_nothing(capsys, tmp_path, monkeypatch):
    def broken_write(self, filename, *args, **kwargs):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device", str(filename))

    monkeypatch.setattr(ad.AnnData, "write_h5ad", broken_write)
    code, out, err = _run(capsys, "latent", BUNDLE, QUERY, "-o", tmp_path / "z.h5ad", *CPU)
    _assert_one_error(code, out, err)
    assert "No space left on device" in err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- metrics
def test_metric_lines_equal_api(capsys, model, query):
    code, out, err = _run(capsys, "elbo", BUNDLE, QUERY, *CPU)
    assert code == 0, err
    name, value = out.strip().split(": ")
    assert name == "elbo" and float(value) == pytest.approx(model.get_elbo(query), abs=1e-4)

    code, out, err = _run(capsys, "reconstruction-error", BUNDLE, QUERY, "--seed", 5, *CPU)
    assert code == 0, err
    name, value = out.strip().split(": ")
    want = model.get_reconstruction_error(query, seed=5)["reconstruction_loss"]
    assert name == "reconstruction_loss" and float(value) == pytest.approx(want, abs=1e-4)

    code, out, err = _run(capsys, "marginal-ll", BUNDLE, QUERY, "--n-mc-samples", 10, *CPU)
    assert code == 0, err
    name, value = out.strip().split(": ")
    want = model.get_marginal_ll(query, n_mc_samples=10)
    assert name == "marginal_ll" and float(value) == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize(
    ("command", "extra", "api"),
    [
        ("elbo", [], lambda m, a: m.get_elbo(a, seed=7)),
        (
            "reconstruction-error",
            [],
            lambda m, a: m.get_reconstruction_error(a, seed=7)["reconstruction_loss"],
        ),
        (
            "marginal-ll",
            ["--n-mc-samples", "10", "--batch-size", "64"],
            lambda m, a: m.get_marginal_ll(a, n_mc_samples=10, batch_size=64, seed=7),
        ),
    ],
)
def test_metric_json_and_per_cell(capsys, tmp_path, model, query, command, extra, api):
    code, out, err = _run(capsys, command, BUNDLE, QUERY, "--json", "--seed", 7, *extra, *CPU)
    assert code == 0, err
    res = json.loads(out)
    assert {"metric", "value", "n_cells", "bundle", "provider", "seed"} <= set(res)
    assert res["n_cells"] == query.n_obs and res["seed"] == 7
    assert res["provider"] == "CPUExecutionProvider"
    want = api(model, query)
    assert res["value"] == want

    # --per-cell: same printed value, per-cell values as the API's return_mean=False
    per_cell = tmp_path / "cells.csv"
    code, out, err = _run(
        capsys, command, BUNDLE, QUERY, "--json", "--seed", 7, *extra, "--per-cell", per_cell, *CPU
    )
    assert code == 0, err
    assert json.loads(out)["value"] == pytest.approx(want, rel=1e-12)
    df = pd.read_csv(per_cell, index_col=0)
    assert list(df.index) == list(query.obs_names) and list(df.columns) == [res["metric"]]
    npy = tmp_path / "cells.npy"
    code, _, err = _run(
        capsys, command, BUNDLE, QUERY, "--seed", 7, *extra, "--per-cell", npy, *CPU
    )
    assert code == 0, err
    cells = np.load(npy)
    np.testing.assert_allclose(df.iloc[:, 0].to_numpy(), cells, rtol=1e-12)
    assert cells.shape == (query.n_obs,)
    if command == "elbo":
        np.testing.assert_array_equal(cells, model.get_elbo(query, return_mean=False, seed=7))
    else:
        assert np.isfinite(cells).all()


def test_non_integer_counts_warning_is_one_line(capsys, tmp_path, query):
    a = query.copy()
    a.X = a.X.astype(np.float32) * 1.5
    path = tmp_path / "frac.h5ad"
    a.write_h5ad(path)
    code, out, err = _run(capsys, "elbo", BUNDLE, path, *CPU)
    assert code == 0, err
    assert out.startswith("elbo: ")
    # one warning line, then the success summary line
    lines = err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("scvi-onnx: warning: "), err
    assert lines[1].startswith("scvi-onnx: elbo (mean "), err
    assert "non-integer" in lines[0]


# ----------------------------------------------------------------------------- info, verify
def test_info_text_and_json(capsys):
    code, out, err = _run(capsys, "info", BUNDLE)
    assert code == 0, err
    assert "SCVI" in out and "2000" in out and "MALAT1" in out
    assert "pbmc_5k" in out and "zinb" in out and "opset 17" in out
    assert "decoder.onnx" in out and "sha256 ok" in out
    code, out, err = _run(capsys, "info", BUNDLE, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["model_class"] == "SCVI" and info["n_genes"] == 2000 and len(info["genes"]) == 2000
    assert info["n_latent"] == 10 and info["batch"]["key"] == "batch"
    assert info["versions"]["opset"] == 17 and info["checksums_ok"] is True
    assert {f["name"] for f in info["files"]} >= {"encoder.onnx", "decoder.onnx", "probes.npz"}


def test_verify_passes_on_shipped_bundle(capsys):
    code, out, err = _run(capsys, "verify", BUNDLE, "--device", "cpu")
    assert code == 0, err
    assert "PASS" in out and "FAIL" not in out
    code, out, _ = _run(capsys, "verify", BUNDLE, "--device", "cpu", "--json")
    assert code == 0 and json.loads(out)["ok"] is True


def test_verify_fails_on_altered_probes(capsys, tmp_path):
    copy = _tamper_copy(tmp_path)
    probes = B.load_npz(copy / B.PROBES_FILE)
    probes["enc_out.qz_m"] = probes["enc_out.qz_m"] * np.float32(1.1)
    with open(copy / B.PROBES_FILE, "wb") as f:
        np.savez_compressed(f, **probes)
    man = json.loads((copy / B.MANIFEST_FILE).read_text())
    man["files"][B.PROBES_FILE] = B.sha256_file(copy / B.PROBES_FILE)
    (copy / B.MANIFEST_FILE).write_text(json.dumps(man))
    code, out, err = _run(capsys, "verify", copy, "--device", "cpu")
    assert code == 1, err
    assert "encoder.qz_m" in out and "FAIL" in out
    code, out, _ = _run(capsys, "verify", copy, "--device", "cpu", "--json")
    assert code == 1 and json.loads(out)["ok"] is False


# ----------------------------------------------------------------------------- bad inputs
@pytest.fixture()
def tampered(tmp_path_factory):
    copy = _tamper_copy(tmp_path_factory.mktemp("tampered"))
    data = bytearray((copy / B.DECODER_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / B.DECODER_FILE).write_bytes(bytes(data))
    return copy


@pytest.mark.parametrize(
    ("case", "suffix"),
    [
        ("missing input", ".csv"),
        ("text file", ".npy"),
        ("not a bundle", ".csv"),
        ("tampered bundle", ".h5ad"),
        ("missing genes", ".csv"),
        ("bad extension", ".txt"),
        ("negative batch size", ".csv"),
        ("zero mc samples", ".csv"),
    ],
)
def test_bad_inputs_one_line_exit_2(capsys, tmp_path, bad_inputs, tampered, case, suffix):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / f"z{suffix}"
    bundle, data, extra = BUNDLE, QUERY, []
    if case == "missing input":
        data = tmp_path / "nope.h5ad"
    elif case == "text file":
        data = bad_inputs / "text.h5ad"
    elif case == "not a bundle":
        bundle = MODELS / "example"
    elif case == "tampered bundle":
        bundle = tampered
    elif case == "missing genes":
        data = bad_inputs / "missing_genes.h5ad"
    elif case == "negative batch size":
        extra = ["--batch-size", "-5"]
    elif case == "zero mc samples":
        extra = ["--mc-samples", "0"]
    code, stdout, err = _run(capsys, "latent", bundle, data, "-o", out, *extra, *CPU)
    _assert_one_error(code, stdout, err)
    assert list(out_dir.iterdir()) == []


def test_bad_inputs_of_metric_commands(capsys, tmp_path, bad_inputs, tampered):
    per_cell = tmp_path / "cells.csv"
    cases = [
        ("elbo", BUNDLE, bad_inputs / "missing_genes.h5ad"),
        ("reconstruction-error", BUNDLE, bad_inputs / "unknown_batch.h5ad"),
        ("marginal-ll", tampered, QUERY),
        ("elbo", BUNDLE, bad_inputs / "text.h5ad"),
    ]
    for command, bundle, data in cases:
        code, out, err = _run(capsys, command, bundle, data, "--per-cell", per_cell, *CPU)
        _assert_one_error(code, out, err)
    assert list(tmp_path.iterdir()) == []
    code, out, err = _run(capsys, "elbo", BUNDLE, QUERY, "--per-cell", tmp_path / "c.parquet")
    _assert_one_error(code, out, err)
    code, out, err = _run(capsys, "verify", tampered)
    _assert_one_error(code, out, err)
    assert "decoder.onnx" in err
    code, out, err = _run(capsys, "info", tmp_path / "nothing")
    _assert_one_error(code, out, err)


def test_missing_genes_zero_fills(capsys, tmp_path, bad_inputs):
    out = tmp_path / "z.npy"
    data = bad_inputs / "missing_genes.h5ad"
    code, _, err = _run(capsys, "latent", BUNDLE, data, "-o", out, "--missing-genes", "zero", *CPU)
    assert code == 0, err
    assert np.load(out).shape == (200, 10)


def test_debug_shows_traceback(capsys, tmp_path):
    with pytest.raises(scvi_onnx.BundleError):
        main(["--debug", "latent", str(tmp_path), QUERY, "-o", str(tmp_path / "z.npy")])


# ----------------------------------------------------------------------------- subprocess
def _console_script() -> list[str]:
    exe = Path(sys.executable).with_name("scvi-onnx")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "scvi_onnx"]


def test_console_script_latent_end_to_end(tmp_path, model, query):
    out = tmp_path / "z.csv"
    res = subprocess.run(
        [*_console_script(), "latent", BUNDLE, QUERY, "-o", str(out), "--device", "cpu"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == ""
    df = pd.read_csv(out, index_col=0)
    np.testing.assert_array_equal(
        df.to_numpy().astype(np.float32), model.get_latent_representation(query)
    )
    res = subprocess.run(
        [sys.executable, "-m", "scvi_onnx", "latent", BUNDLE, QUERY, "-o", str(out)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        f"scvi-onnx: error: output {out} exists; pass --overwrite to replace it"
    ]


# ----------------------------------------------------------------------------- export
def test_export_writes_a_loadable_bundle(capsys, tmp_path, query):
    pytest.importorskip("torch")
    pytest.importorskip("scvi")
    pytest.importorskip("onnx")
    out = tmp_path / "bundle"
    code, stdout, err = _run(capsys, "export", MODELS / "pbmc_scvi_torch", out)
    assert code == 0, err
    assert stdout.startswith(f"wrote bundle {out}")
    m = scvi_onnx.load(out, device="cpu")
    assert m.manifest.model_class == "SCVI" and len(m.genes) == 2000
    shipped = scvi_onnx.load(SHIPPED_BUNDLE, device="cpu")
    np.testing.assert_allclose(
        m.get_latent_representation(query), shipped.get_latent_representation(query), atol=1e-4
    )
    code, stdout, err = _run(capsys, "export", MODELS / "pbmc_scvi_torch", out)
    _assert_one_error(code, stdout, err)


BLOCK_TORCH = textwrap.dedent(
    """
    import sys

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "torch":
                raise ImportError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Block())
    from scvi_onnx.cli import main

    sys.exit(main(["export", sys.argv[1], sys.argv[2]]))
    """
)


def test_export_without_extra_gives_pip_hint(tmp_path):
    out = tmp_path / "bundle"
    res = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH, str(MODELS / "pbmc_scvi_torch"), str(out)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("scvi-onnx: error: ")
    assert "pip install 'scvi-onnx[export]'" in lines[0]
    assert res.stdout == ""
    assert not out.exists()


def test_missing_genes_zero_fill_reports_overlap(tmp_path, capsys):
    import anndata as ad

    import scvi_onnx
    from scvi_onnx.cli import main

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
