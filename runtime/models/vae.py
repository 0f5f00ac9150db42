"""scvi-tools' ``VAE`` (the module of SCVI): encoder, decoder and gene likelihood.

Per cell and posterior draw ``z ~ q(z | x)`` (``softmax`` of the draw for a logistic-normal
latent) and library ``l`` (observed ``log(sum x)``, ``log`` of the size factor, or a draw of
``q(l | x)``), as ``VAE.loss`` and ``VAE.marginal_ll`` compute them::

    reconstruction_loss = -log p(x | z, l)
    kl_local            = KL(q(z | x) || N(0, I)) [+ KL(q(l | x) || p(l))]
    log_weight          = log N(z; 0, I) + log p(x | z, l) - log q(z | x)
                          [+ log p(l) - log q(l | x)]

(for a logistic-normal latent, scvi-tools evaluates ``log N(z; 0, I)`` and ``log q(z | x)`` at
the transformed z: reproduced as it is).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..bundle import Registry, count, option
from ..bundle import format as F
from ..data import DataNeeds, Minibatch
from ..errors import BundleIntegrityError
from ..maths import distributions as D
from ..maths import rng
from .base import (
    BundleContents,
    ElboTerms,
    Module,
    check_array_shapes,
    covariates_taken,
    library_description,
    sparse_wanted,
)
from .scoring import GeneLikelihood, Scorer, choose_score_graph


@dataclass(frozen=True)
class VAEConfig:
    """The entries of a VAE-family bundle's config that the runtime's maths reads."""

    n_latent: int = count(minimum=1)
    n_batch: int = count()
    n_labels: int = count()
    gene_likelihood: str = option("zinb", "nb", "poisson", "normal")
    dispersion: str = option("gene", "gene-batch", "gene-label", "gene-cell")
    latent_distribution: str = option("normal", "ln")
    use_observed_lib_size: bool = option(True, False)
    use_size_factor_key: bool = option(True, False)
    module_class: str = "VAE"
    encode_covariates: bool = False

    @property
    def observed_library(self) -> bool:
        """The decoder takes each cell's observed log-library (not size factors, not a draw)."""
        return self.use_observed_lib_size and not self.use_size_factor_key


