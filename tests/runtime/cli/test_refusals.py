"""CLI refusals: every error is one ``scvi-onnx: error:`` line on stderr, exit status 2, nothing
on stdout and no output file (nor temporary) left."""

from __future__ import annotations

import numpy as np
import pytest

import scvi_onnx
from scvi_onnx import bundle as B
from scvi_onnx.cli import main

from ...conftest import EXAMPLE_H5AD, MODELS, SHIPPED_BUNDLE
from ..helpers import CPU, assert_refused, cli, copy_bundle

BUNDLE = str(SHIPPED_BUNDLE)
QUERY = str(EXAMPLE_H5AD)


# ----------------------------------------------------------------------------- bad inputs
@pytest.fixture()
def tampered(tmp_path_factory):
    copy = copy_bundle(tmp_path_factory.mktemp("tampered"))
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
    code, stdout, err = cli(capsys, "latent", bundle, data, "-o", out, *extra, *CPU)
    assert_refused((code, stdout, err))
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
        code, out, err = cli(capsys, command, bundle, data, "--per-cell", per_cell, *CPU)
        assert_refused((code, out, err))
    assert list(tmp_path.iterdir()) == []
    code, out, err = cli(capsys, "elbo", BUNDLE, QUERY, "--per-cell", tmp_path / "c.parquet")
    assert_refused((code, out, err))
    code, out, err = cli(capsys, "verify", tampered)
    assert_refused((code, out, err))
    assert "decoder.onnx" in err
    code, out, err = cli(capsys, "info", tmp_path / "nothing")
    assert_refused((code, out, err))


def test_debug_shows_traceback(capsys, tmp_path):
    with pytest.raises(scvi_onnx.BundleError):
        main(["--debug", "latent", str(tmp_path), QUERY, "-o", str(tmp_path / "z.npy")])


@pytest.fixture(scope="module")
def unreadable_inputs(tmp_path_factory):
    import h5py

    d = tmp_path_factory.mktemp("unreadable")
    (d / "text.h5ad").write_text("cell,gene\nc1,3\n")
    (d / "empty.h5ad").write_bytes(b"")
    with h5py.File(d / "plain.h5ad", "w") as f:
        f["x"] = np.zeros(3)
    (d / "folder.h5ad").mkdir()
    return d


@pytest.mark.parametrize(
    ("name", "needles"),
    [
        ("nonexistent.h5ad", ["input file not found", "nonexistent.h5ad"]),
        ("text.h5ad", ["cannot read", "text.h5ad", "write_h5ad"]),
        ("empty.h5ad", ["cannot read", "empty.h5ad"]),
        ("plain.h5ad", ["cannot read", "plain.h5ad"]),
        ("folder.h5ad", ["not a file", "folder.h5ad"]),
    ],
)
def test_cli_refuses_unreadable_input(capsys, out_dir, unreadable_inputs, name, needles):
    path = unreadable_inputs / name
    for argv in (
        ["latent", SHIPPED_BUNDLE, path, "-o", out_dir / "z.h5ad"],
        ["latent", SHIPPED_BUNDLE, path, "-o", out_dir / "z.npy"],
        ["elbo", SHIPPED_BUNDLE, path, "--per-cell", out_dir / "e.csv"],
        ["marginal-ll", SHIPPED_BUNDLE, path, "--json"],
    ):
        assert_refused(cli(capsys, *argv, *CPU), *needles)
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize(
    "extra",
    [
        ["--batch-size", "0"],
        ["--batch-size", "-4"],
        ["--batch-size", "x"],
        ["--seed", "1.5"],
        ["--n-mc-samples", "0"],
        ["--n-mc-samples", "-2"],
        ["--device", "tpu"],
        ["--missing-genes", "guess"],
    ],
)
def test_cli_refuses_bad_arguments(capsys, out_dir, extra):
    argv = ["marginal-ll", SHIPPED_BUNDLE, EXAMPLE_H5AD, "--per-cell", out_dir / "m.csv", *extra]
    assert_refused(cli(capsys, *argv), extra[0])
    if extra[0] != "--n-mc-samples":
        argv = ["latent", SHIPPED_BUNDLE, EXAMPLE_H5AD, "-o", out_dir / "z.csv", *extra]
        assert_refused(cli(capsys, *argv), extra[0])
    assert list(out_dir.iterdir()) == []
