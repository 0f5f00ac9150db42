"""Cells whose posterior variance is zero or not finite are refused by the scoring methods with
a typed error naming them (scvi-tools refuses them too); healthy posteriors pass untouched.
The real case, a PEAKVI whose variance underflows, is in tests/exporter/test_peakvi_export.py."""

from __future__ import annotations

import numpy as np
import pytest

from scvi_onnx.data import Minibatch
from scvi_onnx.errors import DegeneratePosteriorError, InputDataError
from scvi_onnx.models.base import check_posterior


def _mb(n: int, names=None, first_key: int = 0) -> Minibatch:
    zeros = np.zeros((n, 1), dtype=np.int64)
    return Minibatch(
        x=np.ones((n, 3), dtype=np.float32),
        cells=np.arange(first_key, first_key + n, dtype=np.int64),
        batch=zeros,
        labels=zeros,
        obs_names=names,
        first_key=first_key,
    )


def _enc(qz_v: np.ndarray, ql_v: np.ndarray | None = None) -> dict:
    enc = {"qz_m": np.zeros_like(qz_v), "qz_v": qz_v}
    if ql_v is not None:
        enc["ql_m"], enc["ql_v"] = np.zeros_like(ql_v), ql_v
    return enc


def test_positive_variances_pass():
    v = np.full((4, 3), np.finfo(np.float32).tiny, dtype=np.float32)  # smallest normal > 0
    check_posterior(_enc(v, np.ones((4, 1), np.float32)), _mb(4))


def test_zero_variance_names_the_cells():
    v = np.ones((6, 3), dtype=np.float32)
    v[[1, 4], 2] = 0.0
    names = np.array([f"c{i}" for i in range(6)], dtype=object)
    with pytest.raises(DegeneratePosteriorError) as e:
        check_posterior(_enc(v), _mb(6, names))
    msg = str(e.value)
    assert "qz_v" in msg and "exactly 0" in msg and "2 cells" in msg
    assert "'c1', 'c4'" in msg and "'c0'" not in msg
    assert isinstance(e.value, InputDataError) and isinstance(e.value, ValueError)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -1.0])
def test_non_finite_or_negative_variance_refused(bad):
    v = np.ones((3, 2), dtype=np.float32)
    v[2, 0] = bad
    with pytest.raises(DegeneratePosteriorError, match=r"not a positive finite.*1 cell.*'cell 12'"):
        check_posterior(_enc(v), _mb(3, first_key=10))


def test_learned_library_variance_checked():
    ql_v = np.ones((2, 1), dtype=np.float32)
    ql_v[0, 0] = 0.0
    with pytest.raises(DegeneratePosteriorError, match="ql_v"):
        check_posterior(_enc(np.ones((2, 2), np.float32), ql_v), _mb(2))
