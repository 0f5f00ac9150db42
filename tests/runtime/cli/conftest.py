"""Input files of the CLI tests."""

from __future__ import annotations

import pytest


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
