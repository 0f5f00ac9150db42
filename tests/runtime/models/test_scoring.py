"""The scoring graph (decoder + likelihood reduction in ONNX, the CUDA path) gives the numpy
kernel's numbers."""

from __future__ import annotations

import numpy as np
import pytest

import scvi_onnx
from scvi_onnx.errors import InvalidArgumentError

from ...conftest import SHIPPED_BUNDLE


def test_scoring_graph_equals_host_scoring(model, query):
    """scoring="graph" (the device path: decoder + likelihood reduction in one ONNX graph)
    gives the numpy kernel's numbers, on the CPU provider here; results stay independent of
    the batch size."""
    assert not model.module.scores_on_graph  # "auto" on the CPU scores in numpy
    graph = scvi_onnx.load(SHIPPED_BUNDLE, device="cpu", scoring="graph")
    got = graph.get_elbo(query, return_mean=False, seed=3)
    np.testing.assert_allclose(got, model.get_elbo(query, return_mean=False, seed=3), rtol=1e-6)
    np.testing.assert_array_equal(
        graph.get_elbo(query, return_mean=False, seed=3, batch_size=17), got
    )
    sub = query[:40]
    np.testing.assert_allclose(
        graph.get_marginal_ll(sub, n_mc_samples=30, return_mean=False),
        model.get_marginal_ll(sub, n_mc_samples=30, return_mean=False),
        rtol=1e-6,
    )
    with pytest.raises(InvalidArgumentError, match="scoring must be one of"):
        scvi_onnx.load(SHIPPED_BUNDLE, device="cpu", scoring="gpu")
