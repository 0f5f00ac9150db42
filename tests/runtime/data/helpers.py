"""Builders of the data-layer tests: a manifest with the registry under test, small count
matrices and obs tables, and comparisons of minibatches."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

from scvi_onnx.bundle import CategoricalField, Manifest, Registry
from scvi_onnx.data import AnnDataSource, DataNeeds, Minibatch
from scvi_onnx.data.dataloader import (
    BATCH_KEY,
    CAT_COVS_KEY,
    CONT_COVS_KEY,
    LABELS_KEY,
    SIZE_FACTOR_KEY,
    X_KEY,
)
from scvi_onnx.data.entries import Entries

GENES = tuple(f"g{i}" for i in range(8))
G = len(GENES)
N = 12


def make_manifest(
    genes=GENES,
    *,
    layer=None,
    batch_key=None,
    batch_cats=(0,),
    labels_key=None,
    labels_cats=(0,),
    size_factor_key=None,
    cat_covs=(),
    cont_covs=(),
) -> Manifest:
    reg = Registry(
        layer=layer,
        batch=CategoricalField(batch_key, tuple(batch_cats)),
        labels=CategoricalField(labels_key, tuple(labels_cats)),
        size_factor_key=size_factor_key,
        categorical_covariates=tuple(CategoricalField(k, tuple(c)) for k, c in cat_covs),
        continuous_covariates=tuple(cont_covs),
    )
    return Manifest(
        schema_version=1, model_class="SCVI", config={}, genes=tuple(genes), registry=reg, graphs={}
    )


FULL = dict(
    batch_key="batch",
    batch_cats=("b0", "b1"),
    labels_key="cell_type",
    labels_cats=("B", "T", "NK"),
    size_factor_key="sf",
    cat_covs=(("donor", (1, 2, 3)),),
    cont_covs=("pct_mito", "n_counts"),
)


def counts(n=N, g=G, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.poisson(2.0, size=(n, g)).astype(np.int64)
    x[:, 0] += 1  # every cell has a positive library
    return x


def make_obs(n=N) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    return pd.DataFrame(
        {
            "batch": pd.Categorical(rng.choice(["b0", "b1"], n)),
            "cell_type": rng.choice(["B", "T", "NK"], n).astype(object),
            "sf": rng.uniform(0.5, 2.0, n),
            "donor": rng.choice([1, 2, 3], n),  # int-coded column vs int categories
            "pct_mito": rng.uniform(0, 0.2, n),
            "n_counts": rng.integers(100, 1000, n),
        },
        index=[f"cell{i}" for i in range(n)],
    )


def make_adata(x=None, genes=GENES, obs=None) -> ad.AnnData:
    x = counts() if x is None else x
    obs = make_obs(x.shape[0]) if obs is None else obs
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=list(genes)))


ENTRIES = DataNeeds(entries=True)
FIELDS = ("x", "cells", "batch", "labels", "cat_covs", "cont_covs", "size_factor")


def assert_entries_match(mb: Minibatch) -> None:
    """A minibatch's non-zero entries, when the source gave them, are exactly the dense X's."""
    e = mb.entries
    if e is None:
        return
    want = Entries.from_dense(mb.x)
    for got_part, want_part in zip(e, want, strict=True):
        np.testing.assert_array_equal(got_part, want_part)
    assert e.vals.dtype == np.float32


def collect(src: AnnDataSource, indices=None, batch_size=5, needs=ENTRIES) -> Minibatch:
    """All the minibatches' fields concatenated (the non-zero entries checked on the way)."""
    mbs = list(src.minibatches(indices, batch_size, needs=needs))
    for m in mbs:
        assert_entries_match(m)
    return Minibatch(
        **{
            f: None if getattr(mbs[0], f) is None else np.concatenate([getattr(m, f) for m in mbs])
            for f in FIELDS
        }
    )


def assert_same(a: Minibatch, b: Minibatch) -> None:
    """Same minibatch fields and values; the non-zero entries, where given, match the X."""
    assert_entries_match(a)
    assert_entries_match(b)
    for k in FIELDS:
        va, vb = getattr(a, k), getattr(b, k)
        assert (va is None) == (vb is None), k
        if va is not None:
            assert va.dtype == vb.dtype, k
            np.testing.assert_array_equal(va, vb, err_msg=k)


def as_loader_dict(mb: Minibatch) -> dict:
    """A minibatch as a user's dataloader hands it (scvi-tools' REGISTRY_KEYS names)."""
    keys = {
        "x": X_KEY,
        "batch": BATCH_KEY,
        "labels": LABELS_KEY,
        "cat_covs": CAT_COVS_KEY,
        "cont_covs": CONT_COVS_KEY,
        "size_factor": SIZE_FACTOR_KEY,
    }
    return {k: getattr(mb, f) for f, k in keys.items() if getattr(mb, f) is not None}
