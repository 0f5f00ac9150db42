"""resolve_indices, and the four methods' refusals of bad indices."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from scvi_onnx.data import resolve_indices
from scvi_onnx.errors import InvalidArgumentError

from ..helpers import all_methods, raises


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


# ---- the four methods -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("indices", "needles"),
    [
        ([0, 200], ["out of range", "0..199", "200"]),
        ([5, 10**12], ["out of range", "1000000000000"]),
        ([-1, 3], ["negative", "-1"]),
        ([5, 9, 5], ["more than once", "5"]),
        ([1.5, 2], ["non-integer", "1.5"]),
        (np.ones(199, dtype=bool), ["length 199", "200 cells"]),
        (np.zeros(200, dtype=bool), ["all False"]),
        ([], ["empty"]),
        (["AAACCCAAGGCCCAAA-1-pbmc_10k"], ["obs_names.get_indexer"]),
        (3, ["scalar", "[3]"]),
    ],
    ids=[
        "too-large",
        "huge",
        "negative",
        "duplicated",
        "float",
        "mask-length",
        "mask-empty",
        "empty",
        "names",
        "scalar",
    ],
)
def test_bad_indices(model, query, indices, needles):
    for call in all_methods(model, query, indices=indices):
        raises(InvalidArgumentError, call, *needles)
