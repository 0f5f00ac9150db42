"""get_marginal_ll's reduction: the mean over cells as scvi-tools takes it."""

from __future__ import annotations

import numpy as np
import pytest


def test_marginal_ll_mean_is_mean_of_minibatch_means(model, query):
    per_cell = model.get_marginal_ll(query, n_mc_samples=10, return_mean=False)
    mean = model.get_marginal_ll(query, n_mc_samples=10, batch_size=128)
    assert mean == pytest.approx(np.mean([per_cell[:128].mean(), per_cell[128:].mean()]))
