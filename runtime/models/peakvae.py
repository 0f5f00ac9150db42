"""scvi-tools' ``PEAKVAE`` (the module of PEAKVI): chromatin accessibility.

PEAKVI reads a cells x regions matrix from ``X`` (the bundle's "genes" are its regions). Per
cell, the encoder gives ``q(z | x)`` and, with ``model_depth``, the depth graph a factor ``d``
in (0, 1) (PEAKVAE's ``d_encoder``; ``d = 1`` without); the decoder gives each region's
accessibility probability ``p``; ``f = sigmoid(region_factors)`` per region (``f = 1``
without). The encoders read the raw values; the likelihood reads only ``x > 0``. Per
posterior draw ``u ~ q(z | x)``
(``z = softmax(u)`` for a logistic-normal latent, ``z = u`` otherwise), as ``PEAKVAE.loss``
computes them::

    reconstruction_loss = sum_r BCE(p_r(z) * d * f_r, x_r > 0)     (= -log p(x | z))
    kl_local            = KL(q(u | x) || N(0, I))

``BCE`` is torch's ``binary_cross_entropy`` (each log clamped at -100).

scvi-tools 1.4.2 has no marginal likelihood for PEAKVI (``get_marginal_ll`` raises
``NotImplementedError``). This module gives the importance-sampling estimate with the
posterior as proposal, over the Gaussian ``u``::

    log_weight = log N(u; 0, I) + log p(x | z(u)) - log q(u | x)

Its mean over draws is the ELBO (the same terms), so ``log mean_s exp(log_weight_s)`` is above
the ELBO on average and increases towards ``log p(x)`` with the number of samples. (VAE's
``marginal_ll`` evaluates both densities at the transformed ``z`` for a logistic-normal latent,
which is not an estimate of ``log p(x)``; PEAKVI has no scvi-tools convention to follow, so the
densities are those of the variable that is sampled.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..bundle import Registry, count, option
from ..bundle import format as F
from ..data import DataNeeds, Minibatch
from ..errors import BundleIntegrityError
from ..maths import distributions as D
from ..maths.likelihood import BernoulliScorer, Scratch
from ..sessions import Graph
from ..sessions.input_layer import InputLayer
from ..sessions.providers import CPU, may_use_cuda
from .base import (
    BundleContents,
    ElboTerms,
    Module,
    check_posterior,
    covariates_taken,
    sparse_wanted,
)
from .scoring import choose_score_graph


@dataclass(frozen=True)
class PEAKVAEConfig:
    """The entries of a PEAKVI bundle's config that the runtime's maths reads."""

    n_latent: int = count(minimum=1)
    n_batch: int = count()
    latent_distribution: str = option("normal", "ln")
    model_depth: bool = option(True, False)
    region_factors: bool = option(True, False)
    module_class: str = "PEAKVAE"
    encode_covariates: bool = False


class AccessibilityScorer(Protocol):
    """``log p(x | z) = -sum_r BCE(p_r d f_r, x_r > 0)`` for one group of cells (their values
    and depth factors bound)."""

    def log_px(self, feeds: Mapping[str, Any], z: np.ndarray) -> np.ndarray:
        """``(samples, cells)`` float64 for ``z`` ``(samples, cells, L)``; ``feeds`` holds the
        group's covariate inputs."""
        ...


class HostScorer:
    """The decoder graph, then numpy's kernel (:class:`BernoulliScorer`)."""

    def __init__(self, decoder: Graph, kernel: BernoulliScorer, depth: np.ndarray | None):
        self.decoder = decoder
        self.kernel = kernel
        self.depth = depth  # None: d = 1 (model_depth=False)

    def log_px(self, feeds: Mapping[str, Any], z: np.ndarray) -> np.ndarray:
        px = self.decoder.run({**feeds, F.IN_Z: np.ascontiguousarray(z, dtype=np.float32)})
        return self.kernel.score(px[F.OUT_PX], self.depth)


