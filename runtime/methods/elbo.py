"""The per-cell loop of ``get_elbo`` and ``get_reconstruction_error``: one draw per cell."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ..data import Minibatch
from ..models.base import ElboTerms, Module
from .engine import Engine


def elbo_terms(module: Module, engine: Engine, mbs: Iterable[Minibatch], seed: int) -> ElboTerms:
    """Every cell's :class:`~scvi_onnx.models.base.ElboTerms`, in input order."""
    tasks = engine.tasks(mbs, module.n_features, module.score_task_rows)
    parts = list(engine.pmap(lambda mb: module.elbo_terms(mb, seed), tasks))
    keys = parts[0].reconstruction if parts else {}
    return ElboTerms(
        {k: np.concatenate([p.reconstruction[k] for p in parts]) for k in keys},
        np.concatenate([p.kl for p in parts]),
    )
