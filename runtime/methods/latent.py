"""``get_latent_representation``'s loop, and the class probabilities of ``predict``."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ..bundle import format as F
from ..data import Minibatch
from ..maths import distributions as D
from ..maths import rng
from ..models.base import Module
from .engine import Engine

#: Draws per pass of the logistic-normal latent's Monte-Carlo mean.
LN_MEAN_CHUNK = 500


def latent(
    module: Module,
    engine: Engine,
    mbs: Iterable[Minibatch],
    *,
    give_mean: bool,
    mc_samples: int,
    return_dist: bool,
    seed: int,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Posterior mean (or ``(mean, var)``, or one draw) of every cell, as scvi-tools."""
    L = module.n_latent

    def one(mb: Minibatch):
        enc = module.encode(mb)
        if return_dist:
            return enc[F.OUT_QZ_M], enc[F.OUT_QZ_V]
        if give_mean and not module.ln:
            return enc[F.OUT_QZ_M], None
        if not give_mean:
            return module.z_draws(mb, enc, seed, 0, 1)[1][0].astype(np.float32), None
        # scvi-tools: the mean of softmax(z) over mc_samples posterior draws
        m = enc[F.OUT_QZ_M].astype(np.float64)
        s = np.sqrt(enc[F.OUT_QZ_V].astype(np.float64))
        acc = np.zeros_like(m)
        for start in range(0, mc_samples, LN_MEAN_CHUNK):
            n = min(LN_MEAN_CHUNK, mc_samples - start)
            eps = rng.normals(seed, rng.STREAM_LN_MEAN, mb.cells, n * L, start=start * L).reshape(
                len(m), n, L
            )
            acc += D.softmax(m[:, None] + eps * s[:, None], axis=-1).sum(1)
        return (acc / mc_samples).astype(np.float32), None

    parts = list(engine.pmap(one, engine.tasks(mbs, module.n_features, module.latent_call_rows)))
    zs = np.concatenate([p[0] for p in parts])
    if return_dist:
        return zs, np.concatenate([p[1] for p in parts])
    return zs


def class_probabilities(
    module, engine: Engine, mbs: Iterable[Minibatch], *, use_posterior_mean: bool, seed: int
) -> np.ndarray:
    """``(cells, labels)`` float32 probabilities of a module's classifier (SCANVI), at the
    posterior mean of z or at one posterior draw."""

    def one(mb: Minibatch) -> np.ndarray:
        enc = module.encode(mb)
        if use_posterior_mean:
            z = enc[F.OUT_QZ_M][None]
        else:
            z = module.z_draws(mb, enc, seed, 0, 1)[1]
        return module.classify(z)[0]

    return np.concatenate(
        list(engine.pmap(one, engine.tasks(mbs, module.n_features, module.latent_call_rows)))
    )
