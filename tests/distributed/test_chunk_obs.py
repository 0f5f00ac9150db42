"""How a chunk's obs travel in the task graph (``ChunkObs``): the worker's frame equals the
client's slice, and a chunk carries no categories and no Python string per cell."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest

from ..conftest import require

require("dask")

from scvi_onnx.distributed.chunks import ChunkObs  # noqa: E402


def _obs(n: int, n_categories: int, names) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    cats = [f"dataset {i} / 10x 3' v{i % 3}" for i in range(n_categories)]
    codes = rng.integers(-1, n_categories, n)  # -1: a missing value
    return pd.DataFrame(
        {
            "batch": pd.Categorical.from_codes(codes, categories=cats),
            "donor": pd.Categorical(rng.choice(["a", "b"], n), categories=["b", "a"], ordered=True),
            "pct_mito": rng.normal(size=n),
            "size": pd.array(rng.integers(0, 9, n), dtype="Int64"),
            "plate": rng.choice(["p1", "p2"], n).astype(object),
        },
        index=pd.Index(names, dtype=object),
    )


@pytest.mark.parametrize(
    "names",
    [
        [f"cell-{i}" for i in range(300)],
        [f"ÄÖ-{i}-é\x00" if i % 2 else "" for i in range(300)],  # non-ASCII, NUL, empty
        list(range(300)),  # names that are not str travel as they are
    ],
    ids=["ascii", "unicode", "not-str"],
)
def test_worker_frame_equals_the_client_slice(names):
    obs = _obs(300, 50, names)
    part = obs.iloc[100:260]
    carried = pickle.loads(pickle.dumps(ChunkObs.of(part), protocol=5))
    schema = pickle.loads(pickle.dumps(obs.iloc[:0], protocol=5))
    got = carried.frame(schema)
    pd.testing.assert_frame_equal(got, part)
    assert list(got.index) == list(part.index)
    assert got.index.dtype == part.index.dtype


def test_a_chunk_carries_codes_not_categories_or_name_objects():
    n = 8192
    obs = _obs(n, 10_000, [f"cell{i}" for i in range(n)])[["batch"]]
    as_frame = pickle.dumps(obs, protocol=5)
    carried = ChunkObs.of(obs)
    compact = pickle.dumps(carried, protocol=5)
    assert b"dataset 9999" in as_frame and b"dataset 9999" not in compact  # no categories
    assert isinstance(carried.text, str) and carried.index is None  # no str per cell
    codes, text, ends = carried.columns["batch"], carried.text.encode(), carried.ends
    assert len(compact) < codes.nbytes + len(text) + ends.nbytes + 2048
    assert len(compact) < len(as_frame) / 2.5
