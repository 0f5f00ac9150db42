"""``get_marginal_ll``'s loop: importance sampling in (cell group, sample chunk) tasks."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from ..data import Minibatch
from ..maths import distributions as D
from ..models.base import Module
from .engine import MIN_CALL_ROWS, Engine

#: Fewest Monte-Carlo samples per marginal-LL task (cells are split into groups to get them).
MLL_MIN_SAMPLES = 32


def reduce_log_weights(log_w: np.ndarray) -> np.ndarray:
    """``log mean_s exp(log_w[s])`` per cell: ``logsumexp`` over samples minus ``log S``."""
    return D.logsumexp(log_w, axis=0) - np.log(log_w.shape[0])


def mean_of_minibatch_means(per_minibatch: list[np.ndarray]) -> float:
    """scvi-tools' ``return_mean=True``: the numpy mean of the per-minibatch means (biased
    for an uneven last minibatch, reproduced on purpose)."""
    return float(np.mean([ll.mean() for ll in per_minibatch]))


def marginal_ll(
    module: Module,
    engine: Engine,
    mbs: Iterable[Minibatch],
    n_mc: int,
    per_pass: int | None,
    seed: int,
) -> Iterator[np.ndarray]:
    """Per-minibatch marginal LL from (cell group, sample chunk) tasks on worker threads.

    A task decodes ``samples x cells`` rows, at most ``engine.chunk_elements`` elements, with
    at least ``MLL_MIN_SAMPLES`` samples (cells split into groups): the group's counts stay in
    cache while its samples are scored; and at least ``MIN_CALL_ROWS`` rows (a wide model's
    weights are read once per call). Every quantity is per cell, so the groups change no
    number.
    """
    G = module.n_features
    chunk = engine.chunk_elements

    def tasks():
        for mb in mbs:
            n_cells = mb.n
            log_w = np.empty((n_mc, n_cells))
            enc = module.encode_scored(mb, low_memory=True)
            group = max(1, min(n_cells, chunk // (G * MLL_MIN_SAMPLES)))
            step = per_pass or max(1, chunk // (group * G), -(-MIN_CALL_ROWS // group))
            step = min(step, n_mc)
            groups = range(0, n_cells, group)
            for c in groups:
                cs = slice(c, min(n_cells, c + group))
                whole = cs.stop - cs.start == n_cells
                sub = mb if whole else mb.rows(cs)
                sub_enc = enc if whole else {k: v[cs] for k, v in enc.items()}
                state = module.prepare(sub, sub_enc)
                for start in range(0, n_mc, step):
                    n = min(step, n_mc - start)
                    last = c == groups[-1] and start + n == n_mc
                    yield log_w, last, sub, sub_enc, state, cs, start, n

    def run(task):
        log_w, last, mb, enc, state, cs, start, n = task
        log_w[start : start + n, cs] = module.log_weights(mb, enc, state, seed, start, n)
        return log_w, last

    for log_w, last in engine.pmap(run, tasks()):
        if last:
            yield reduce_log_weights(log_w)
