"""SCANVI (scvi-tools' ``SCANVAE``): SCANVI's ELBO and marginal likelihood, and ``predict``.

SCANVAE shares SCVI's encoder and decoder (``encoder.onnx``, ``decoder.onnx``) and adds three
graphs (see :mod:`scvi_onnx.bundle`): the classifier ``q(y | z1)``, ``q(z2 | z1, y)`` and
``p(z1 | z2, y)``, the last two evaluated for every label at once.

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

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import bundle as B
from . import distributions as D
from . import rng
from .data import CELL_INDEX_KEY, resolve_indices
from .errors import InvalidArgumentError
from .model import OnnxSCVI, check_seed
from .session import create_session

if TYPE_CHECKING:
    import pandas as pd

#: Stream id of the z2 ~ q(z2 | z1, y) draws (after ``rng.STREAM_*`` 1-3). Draw ``j`` of a cell
#: is sample ``j // (K * L)``, label ``(j // L) % K``, latent dimension ``j % L``.
STREAM_Z2 = 4

_F32_EPS = float(np.finfo(np.float32).eps)


def kl_categorical(probs: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """``KL(Cat(probs) || Cat(prior))`` over the last axis, as torch's ``kl_divergence``.

    torch normalises ``probs``, takes logs of probabilities clamped to ``[eps, 1 - eps]``
    (float32 ``eps``), gives ``inf`` where the prior is 0 and 0 where ``probs`` is 0.
    """
    p = probs / probs.sum(-1, keepdims=True)
    q = prior / prior.sum(-1, keepdims=True)
    lp = np.log(np.clip(p, _F32_EPS, 1 - _F32_EPS))
    lq = np.log(np.clip(q, _F32_EPS, 1 - _F32_EPS))
    t = p * (lp - lq)
    t = np.where(np.broadcast_to(q == 0, t.shape), np.inf, t)
    t = np.where(p == 0, 0.0, t)
    return t.sum(-1)


class OnnxSCANVI(OnnxSCVI):
    """A frozen ``scvi.model.SCANVI``; use :func:`scvi_onnx.load` to create one.

    Adds :meth:`predict` and the :attr:`labels` the classifier predicts. The four
    ``VAEMixin`` methods give what scvi-tools gives for SCANVI (see the module docstring).
    """

    def __init__(self, path: str | Path, adata: Any = None, **kwargs: Any):
        super().__init__(path, adata, **kwargs)
        graphs = self.manifest.graphs
        missing = [g for g in B.SCANVI_GRAPHS if g not in graphs]
        if missing:
            raise B.BundleError(f"SCANVI bundle {self.path} lacks the graphs {missing}")
        self._extra_sessions = {}
        for name in B.SCANVI_GRAPHS:
            sess, _ = create_session(
                self.path / graphs[name]["file"],
                kwargs.get("device", "auto"),
                intra_op_threads=kwargs.get("intra_op_threads"),
            )
            outs = tuple(o.name for o in sess.get_outputs())
            self._extra_sessions[name] = (sess, sess.get_inputs()[0].name, outs)
        self.n_labels = int(self.config["n_labels"])
        prior = self._arrays[B.ARR_Y_PRIOR].astype(np.float64).reshape(-1)
        self._y_prior = prior / prior.sum()
        # scvi-tools' predict: columns ``_label_mapping[:n_labels]`` (the unlabeled category is
        # the mapping's last entry), hard labels ``_code_to_label[argmax]``.
        self._labels = tuple(self.manifest.registry.labels.categories[: self.n_labels])

    def __repr__(self) -> str:
        return (
            "OnnxSCANVI"
            + super().__repr__()[len("OnnxSCVI") : -1]
            + (f", n_labels={self.n_labels})")
        )

    @property
    def labels(self) -> tuple:
        """The labels the classifier predicts, in scvi-tools' column order."""
        return self._labels

    @property
    def unlabeled_category(self) -> Any:
        """The training ``unlabeled_category``."""
        return self.config.get("unlabeled_category")

    def _source_options(self) -> dict[str, Any]:
        # Query cells rarely come with a labels column. A cell's label does not enter any of
        # SCANVI's four methods nor predict (scvi-tools 1.4.2), so an absent column means
        # "every cell unlabeled" instead of an error.
        cats = [str(c) for c in self.manifest.registry.labels.categories]
        unlabeled = str(self.unlabeled_category)
        return {"missing_labels_code": cats.index(unlabeled)} if unlabeled in cats else {}

    # ------------------------------------------------------------------ extra graphs
    def _run(self, name: str, x: np.ndarray) -> dict[str, np.ndarray]:
        sess, in_name, outs = self._extra_sessions[name]
        res = sess.run(None, {in_name: np.ascontiguousarray(x, dtype=np.float32)})
        return dict(zip(outs, res, strict=True))

    def _classify(self, z: np.ndarray) -> np.ndarray:
        """Class probabilities (S, N, K) float32 of z (S, N, L)."""
        return self._run("classifier", z)[B.OUT_PROBS]

    def _terms(self, mb, enc, scorer, seed: int, start: int, n: int) -> dict[str, np.ndarray]:
        """The pieces of ``SCANVAE.loss`` for draws start..start+n, each (n, cells)."""
        c64 = lambda a: a.astype(np.float64)  # noqa: E731
        _, z = self._z_samples(mb, enc, seed, start, n)
        library = self._library(mb, enc, seed, start, n)
        log_px = self._log_px(scorer, self._decode(mb, z, library))
        qm, qs = c64(enc[B.OUT_QZ_M])[None], np.sqrt(c64(enc[B.OUT_QZ_V]))[None]
        log_qz = D.log_normal(z, qm, qs).sum(-1)
        probs = c64(self._classify(z))
        q2 = self._run("z2_encoder", z)
        q2m, q2v = c64(q2[B.OUT_QZ2_M]), c64(q2[B.OUT_QZ2_V])  # (n, N, K, L)
        k, n_lat = q2m.shape[-2:]
        per_draw = k * n_lat
        eps = rng.normals(seed, STREAM_Z2, mb[CELL_INDEX_KEY], n * per_draw, start=start * per_draw)
        eps = eps.reshape(len(eps), n, k, n_lat).transpose(1, 0, 2, 3)
        z2 = (q2m + eps * np.sqrt(q2v)).astype(np.float32)
        p1 = self._run("z1_decoder", z2)
        log_pz1 = D.log_normal(
            z[:, :, None, :], c64(p1[B.OUT_PZ1_M]), np.sqrt(c64(p1[B.OUT_PZ1_V]))
        ).sum(-1)  # (n, N, K)
        kl_z2 = D.kl_normal_standard(q2m, q2v).sum(-1)
        return {
            "z": z,
            "library": library,
            # SCANVAE.loss's reconstruction_loss
            "rec": -log_px + log_qz - (probs * log_pz1).sum(-1),
            "log_qz": log_qz,
            # SCANVAE.loss's kl_local without the library term
            "kl": (probs * kl_z2).sum(-1) + kl_categorical(probs, self._y_prior),
        }

    # Overrides of OnnxSCVI's per-minibatch pieces: get_elbo, get_reconstruction_error and
    # get_marginal_ll drive them (threads, chunking) as for SCVI.
    def _elbo_terms(self, mb, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-cell (reconstruction_loss, kl_local) of ``SCANVAE.loss``, one posterior draw."""
        enc = self._encode(mb)
        t = self._terms(mb, enc, self._scorer(mb), seed, 0, 1)
        kl = t["kl"][0]
        if self._learned_library:
            pm, pv = self._library_prior(mb)
            kl = kl + D.kl_normal(
                enc[B.OUT_QL_M].astype(np.float64), enc[B.OUT_QL_V].astype(np.float64), pm, pv
            ).sum(-1)
        return t["rec"][0], kl

    def _log_weights(self, mb, enc, scorer, seed: int, start: int, n: int) -> np.ndarray:
        """``VAE.marginal_ll``'s log-weights on SCANVAE's loss, shape (n, cells).

        ``log N(z1; 0, I) - reconstruction_loss - log q(z1 | x) [+ log p(l) - log q(l | x)]``
        (z1 transformed for "ln"), as scvi-tools 1.4.2 computes them.
        """
        t = self._terms(mb, enc, scorer, seed, start, n)
        log_w = D.log_normal(t["z"], 0.0, 1.0).sum(-1) - t["rec"] - t["log_qz"]
        if self._learned_library:
            pm, pv = self._library_prior(mb)
            lm = enc[B.OUT_QL_M].astype(np.float64)[None]
            ls = np.sqrt(enc[B.OUT_QL_V].astype(np.float64))[None]
            log_w += D.log_normal(t["library"], pm[None], np.sqrt(pv)[None]).sum(-1)
            log_w -= D.log_normal(t["library"], lm, ls).sum(-1)
        return log_w

    # ------------------------------------------------------------------ predict
    def predict(
        self,
        adata: Any = None,
        indices: Sequence[int] | None = None,
        soft: bool = False,
        batch_size: int | None = None,
        use_posterior_mean: bool = True,
        dataloader: Iterable[dict[str, Any]] | None = None,
        *,
        seed: int | None = None,
        missing_genes: str = "error",
        min_gene_overlap: float = 0.8,
        progress_bar: bool = False,
    ) -> np.ndarray | pd.DataFrame:
        """Cell label predictions, as ``scvi.model.SCANVI.predict``.

        Parameters
        ----------
        adata, indices, batch_size, dataloader, missing_genes, min_gene_overlap, progress_bar
            As in :meth:`get_latent_representation`.
        soft
            Return the class probabilities instead of the most probable label.
        use_posterior_mean
            Classify the posterior mean of z (default, as scvi-tools); else one posterior draw
            (transformed by softmax for ``latent_distribution="ln"``, as scvi-tools).
        seed
            Seed of the draw when ``use_posterior_mean=False``.

        Returns
        -------
        ``soft=False``: a ``(n_cells,)`` numpy array of label names (the training labels, never
        the unlabeled category). ``soft=True``: a float32 DataFrame of probabilities, one column
        per label in :attr:`labels` order, indexed by ``adata.obs_names`` of the cells (a
        ``RangeIndex`` for a ``dataloader``).
        """
        import pandas as pd

        seed = self.seed if seed is None else check_seed(seed)

        def probs_of(mb):
            enc = self._encode(mb)
            if use_posterior_mean:
                z = enc[B.OUT_QZ_M][None]
            else:
                z = self._z_samples(mb, enc, seed, 0, 1)[1]
            return self._classify(z)[0]

        mbs = self._minibatches(
            adata,
            indices,
            batch_size,
            dataloader,
            missing_genes=missing_genes,
            min_gene_overlap=min_gene_overlap,
            progress=progress_bar,
            scoring=False,
        )
        probs = np.concatenate(list(self._pmap(probs_of, self._tasks(mbs))))
        if not soft:
            return np.array([self._labels[c] for c in probs.argmax(axis=1)])
        if dataloader is not None:
            index = pd.RangeIndex(len(probs))
        else:
            data = self.adata if adata is None else adata
            if data is None:  # pragma: no cover - _minibatches raised already
                raise InvalidArgumentError("no data")
            index = data.obs_names[resolve_indices(indices, data.n_obs)]
        return pd.DataFrame(probs, columns=list(self._labels), index=index)