class VAE(Module):
    """``VAE``'s terms over ``encoder.onnx``, ``decoder.onnx`` (or ``scorer.onnx``) and numpy."""

    Config = VAEConfig
    repr_config = ("gene_likelihood", "dispersion")

    @classmethod
    def describe(cls, config: Mapping[str, Any], registry: Registry) -> dict[str, str]:
        c = config
        library = library_description(c, registry)
        return {
            "architecture": f"n_hidden {c.get('n_hidden')}, n_layers {c.get('n_layers')}",
            "gene likelihood": str(c.get("gene_likelihood")),
            "dispersion": str(c.get("dispersion")),
            "latent distribution": str(c.get("latent_distribution")),
            "library size": library,
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
        c: VAEConfig = contents.config
        self.config = c
        self.arrays = contents.arrays
        self._n_genes = contents.manifest.n_genes
        self._check_arrays(contents)
        sparse_wanted(contents, input_layer)  # checks the value; these bundles have none
        self.encoder = contents.graph("encoder", device, intra_op_threads)
        self.provider = self.encoder.provider
        self.decoder = contents.graph("decoder", device, intra_op_threads, like=self.encoder)
        score_graph = choose_score_graph(contents, scoring, self.provider, device, intra_op_threads)
        self.genes = GeneLikelihood(
            c.gene_likelihood,
            c.dispersion,
            self.arrays[F.ARR_PX_R] if F.ARR_PX_R in self.arrays else None,
            self.decoder,
            score_graph,
        )
        self.learned_library = not c.use_observed_lib_size
        if self.learned_library:
            self._lib_means = self.arrays[F.ARR_LIB_MEANS].reshape(-1).astype(np.float64)
            self._lib_vars = self.arrays[F.ARR_LIB_VARS].reshape(-1).astype(np.float64)
        width = self.encoder.input_shape(self.encoder.inputs[0])[-1]
        if width not in (self._n_genes, None, "n_genes"):
            raise BundleIntegrityError(
                f"{F.ENCODER_FILE} takes {width} genes but the manifest lists "
                f"{self._n_genes}; re-export the bundle"
            )
        self.needs = DataNeeds(
            entries=True,
            log_library=c.observed_library,
            positive_library=c.observed_library,
            count_data=c.gene_likelihood != "normal",
        )

    # ------------------------------------------------------------------ construction
    def _check_arrays(self, contents: BundleContents) -> None:
        """Required arrays present with the manifest's shapes (fail at load, not mid-call)."""
        c, G = self.config, self._n_genes
        want: dict[str, tuple] = {}
        if c.gene_likelihood != "poisson" and c.dispersion != "gene-cell":
            want[F.ARR_PX_R] = {
                "gene": (G,),
                "gene-batch": (G, c.n_batch),
                "gene-label": (G, c.n_labels),
            }[c.dispersion]
        if not c.use_observed_lib_size:
            want[F.ARR_LIB_MEANS] = want[F.ARR_LIB_VARS] = (1, c.n_batch)
        check_array_shapes(self.arrays, want)

    # ------------------------------------------------------------------ description
    @property
    def n_latent(self) -> int:
        return self.config.n_latent

    @property
    def n_features(self) -> int:
        return self._n_genes

    @property
    def scores_on_graph(self) -> bool:
        """Whether log p(x | z) is reduced in the scoring graph (else on the host)."""
        return self.genes.score_graph is not None

    def obs_use(self, scoring: bool) -> dict[str, str]:
        graphs = {"encoder": self.encoder.inputs, "decoder": self.decoder.inputs}
        return self.obs_usage(self.config, graphs, scoring)

    @staticmethod
    def obs_usage(
        config: VAEConfig, graph_inputs: Mapping[str, Sequence[str]], scoring: bool
    ) -> dict[str, str]:
        """Which registered obs inputs the latent space (``scoring=False``) or the scoring
        methods read, and why: the covariates the graphs take (``graph_inputs``: each graph's
        input names, from its session or the manifest), the dispersion's and the library
        prior's categories, the size factors."""
        used = covariates_taken(graph_inputs, scoring)
        if scoring:
            c = config
            if c.gene_likelihood != "poisson" and c.dispersion == "gene-batch":
                used.setdefault("batch", "the gene dispersion is per batch")
            if c.gene_likelihood != "poisson" and c.dispersion == "gene-label":
                used.setdefault("labels", "the gene dispersion is per label")
            if not c.use_observed_lib_size:
                used.setdefault("batch", "the library size prior is per batch")
            if c.use_size_factor_key:
                used.setdefault("size_factor", "the model scales expression by size factors")
        return used

    # ------------------------------------------------------------------ pieces
    def encode(self, mb: Minibatch) -> dict[str, np.ndarray]:
        feeds = self.feeds(mb)
        feeds[F.IN_X] = mb.x
        if self.encoder.takes(F.IN_X_LOG1P):
            feeds[F.IN_X_LOG1P] = np.log1p(mb.x)
        return self.encoder.run(feeds)

    def library(
        self, mb: Minibatch, enc: Mapping[str, np.ndarray], seed: int, start: int, n: int
    ) -> np.ndarray:
        """Library (log scale) fed to the decoder, shape (n or 1, cells, 1)."""
        c = self.config
        if c.use_size_factor_key:
            return np.log(mb.size_factor.astype(np.float64))[None]
        if c.use_observed_lib_size:
            return mb.log_library[None, :, None]
        eps = rng.normals(seed, rng.STREAM_L, mb.cells, n, start=start).T[:, :, None]
        m = enc[F.OUT_QL_M].astype(np.float64)[None]
        s = np.sqrt(enc[F.OUT_QL_V].astype(np.float64))[None]
        return m + eps * s

    def library_prior(self, mb: Minibatch) -> tuple[np.ndarray, np.ndarray]:
        """Each cell's batch's log-library prior (mean, variance), (cells, 1)."""
        b = mb.batch.reshape(-1)
        return self._lib_means[b][:, None], self._lib_vars[b][:, None]

    def library_kl(self, mb: Minibatch, enc: Mapping[str, np.ndarray]) -> np.ndarray:
        """``KL(q(l | x) || p(l))`` per cell."""
        pm, pv = self.library_prior(mb)
        return D.kl_normal(
            enc[F.OUT_QL_M].astype(np.float64), enc[F.OUT_QL_V].astype(np.float64), pm, pv
        ).sum(-1)

    def add_library_log_ratio(
        self, log_w: np.ndarray, mb: Minibatch, enc: Mapping[str, np.ndarray], library: np.ndarray
    ) -> None:
        """``log_w += log p(l) - log q(l | x)`` for library draws (n, cells, 1), in place."""
        pm, pv = self.library_prior(mb)
        lm = enc[F.OUT_QL_M].astype(np.float64)[None]
        ls = np.sqrt(enc[F.OUT_QL_V].astype(np.float64))[None]
        log_w += D.log_normal(library, pm[None], np.sqrt(pv)[None]).sum(-1)
        log_w -= D.log_normal(library, lm, ls).sum(-1)

    def prepare(self, mb: Minibatch, enc: Mapping[str, np.ndarray] | None = None) -> Scorer:
        return self.genes.prepare(mb)

    # ------------------------------------------------------------------ the terms
    def elbo_terms(self, mb: Minibatch, seed: int) -> ElboTerms:
        enc = self.encode_scored(mb)
        _, z = self.z_draws(mb, enc, seed, 0, 1)
        library = self.library(mb, enc, seed, 0, 1)
        rec = -self.prepare(mb).log_px(self.feeds(mb), z, library)[0]
        kl = D.kl_normal_standard(
            enc[F.OUT_QZ_M].astype(np.float64), enc[F.OUT_QZ_V].astype(np.float64)
        ).sum(-1)
        if self.learned_library:
            kl = kl + self.library_kl(mb, enc)
        return ElboTerms({"reconstruction_loss": rec}, kl)

    def log_weights(
        self,
        mb: Minibatch,
        enc: Mapping[str, np.ndarray],
        state: Scorer,
        seed: int,
        start: int,
        n: int,
    ) -> np.ndarray:
        _, z = self.z_draws(mb, enc, seed, start, n)
        library = self.library(mb, enc, seed, start, n)
        qm = enc[F.OUT_QZ_M].astype(np.float64)[None]
        qs = np.sqrt(enc[F.OUT_QZ_V].astype(np.float64))[None]
        # scvi-tools evaluates p(z) and q(z|x) at the transformed z (softmax for "ln").
        log_w = D.log_normal(z, 0.0, 1.0).sum(-1)
        log_w += state.log_px(self.feeds(mb), z, library)
        log_w -= D.log_normal(z, qm, qs).sum(-1)
        if self.learned_library:
            self.add_library_log_ratio(log_w, mb, enc, library)
        return log_w