class GraphScorer:
    """The scoring graph with the group's region values bound on its device."""

    def __init__(self, graph: Graph, counts: Any, depth: np.ndarray):
        self.graph = graph
        self.counts = counts  # onnxruntime.OrtValue
        self.depth = np.ascontiguousarray(depth, dtype=np.float32)

    def log_px(self, feeds: Mapping[str, Any], z: np.ndarray) -> np.ndarray:
        z = np.ascontiguousarray(z, dtype=np.float32)
        inputs = {**feeds, F.IN_Z: z, F.IN_DEPTH: self.depth}
        return self.graph.run_bound({F.IN_COUNTS: self.counts}, inputs, F.OUT_LOG_PX).astype(
            np.float64
        )


#: Fewest cells of one call in the latent space with the sparse encoders on rows that are never
#: densified: the product reads every row of ``W`` once per call (126 MB at 100,000 regions),
#: and a cell costs only its entries and its hidden units. 5,000 cells of the 100,000-region
#: benchmark model, batch size 1,024, 2 threads: 64 -> 256 cells a call, latent 1.1-1.4 ->
#: 0.86-1.0 s, peak memory the same (530 MB). The scoring methods' decoder calls stay at 64
#: cells (they hold cells x regions outputs: decoding 256 at once took the ELBO's peak 750 ->
#: 1,250 MB); their tasks are larger (below).
SPARSE_LATENT_CALL_ROWS = 256
#: The same for one task of the ELBO and the reconstruction error with the sparse encoders:
#: the first-layer products of a task's cells in one call, the decoder and the likelihood in
#: calls of :data:`SPARSE_DECODE_ROWS` cells (a call's decoder outputs are cells x regions:
#: 26 MB per array for 64 cells of 100,000 regions). 5,000 cells of the 100,000-region
#: benchmark model, 2 threads, alternated: ELBO 6.2-6.8 s in tasks of 64 cells, 5.1-5.8 s in
#: tasks of 256 (peak 692-696 -> 725-730 MB); 512: 4.9-5.5 s, 780 MB; 1,024: 5.5-6.8 s, 855
#: MB (five tasks for two threads). The same numbers, bit for bit. Reads are at most
#: ``batch_size`` cells: the default (128) gives tasks of 128. On the CPU only.
SPARSE_SCORE_TASK_ROWS = 256
#: Cells of one decoder call in those tasks (the engine's fewest rows of a call).
SPARSE_DECODE_ROWS = 64


class SparseEncoders:
    """PEAKVAE's encoder and depth encoder with their first layer's product over the regions,
    ``x @ W``, computed by scipy from the non-zero entries
    (:class:`~scvi_onnx.sessions.input_layer.InputLayer`), and the rest in
    ``encoder_sparse.onnx`` / ``depth_sparse.onnx``.

    scATAC input is a few percent non-zero: for a 100,000-region model (316 hidden units) at
    3.6% the product takes 0.23-0.33 ms per cell on one core (1,024 or 64 cells a call)
    against ~0.5 ms for ONNX Runtime's dense encoder, and the rows are never densified. The
    sums differ from the dense product's by float32 rounding (another order of additions);
    a cell's numbers do not depend on the cells beside it."""

    def __init__(
        self, contents: BundleContents, encoder: Graph, intra_op_threads, model_depth: bool
    ):
        m = contents.manifest
        self.encoder = encoder
        self.z_layer = _input_layer(contents, "encoder_sparse", encoder)
        self.depth_encoder: Graph | None = None
        self.d_layer: InputLayer | None = None
        if model_depth:
            if not m.has_graph("depth_sparse"):
                raise BundleIntegrityError(
                    f"the bundle has {F.ENCODER_SPARSE_FILE} but no {F.DEPTH_SPARSE_FILE} "
                    "for its depth encoder; re-export it"
                )
            device = "cuda" if encoder.on_cuda else "cpu"
            self.depth_encoder = contents.graph(
                "depth_sparse", device, intra_op_threads, like=encoder
            )
            self.d_layer = _input_layer(contents, "depth_sparse", self.depth_encoder)

    def encode(self, feeds: Mapping[str, Any], entries, hold: bool = True) -> dict[str, np.ndarray]:
        x_w = self.z_layer.product(entries, hold=hold)
        return self.encoder.run({**feeds, F.IN_X_PRODUCT: x_w})

    def depth(self, feeds: Mapping[str, Any], entries, hold: bool = True) -> np.ndarray:
        x_w = self.d_layer.product(entries, hold=hold)
        return self.depth_encoder.run({**feeds, F.IN_X_PRODUCT: x_w})[F.OUT_DEPTH]


