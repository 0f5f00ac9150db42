"""The installed console script and ``python -m scvi_onnx`` in a subprocess; ``export`` with and
without the export extra."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

import scvi_onnx

from ...conftest import EXAMPLE_H5AD, MODELS, SHIPPED_BUNDLE, require
from ..helpers import assert_refused, cli

BUNDLE = str(SHIPPED_BUNDLE)
QUERY = str(EXAMPLE_H5AD)


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
    for name in ("torch", "scvi", "onnx"):
        require(name)
    out = tmp_path / "bundle"
    code, stdout, err = cli(capsys, "export", MODELS / "pbmc_scvi_torch", out)
    assert code == 0, err
    assert stdout.startswith(f"wrote bundle {out}")
    assert "(SCVI, 2000 genes, n_latent=" in stdout
    m = scvi_onnx.load(out, device="cpu")
    assert m.manifest.model_class == "SCVI" and len(m.genes) == 2000
    shipped = scvi_onnx.load(SHIPPED_BUNDLE, device="cpu")
    np.testing.assert_allclose(
        m.get_latent_representation(query), shipped.get_latent_representation(query), atol=1e-4
    )
    code, stdout, err = cli(capsys, "export", MODELS / "pbmc_scvi_torch", out)
    assert_refused((code, stdout, err))
    # the validation tolerance: recorded in the manifest; a bad value refused before any work
    code, stdout, err = cli(
        capsys, "export", MODELS / "pbmc_scvi_torch", out, "--overwrite", "--rtol", "1e-3"
    )
    assert code == 0, err
    assert "rtol=0.001" in stdout and scvi_onnx.load(out).manifest.validation["rtol"] == 1e-3
    for bad in ("-1", "inf", "x"):
        code, stdout, err = cli(capsys, "export", MODELS / "pbmc_scvi_torch", out, "--atol", bad)
        assert code == 2 and "--atol" in err, (bad, err)


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
