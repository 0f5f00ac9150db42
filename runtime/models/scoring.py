"""``log p(x | z, l)`` of the genes, summed over genes: on the host or in the scoring graph.

A :class:`GeneLikelihood` holds what does not change between minibatches (the likelihood, the
dispersion that does not depend on z, its ``lgamma`` table). For a group of cells it prepares a
scorer, which every Monte-Carlo chunk of those cells then calls with its ``(z, library)``:

- :class:`HostScorer`: the decoder graph, then numpy's kernel (:mod:`scvi_onnx.maths.likelihood`)
  over its outputs; the CPU's choice.
- :class:`GraphScorer`: the scoring graph (decoder + likelihood reduction in ONNX), the counts
  sent to the device once per group; only per-(sample, cell) sums come back. CUDA's choice.

Both add the per-cell count terms (``lgamma``, which ONNX lacks) computed once per group, and
both have the same call, so the loops never ask which one they hold.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from ..bundle import format as F
from ..data import Minibatch
from ..errors import InvalidArgumentError
from ..maths.dispersion import cell_codes, dispersion_table
from ..maths.likelihood import (
    TABLE_MAX_COUNT,
    TABLE_MAX_ENTRIES,
    MinibatchScorer,
    count_constant,
    lgamma_table,
    poisson_count_constant,
)
from ..sessions import CUDA, Graph

#: ``scoring=`` choices: where log p(x | z) is reduced over genes.
SCORING = ("auto", "host", "graph")


def choose_score_graph(
    contents: Any, scoring: str, provider: str, device: str, intra_op_threads: int | None
) -> Graph | None:
    """The scoring graph when log p(x | z) is reduced beside the decoder, else ``None``.

    ``"auto"``: on CUDA when the bundle has the graph (decoder outputs, samples x cells x
    genes, never come back to the host); on the CPU numpy's kernel is faster than ONNX
    Runtime's elementwise kernels. ``"host"``: never. ``"graph"``: always (an error if the
    bundle has none). ``contents`` is the module's
    :class:`~scvi_onnx.models.base.BundleContents`; ``provider`` the encoder's.
    """
    if scoring not in SCORING:
        raise InvalidArgumentError(f"scoring must be one of {SCORING}, got {scoring!r}")
    has = contents.manifest.has_graph("scorer")
    if scoring == "graph" and not has:
        raise InvalidArgumentError(
            "scoring='graph' but this bundle has no scoring graph (SCANVI, gene-cell "
            "dispersion, or exported before scvi-onnx 0.2); re-export it or use "
            "scoring='host'"
        )
    if scoring == "host" or not has or (scoring == "auto" and provider != CUDA):
        return None
    return contents.graph("scorer", device, intra_op_threads)


class Scorer(Protocol):
    """``log p(x | z, l)`` summed over genes for one group of cells."""

    def log_px(self, feeds: Mapping[str, Any], z: np.ndarray, library: np.ndarray) -> np.ndarray:
        """``(samples, cells)`` float64 for ``z`` ``(samples, cells, L)`` and ``library``
        ``(samples or 1, cells, 1)``; ``feeds`` holds the group's covariate inputs."""
        ...


def decoder_feeds(feeds: Mapping[str, Any], z: np.ndarray, library: np.ndarray) -> dict:
    """The decoder's inputs: the covariates plus float32 ``z`` and ``library``."""
    return {
        **feeds,
        F.IN_Z: np.ascontiguousarray(z, dtype=np.float32),
        F.IN_LIBRARY: np.ascontiguousarray(library, dtype=np.float32),
    }


class HostScorer:
    """The decoder graph's outputs scored by numpy's kernel."""

    def __init__(self, decoder: Graph, kernel: MinibatchScorer):
        self.decoder = decoder
        self.kernel = kernel

    def decode(self, feeds: Mapping[str, Any], z: np.ndarray, library: np.ndarray) -> dict:
        return self.decoder.run(decoder_feeds(feeds, z, library))

    def log_px(self, feeds: Mapping[str, Any], z: np.ndarray, library: np.ndarray) -> np.ndarray:
        dec = self.decode(feeds, z, library)
        theta = np.exp(dec[F.OUT_PX_R]) if F.OUT_PX_R in dec else None
        return self.kernel.score(dec[F.OUT_PX_RATE], dec.get(F.OUT_PX_DROPOUT), theta)


class GraphScorer:
    """The scoring graph with the group's counts bound on its device."""

    def __init__(self, graph: Graph, counts: Any, const: np.ndarray | None):
        self.graph = graph
        self.counts = counts  # onnxruntime.OrtValue
        self.const = const

    def log_px(self, feeds: Mapping[str, Any], z: np.ndarray, library: np.ndarray) -> np.ndarray:
        out = self.graph.run_bound(
            {F.IN_COUNTS: self.counts}, decoder_feeds(feeds, z, library), F.OUT_LOG_PX
        ).astype(np.float64)
        return out if self.const is None else out + self.const


class GeneLikelihood:
    """The gene likelihood of a VAE-family module: ZINB, NB, Poisson or Normal.

    Parameters
    ----------
    likelihood, dispersion
        The module's ``gene_likelihood`` and ``dispersion``.
    px_r
        ``arrays.npz``'s ``px_r`` (``None`` for Poisson and ``gene-cell``).
    decoder
        The decoder graph.
    score_graph
        The scoring graph where it is used (else ``None``: host scoring).
    """

    def __init__(
        self,
        likelihood: str,
        dispersion: str,
        px_r: np.ndarray | None,
        decoder: Graph,
        score_graph: Graph | None = None,
    ):
        self.likelihood = likelihood
        self.dispersion = dispersion
        self.decoder = decoder
        self.score_graph = score_graph
        # Dispersion that does not depend on z: exp(px_r) per gene, or per batch / label
        # (rows). Its lgamma table for the count terms is built on first use (the latent
        # space needs none of it); both are never modified.
        self.theta = None
        if likelihood != "poisson" and dispersion != "gene-cell":
            self.theta = dispersion_table(px_r)

    @functools.cached_property
    def theta_table(self) -> np.ndarray | None:
        """The :func:`lgamma_table` of the fixed dispersion, if small enough; built on first
        use (threads that race here build the same table)."""
        if self.theta is None or self.likelihood not in ("nb", "zinb"):
            return None
        if self.theta.size * TABLE_MAX_COUNT > TABLE_MAX_ENTRIES:
            return None
        return lgamma_table(self.theta)

    def prepare(self, mb: Minibatch) -> Scorer:
        """The scorer of a group of cells: their counts, fixed dispersion and count terms."""
        theta = const = codes = None
        if self.theta is not None:
            if self.theta.ndim == 1:
                theta = self.theta
            else:
                codes = cell_codes(self.dispersion, mb.batch, mb.labels)
                theta = self.theta[codes]
            if self.likelihood in ("nb", "zinb"):
                const = count_constant(
                    mb.entries, theta, self.theta_table, codes, likelihood=self.likelihood
                )
        if self.likelihood == "poisson":
            const = poisson_count_constant(mb.entries)
        if self.score_graph is not None:
            counts = np.ascontiguousarray(mb.x, dtype=np.float32)
            return GraphScorer(self.score_graph, self.score_graph.to_device(counts), const)
        return HostScorer(
            self.decoder, MinibatchScorer(self.likelihood, mb.x, mb.entries, theta, const)
        )