def _input_layer(contents: BundleContents, graph: str, runs: Graph) -> InputLayer:
    """The :class:`InputLayer` a sparse graph's manifest entry names (``format.INPUT_LAYER``);
    ``runs``: that sparse graph."""
    m = contents.manifest
    entry = m.graphs.get(graph)
    spec = entry.get(F.INPUT_LAYER) if isinstance(entry, dict) else None
    ok = (
        isinstance(spec, dict)
        and spec.get("graph") in F.GRAPH_FILES
        and m.has_graph(spec.get("graph"))
        and isinstance(spec.get("initializer"), str)
        and spec.get("rows") == m.n_genes
    )
    if not ok:
        raise BundleIntegrityError(
            f"the manifest's {graph} entry does not name its first layer ({F.INPUT_LAYER}: "
            f"{spec!r}; expected the full graph, an initializer and {m.n_genes} rows); "
            "re-export the bundle"
        )
    path = contents.path / m.graph_file(spec["graph"])
    layer = InputLayer(path, spec["initializer"], spec["rows"])
    # found and checked now (its values are read on first use): a bad entry fails at load
    width = layer.columns
    if F.IN_X_PRODUCT not in runs.inputs:
        raise BundleIntegrityError(
            f"{m.graph_file(graph)} has no {F.IN_X_PRODUCT} input; re-export the bundle"
        )
    takes = runs.input_shape(F.IN_X_PRODUCT)[-1]
    if isinstance(takes, int) and takes != width:
        raise BundleIntegrityError(
            f"{m.graph_file(graph)} takes {takes} values of {F.IN_X_PRODUCT} per cell but its "
            f"first layer ({spec['initializer']}) has {width} columns; re-export the bundle"
        )
    return layer


