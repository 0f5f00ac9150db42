"""Helpers of the refusal tests: a refusal is a typed error raised by scvi-onnx's own code whose
message names the offending thing (Python API), or exit status 2 with exactly one
``scvi-onnx: error:`` line on stderr, nothing on stdout and no output file left (CLI)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import scvi_onnx
from scvi_onnx import bundle as B
from scvi_onnx.cli import main
from scvi_onnx.errors import ScviOnnxError

from ..conftest import EXAMPLE_H5AD, SHIPPED_BUNDLE

RUNTIME_DIR = Path(scvi_onnx.__file__).resolve().parent
CPU = ["--device", "cpu", "--no-progress"]


def raises(exc_type, fn, *needles) -> str:
    """``fn()`` raises ``exc_type`` (a ScviOnnxError) from scvi-onnx's code, naming needles."""
    with pytest.raises(exc_type) as ei:
        fn()
    err = ei.value
    assert isinstance(err, ScviOnnxError), type(err)
    origin = Path(str(ei.traceback[-1].path)).resolve()
    assert origin.is_relative_to(RUNTIME_DIR), f"raised from {origin}, not scvi-onnx: {err!r}"
    msg = str(err)
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def cli(capsys, *argv) -> tuple[int, str, str]:
    """Run ``scvi-onnx argv`` in-process: (exit status, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(result, *needles, code=2) -> str:
    status, out, err = result
    assert status == code, (status, out, err)
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("scvi-onnx: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def all_methods(model, adata, **kw):
    """The four methods on ``adata`` (as zero-argument calls)."""
    return [
        lambda: model.get_latent_representation(adata, **kw),
        *scoring_methods(model, adata, **kw),
    ]


def scoring_methods(model, adata, **kw):
    """The three scoring methods on ``adata`` (they read the decoder's covariates too)."""
    return [
        lambda: model.get_elbo(adata, **kw),
        lambda: model.get_reconstruction_error(adata, **kw),
        lambda: model.get_marginal_ll(adata, n_mc_samples=3, **kw),
    ]


# ---- bundle copies ----------------------------------------------------------------------------
def copy_bundle(tmp_path: Path, src: Path = SHIPPED_BUNDLE) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(src, dst)
    return dst


def read_manifest_json(bundle: Path) -> dict:
    return json.loads((bundle / B.MANIFEST_FILE).read_text())


def write_manifest_json(bundle: Path, man: dict) -> None:
    (bundle / B.MANIFEST_FILE).write_text(json.dumps(man))


def reseal(bundle: Path, *names: str) -> None:
    """Recompute the manifest's sha256 of files we rewrote on purpose."""
    man = read_manifest_json(bundle)
    for name in names:
        man["files"][name] = B.sha256_file(bundle / name)
    write_manifest_json(bundle, man)


def flip(p: Path) -> None:
    """Flip one bit in the middle of the file."""
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


def bundle_commands(bundle, out_dir: Path) -> list[list]:
    """CLI commands that must all refuse an unusable bundle."""
    return [
        ["latent", bundle, EXAMPLE_H5AD, "-o", out_dir / "z.h5ad", *CPU],
        ["latent", bundle, EXAMPLE_H5AD, "-o", out_dir / "z.csv", *CPU],
        ["elbo", bundle, EXAMPLE_H5AD, "--per-cell", out_dir / "elbo.npy", *CPU],
        ["marginal-ll", bundle, EXAMPLE_H5AD, "--n-mc-samples", 5, "--per-cell", out_dir / "m.csv"],
        ["verify", bundle, "--device", "cpu"],
    ]


def assert_bundle_refused(capsys, bundle, out_dir, exc_type, *needles) -> None:
    """Python load + verify and every CLI command refuse the bundle, naming the needles."""
    raises(exc_type, lambda: scvi_onnx.load(bundle, device="cpu"), *needles)
    raises(exc_type, lambda: scvi_onnx.verify(bundle, device="cpu"), *needles)
    for argv in bundle_commands(bundle, out_dir):
        assert_refused(cli(capsys, *argv), *needles)
    assert list(out_dir.iterdir()) == []


# ---- results compared bit for bit ------------------------------------------------------------
def results_of(model, adata, **kw) -> dict:
    """Per-cell latent, ELBO and marginal LL (seed 3, 20 samples) of ``adata``."""
    return {
        "latent": model.get_latent_representation(adata, **kw),
        "elbo": model.get_elbo(adata, return_mean=False, seed=3, **kw),
        "mll": model.get_marginal_ll(adata, n_mc_samples=20, return_mean=False, seed=3, **kw),
    }


def assert_same_results(got: dict, want: dict) -> None:
    """Same dtypes and values, bit for bit."""
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
