"""VAE (scvi-tools' module of SCVI) on the shipped bundle."""

from __future__ import annotations

import json

import numpy as np
import pytest

import scvi_onnx

from ...conftest import SHIPPED_BUNDLE


def test_wrong_array_shape_refused_at_load(tmp_path):
    import shutil

    from scvi_onnx import bundle as B

    b = tmp_path / "b"
    shutil.copytree(SHIPPED_BUNDLE, b)
    arrays = dict(np.load(b / B.ARRAYS_FILE))
    arrays[B.ARR_PX_R] = arrays[B.ARR_PX_R][:-1]
    np.savez(b / B.ARRAYS_FILE, **arrays)
    man = json.loads((b / B.MANIFEST_FILE).read_text())
    man["files"][B.ARRAYS_FILE] = B.sha256_file(b / B.ARRAYS_FILE)
    (b / B.MANIFEST_FILE).write_text(json.dumps(man))
    with pytest.raises(scvi_onnx.BundleIntegrityError, match="px_r has shape"):
        scvi_onnx.load(b, device="cpu")