class PEAKVAE(Module):
    """``PEAKVAE``'s terms over ``encoder.onnx``, ``decoder.onnx`` (or ``scorer.onnx``) and
    numpy."""

    Config = PEAKVAEConfig
    repr_config = ("latent_distribution", "model_depth", "region_factors")

    @classmethod
    def describe(cls, config: Mapping[str, Any], registry: Registry) -> dict[str, str]:
        c = config
        return {
            "architecture": (
                f"n_hidden {c.get('n_hidden')}, n_layers_encoder {c.get('n_layers_encoder')}, "
                f"n_layers_decoder {c.get('n_layers_decoder')}"
            ),
            "likelihood": "Bernoulli: binary cross-entropy of p * d * f against x > 0",
            "regions": "the bundle's genes are PEAKVI's regions (read from X)",
            "depth factor d": (
                "per cell, from the depth encoder (model_depth)"
                if c.get("model_depth")
                else "none (model_depth=False)"
            ),
            "region factors f": (
                "sigmoid of learned per-region factors"
                if c.get("region_factors")
                else "none (region_factors=False)"
            ),
            "latent distribution": str(c.get("latent_distribution")),
        }

    def __init__(
        self,
        contents: BundleContents,
        *,
        device: str = "auto",
        intra_op_threads: int | None = None,
        scoring: str = "auto",
        input_layer: str = "auto",
    ):
        c: PEAKVAEConfig = contents.config
        self.config = c
        self.arrays = contents.arrays
        self._n_regions = contents.manifest.n_genes
        if c.model_depth and not contents.manifest.has_graph("depth"):
            raise BundleIntegrityError(
                f"the model has model_depth=True but the bundle has no {F.DEPTH_FILE}; re-export it"
            )
        # The encoders: where the bundle has the sparse ones (PEAKVI on many regions) and the
        # CPU runs them, x @ W of their first layer is computed from the non-zero entries
        # (see SparseEncoders); the full graphs (x in) then open only if something asks.
        self.sparse: SparseEncoders | None = None
        first = None
        use = sparse_wanted(contents, input_layer)
        if use and input_layer == "auto" and may_use_cuda(device):
            use = False  # a GPU multiplies the dense minibatch faster
        if use:
            first = contents.graph("encoder_sparse", device, intra_op_threads)
            self.sparse = SparseEncoders(contents, first, intra_op_threads, c.model_depth)
        # the module's provider: the first graph opened (the others open on first use)
        self.encoder = contents.graph("encoder", device, intra_op_threads, like=first)
        self.provider = self.encoder.provider
        self.decoder = contents.graph("decoder", device, intra_op_threads, like=self.encoder)
        self.depth_encoder = None
        if c.model_depth:
            self.depth_encoder = contents.graph(
                "depth", device, intra_op_threads, like=self.encoder
            )
        self.score_graph = choose_score_graph(
            contents, scoring, self.provider, device, intra_op_threads
        )
        self.region_factors = None
        if c.region_factors:
            f = self.arrays[F.ARR_REGION_FACTORS]  # a missing array is a BundleIntegrityError
            if f.shape != (self._n_regions,):
                raise BundleIntegrityError(
                    f"{F.ARRAYS_FILE}: {F.ARR_REGION_FACTORS} has shape {f.shape}, expected "
                    f"({self._n_regions},); re-export the bundle"
                )
            self.region_factors = np.ascontiguousarray(f, dtype=np.float32)
        width = self.encoder.input_shape(F.IN_X)[-1]
        if isinstance(width, int) and width != self._n_regions:
            raise BundleIntegrityError(
                f"{F.ENCODER_FILE} takes {width} values per cell but the manifest lists "
                f"{self._n_regions} regions; re-export the bundle"
            )
        # the Bernoulli kernel's work buffers, per worker thread (no page faults per call)
        self._scratch = Scratch()
        # The likelihood reads the accessible regions (non-zero entries); no library size;
        # X is registered as count data by scvi-tools (non-integer values: one warning).
        self.needs = DataNeeds(
            entries=True,
            log_library=False,
            positive_library=False,
            count_data=True,
            latent_entries=self.sparse is not None,
            # the sparse encoders and the host's likelihood read the entries only: a sparse
            # source's rows are never densified (the scoring graph takes the dense counts)
            dense=self.sparse is None or self.score_graph is not None,
        )
        if self.sparse is not None and not self.needs.dense:
            self.latent_call_rows = SPARSE_LATENT_CALL_ROWS
            if self.provider == CPU:  # (CUDA's tasks are larger, its decoder calls too)
                self.score_task_rows = SPARSE_SCORE_TASK_ROWS

    # ------------------------------------------------------------------ description
    @property
    def n_latent(self) -> int:
        return self.config.n_latent

    @property
    def n_features(self) -> int:
        return self._n_regions

    @property
    def scores_on_graph(self) -> bool:
        """Whether log p(x | z) is reduced in the scoring graph (else on the host)."""
        return self.score_graph is not None

    def obs_use(self, scoring: bool) -> dict[str, str]:
        graphs = {"encoder": self.encoder.inputs, "decoder": self.decoder.inputs}
        if self.depth_encoder is not None:
            graphs["depth"] = self.depth_encoder.inputs
        return self.obs_usage(self.config, graphs, scoring)

    @staticmethod
    def obs_usage(
        config: PEAKVAEConfig, graph_inputs: Mapping[str, Sequence[str]], scoring: bool
    ) -> dict[str, str]:
        """The covariates the graphs take (the latent space runs the encoder only; the scoring
        methods the depth encoder and the decoder too). No dispersion, library prior or size
        factor: nothing else reads obs."""
        return covariates_taken(graph_inputs, scoring)

    # ------------------------------------------------------------------ pieces
    def encode(self, mb: Minibatch, *, hold: bool = True) -> dict[str, np.ndarray]:
        """``qz_m``, ``qz_v`` (the latent space needs nothing else); ``hold``: see
        :meth:`~scvi_onnx.sessions.input_layer.InputLayer.product`."""
        if self.sparse is not None:
            return self.sparse.encode(self.feeds(mb), mb.entries, hold=hold)
        return self.encoder.run({**self.feeds(mb), F.IN_X: mb.x})

    def encode_scored(self, mb: Minibatch, *, low_memory: bool = False) -> dict[str, np.ndarray]:
        """:meth:`Module.encode_scored`; with the sparse encoders, the decoder (or scoring
        graph) opens first. Opening a session holds the graph's file and its weights at once
        (~2x the graph: 254 MB for the 100,000-region decoder); opened before the encoders
        read their first layers (126 MB each), that moment does not add to them.

        ``low_memory`` (the marginal LL): the sparse first layers are read from their files
        block by block and not kept (unless an earlier call holds them), and the depth
        factors are computed here for every cell (``depth`` in the result, which
        :meth:`prepare` takes): the minutes of decoding that follow hold neither ``W``. The
        100,000-region model's marginal LL (256 cells x 100 samples, 2 threads): 671-693 ->
        424-450 MB, with one minibatch or four, the same values."""
        if self.sparse is None:
            return super().encode_scored(mb)
        (self.score_graph or self.decoder).open()
        enc = self.encode(mb, hold=not low_memory)
        check_posterior(enc, mb)
        if low_memory and self.depth_encoder is not None:
            enc[F.OUT_DEPTH] = self.sparse.depth(self.feeds(mb), mb.entries, hold=False)
        return enc

    def depth(self, mb: Minibatch) -> np.ndarray | None:
        """Each cell's depth factor ``d`` (cells, 1) float32; ``None`` without ``model_depth``
        (``d = 1``)."""
        if self.depth_encoder is None:
            return None
        if self.sparse is not None:
            return self.sparse.depth(self.feeds(mb), mb.entries)
        return self.depth_encoder.run({**self.feeds(mb), F.IN_X: mb.x})[F.OUT_DEPTH]

    def prepare(
        self, mb: Minibatch, enc: Mapping[str, np.ndarray] | None = None
    ) -> AccessibilityScorer:
        """The group's scorer: its accessible regions (or its values on the device) and depth
        factors (from ``enc`` where :meth:`encode_scored` computed them), computed once for
        every chunk of draws."""
        depth = enc.get(F.OUT_DEPTH) if enc is not None else None
        if depth is None:
            depth = self.depth(mb)
        return self._scorer(mb, depth)

    def _scorer(self, mb: Minibatch, depth: np.ndarray | None) -> AccessibilityScorer:
        if self.score_graph is not None:
            counts = np.ascontiguousarray(mb.x, dtype=np.float32)
            if depth is None:
                depth = np.ones((mb.n, 1), dtype=np.float32)
            return GraphScorer(self.score_graph, self.score_graph.to_device(counts), depth)
        kernel = BernoulliScorer(mb.entries, self._n_regions, self.region_factors, self._scratch)
        return HostScorer(self.decoder, kernel, depth)

    # ------------------------------------------------------------------ the terms
    def elbo_terms(self, mb: Minibatch, seed: int) -> ElboTerms:
        enc = self.encode_scored(mb)
        _, z = self.z_draws(mb, enc, seed, 0, 1)
        depth = self.depth(mb)
        # the decoder and the likelihood in calls of at most SPARSE_DECODE_ROWS cells where
        # the task is larger (score_task_rows); a cell's numbers do not depend on its call
        rec = np.empty(mb.n)
        step = SPARSE_DECODE_ROWS if self.score_task_rows else mb.n
        for start in range(0, mb.n, step):
            part = slice(start, min(mb.n, start + step))
            sub = mb if part.stop - part.start == mb.n else mb.rows(part)
            scorer = self._scorer(sub, None if depth is None else depth[part])
            rec[part] = -scorer.log_px(self.feeds(sub), z[:, part])[0]
        kl = D.kl_normal_standard(
            enc[F.OUT_QZ_M].astype(np.float64), enc[F.OUT_QZ_V].astype(np.float64)
        ).sum(-1)
        return ElboTerms({"reconstruction_loss": rec}, kl)

    def log_weights(
        self,
        mb: Minibatch,
        enc: Mapping[str, np.ndarray],
        state: AccessibilityScorer,
        seed: int,
        start: int,
        n: int,
    ) -> np.ndarray:
        """``log N(u; 0, I) + log p(x | z(u)) - log q(u | x)`` (see the module docstring)."""
        u, z = self.z_draws(mb, enc, seed, start, n)
        qm = enc[F.OUT_QZ_M].astype(np.float64)[None]
        qs = np.sqrt(enc[F.OUT_QZ_V].astype(np.float64))[None]
        log_w = D.log_normal(u, 0.0, 1.0).sum(-1)
        log_w -= D.log_normal(u, qm, qs).sum(-1)
        log_w += state.log_px(self.feeds(mb), z)
        return log_w
