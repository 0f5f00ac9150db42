"""scvi-tools' ``SCANVAE`` (the module of SCANVI): its loss, marginal likelihood and classifier.

SCANVAE shares VAE's encoder and decoder and adds three graphs: the classifier ``q(y | z1)``,
``q(z2 | z1, y)`` and ``p(z1 | z2, y)``, the last two evaluated for every label at once.

What scvi-tools 1.4.2 computes, and so what this module computes, per cell and posterior draw
``z1 ~ q(z1 | x)`` (transformed by softmax for ``latent_distribution="ln"``), with
``pi = classifier(z1)`` and one draw ``z2_y ~ q(z2 | z1, y)`` per label ``y``
(``SCANVAE.loss``; every cell goes through this "unlabelled" path, whatever its label: the
labels only enter the training-time classification loss)::

    reconstruction_loss = -log p(x | z1, l) + log q(z1 | x) - sum_y pi_y log p(z1 | z2_y, y)
    kl_local            = sum_y pi_y KL(q(z2 | z1, y) || N(0, I)) + KL(Cat(pi) || Cat(y_prior))
                          [+ KL(q(l | x) || p(l))]
    elbo                = -(reconstruction_loss + kl_local)

and ``get_marginal_ll`` is ``VAE.marginal_ll`` (SCANVAE has its own none) applied to that loss:
``log mean_s exp(log N(z1; 0, I) - reconstruction_loss_s - log q(z1 | x) [+ log p(l) - log
q(l | x)])``, which subtracts ``log q(z1 | x)`` twice and adds the standard-normal prior on z1
next to the hierarchical one: not an estimator of ``log p(x)``. It is reproduced as it is (see
the README's "Differences from scvi-tools").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..bundle import format as F
from ..data import Minibatch
from ..errors import BundleError
from ..maths import distributions as D
from ..maths import rng
from .base import BundleContents, ElboTerms
from .scoring import Scorer
from .vae import VAE, VAEConfig

#: SCANVAE's graphs besides the encoder and decoder.
SCANVAE_GRAPHS = ("classifier", "z2_encoder", "z1_decoder")


@dataclass(frozen=True)
class SCANVAEConfig(VAEConfig):
    """VAE's entries plus the training ``unlabeled_category``."""

    unlabeled_category: Any = None


class SCANVAE(VAE):
    """``SCANVAE``'s terms: VAE's graphs plus the classifier and the z2 graphs."""

    Config = SCANVAEConfig

    def __init__(self, contents: BundleContents, *, device: str = "auto", **kwargs: Any):
        super().__init__(contents, device=device, **kwargs)
        missing = [g for g in SCANVAE_GRAPHS if not contents.manifest.has_graph(g)]
        if missing:
            raise BundleError(f"SCANVI bundle {contents.path} lacks the graphs {missing}")
        threads = kwargs.get("intra_op_threads")
        self.classifier = contents.graph("classifier", device, threads, like=self.encoder)
        self.z2_encoder = contents.graph("z2_encoder", device, threads, like=self.encoder)
        self.z1_decoder = contents.graph("z1_decoder", device, threads, like=self.encoder)
        self.n_labels = int(self.config.n_labels)
        prior = self.arrays[F.ARR_Y_PRIOR].astype(np.float64).reshape(-1)
        self.y_prior = prior / prior.sum()
        categories = contents.manifest.registry.labels.categories
        # scvi-tools' predict: columns ``_label_mapping[:n_labels]`` (the unlabeled category is
        # the mapping's last entry), hard labels ``_code_to_label[argmax]``.
        self.labels = tuple(categories[: self.n_labels])
        # Query cells rarely come with a labels column. A cell's label does not enter any of
        # SCANVI's four methods nor predict (scvi-tools 1.4.2), so an absent column means
        # "every cell unlabeled" instead of an error.
        cats = [str(c) for c in categories]
        unlabeled = str(self.config.unlabeled_category)
        self.missing_labels_code = cats.index(unlabeled) if unlabeled in cats else None

    @staticmethod
    def _run(graph, x: np.ndarray) -> dict[str, np.ndarray]:
        return graph.run({graph.inputs[0]: np.ascontiguousarray(x, dtype=np.float32)})

    def classify(self, z: np.ndarray) -> np.ndarray:
        """Class probabilities (S, N, K) float32 of z (S, N, L)."""
        return self._run(self.classifier, z)[F.OUT_PROBS]

    def _terms(self, mb, enc, scorer: Scorer, seed: int, start: int, n: int) -> dict:
        """The pieces of ``SCANVAE.loss`` for draws start..start+n, each (n, cells)."""
        c64 = lambda a: a.astype(np.float64)  # noqa: E731
        _, z = self.z_draws(mb, enc, seed, start, n)
        library = self.library(mb, enc, seed, start, n)
        log_px = scorer.log_px(self.feeds(mb), z, library)
        qm, qs = c64(enc[F.OUT_QZ_M])[None], np.sqrt(c64(enc[F.OUT_QZ_V]))[None]
        log_qz = D.log_normal(z, qm, qs).sum(-1)
        probs = c64(self.classify(z))
        q2 = self._run(self.z2_encoder, z)
        q2m, q2v = c64(q2[F.OUT_QZ2_M]), c64(q2[F.OUT_QZ2_V])  # (n, N, K, L)
        k, n_lat = q2m.shape[-2:]
        per_draw = k * n_lat
        eps = rng.normals(seed, rng.STREAM_Z2, mb.cells, n * per_draw, start=start * per_draw)
        eps = eps.reshape(len(eps), n, k, n_lat).transpose(1, 0, 2, 3)
        z2 = (q2m + eps * np.sqrt(q2v)).astype(np.float32)
        p1 = self._run(self.z1_decoder, z2)
        log_pz1 = D.log_normal(
            z[:, :, None, :], c64(p1[F.OUT_PZ1_M]), np.sqrt(c64(p1[F.OUT_PZ1_V]))
        ).sum(-1)  # (n, N, K)
        kl_z2 = D.kl_normal_standard(q2m, q2v).sum(-1)
        return {
            "z": z,
            "library": library,
            # SCANVAE.loss's reconstruction_loss
            "rec": -log_px + log_qz - (probs * log_pz1).sum(-1),
            "log_qz": log_qz,
            # SCANVAE.loss's kl_local without the library term
            "kl": (probs * kl_z2).sum(-1) + D.kl_categorical(probs, self.y_prior),
        }

    def elbo_terms(self, mb: Minibatch, seed: int) -> ElboTerms:
        """Per-cell (reconstruction_loss, kl_local) of ``SCANVAE.loss``, one posterior draw."""
        enc = self.encode_scored(mb)
        t = self._terms(mb, enc, self.prepare(mb), seed, 0, 1)
        kl = t["kl"][0]
        if self.learned_library:
            kl = kl + self.library_kl(mb, enc)
        return ElboTerms({"reconstruction_loss": t["rec"][0]}, kl)

    def log_weights(
        self,
        mb: Minibatch,
        enc: Mapping[str, np.ndarray],
        state: Scorer,
        seed: int,
        start: int,
        n: int,
    ) -> np.ndarray:
        """``VAE.marginal_ll``'s log-weights on SCANVAE's loss, shape (n, cells).

        ``log N(z1; 0, I) - reconstruction_loss - log q(z1 | x) [+ log p(l) - log q(l | x)]``
        (z1 transformed for "ln"), as scvi-tools 1.4.2 computes them.
        """
        t = self._terms(mb, enc, state, seed, start, n)
        log_w = D.log_normal(t["z"], 0.0, 1.0).sum(-1) - t["rec"] - t["log_qz"]
        if self.learned_library:
            self.add_library_log_ratio(log_w, mb, enc, t["library"])
        return log_w
