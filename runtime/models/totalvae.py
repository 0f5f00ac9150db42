"""scvi-tools' ``TOTALVAE`` (the module of TOTALVI): RNA and surface proteins of CITE-seq cells.

Inference (``TOTALVAE._regular_inference`` and ``EncoderTOTALVI``): the encoder reads
``log(1 + x / (1 + mean_g x))`` and ``log(1 + y / (1 + mean_p y))`` side by side (without the
logs for ``log_variational=False``), with the covariates where ``encode_covariates``; it gives
``q(z | x, y)`` and ``q(l | x, y)`` (a log-library, clamped at 15 after its draw). The library
size the decoder multiplies is the observed total count ``sum_g x`` (not its log), ``exp`` of
the drawn log-library, or the registered size factor.

Generation (``DecoderTOTALVI``): genes as in SCVI (NB or ZINB, dispersion per gene / batch /
label); proteins as a negative-binomial mixture of a background and a foreground,
``log_back ~ N(back_alpha, back_beta)`` (the decoder's own draw: the runtime's
``STREAM_PRO_BACK``), ``rate_back = exp(log_back)``, ``rate_fore = rate_back * fore_scale``,
both scaled by the per-batch efficiency ``exp(log_per_batch_efficiency[:, batch])``, with
mixing logits ``py_mixing`` (of the background) and one dispersion per protein / batch / label.

What ``TOTALVAE.loss`` returns and ``get_elbo`` sums (scvi-tools 1.4.2), per cell and posterior
draw, with ``m_p`` the cell's panel's protein mask (1 where proteins were all observed)::

    reconst_loss_gene    = -log p(x | z, l)
    reconst_loss_protein = -sum_p m_p log NBmixture(y_p | rate_back, rate_fore, py_r, mixing)
    kl_div_z             = KL(q(z | x, y) || N(0, I))
    kl_div_l_gene        = KL(q(l | x, y) || N(mu_batch, var_batch))   (learned library only)
    kl_div_back_pro      = sum_p m_p KL(N(back_alpha, back_beta) || N(prior_alpha, prior_beta))
                           - sum_p log LogNormal(efficiency_p; 0, 1)
                           - 1e-3 sum_p log sigmoid(mixing_p)

The last two terms of ``kl_div_back_pro`` are regularisers (a log-normal prior on the per-batch
efficiency, a small push towards background), not divergences: scvi-tools puts them in
``kl_local``, so ``get_elbo`` subtracts them, and so does this module. The prior of the
background is per panel (``panel_key``, else the batch).

``TOTALVAE.marginal_ll`` (scvi-tools runs one forward pass per sample; here all samples are
batched): per sample ``s``::

    log_w = log N(z; 0, I) + sum_p log N(log_back; prior) - reconst_loss_gene
            - reconst_loss_protein - log q(z | x, y) - sum_p log N(log_back; back_alpha, back_beta)
            [+ log p(l) - log q(l | x, y)]

(at the transformed z for a logistic-normal latent, at the clamped log-library, as scvi-tools).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..bundle import Registry, count, option
from ..bundle import format as F
from ..data import DataNeeds, Minibatch
from ..errors import BundleIntegrityError, InvalidArgumentError
from ..maths import distributions as D
from ..maths import rng
from ..maths.dispersion import dispersion_table
from ..maths.likelihood import nb_mixture_sum
from .base import (
    BundleContents,
    ElboTerms,
    Module,
    check_array_shapes,
    covariates_taken,
    library_description,
    sparse_wanted,
)
from .scoring import SCORING, GeneLikelihood

#: log(sqrt(2 pi)), as torch's Normal.log_prob.
_LOG_SQRT_2PI = 0.5 * np.log(2.0 * np.pi)


@dataclass(frozen=True)
class TOTALVAEConfig:
    """The entries of a TOTALVI bundle's config that the runtime's maths reads."""

    n_latent: int = count(minimum=1)
    n_batch: int = count()
    n_labels: int = count()
    n_proteins: int = count(minimum=1)
    n_panel: int = count(minimum=1)
    gene_likelihood: str = option("nb", "zinb")
    gene_dispersion: str = option("gene", "gene-batch", "gene-label")
    protein_dispersion: str = option("protein", "protein-batch", "protein-label")
    latent_distribution: str = option("normal", "ln")
    #: TOTALVAE's own flag: True with a size factor too (the library is then not learned).
    use_observed_lib_size: bool = option(True, False)
    use_size_factor_key: bool = option(True, False)
    log_variational: bool = option(True, False)
    #: Whether some proteins were missing in some panels in training (the mask array).
    protein_batch_mask: bool = option(True, False)
    module_class: str = "TOTALVAE"
    encode_covariates: bool = True
    #: The encoder reads ``v / (1 + mean(v))`` of the genes and of the proteins (scvi-tools
    #: >= 1.3.1); False: the counts themselves (the model was trained before 1.3.1 and
    #: exported to reproduce that version). Bundles written before this entry: True.
    encoder_input_scaling: bool = option(True, False, default=True)


# ------------------------------------------------------------------ per-cell selections
def cell_rows(kind: str, batch: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each cell's row of a per-batch or per-label table (``*-batch`` / ``*-label``)."""
    return (batch if kind.endswith("-batch") else labels).reshape(-1)


def cell_table(kind: str, table: np.ndarray, batch: np.ndarray, labels: np.ndarray):
    """A ``(C, K)`` table's row for each cell, or the ``(K,)`` table itself."""
    return table if table.ndim == 1 else table[cell_rows(kind, batch, labels)]


def protein_dispersion(
    kind: str, py_r: np.ndarray, batch: np.ndarray, labels: np.ndarray
) -> np.ndarray:
    """``exp(py_r)`` of each cell: ``(P,)`` for ``protein``, ``(N, P)`` for ``protein-batch``
    / ``protein-label`` (as ``TOTALVAE.generative`` selects it)."""
    return cell_table(kind, dispersion_table(py_r), batch, labels)


def efficiency(log_eff: np.ndarray, batch: np.ndarray) -> np.ndarray:
    """``exp(log_per_batch_efficiency[:, batch])``, ``(N, P)`` float64."""
    return np.exp(log_eff.astype(np.float64).T[batch.reshape(-1)])


def background_prior(
    alpha: np.ndarray, log_beta: np.ndarray, panel: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The background prior ``N(alpha, exp(log_beta))`` of each cell's panel, ``(N, P)`` each."""
    p = panel.reshape(-1)
    return alpha.astype(np.float64).T[p], np.exp(log_beta.astype(np.float64).T[p])


def encoder_input(
    x: np.ndarray, y: np.ndarray, log_variational: bool, scaling: bool = True
) -> np.ndarray:
    """The encoder's ``xy_norm``: ``log(1 + v / (1 + mean(v)))`` of the genes ``x`` and the
    proteins ``y`` side by side (no log without ``log_variational``; ``log(1 + v)`` without
    ``scaling``, as scvi-tools < 1.3.1), in float32 as torch computes it (``log`` of
    ``1 + .``, not ``log1p``)."""
    G, P = x.shape[1], y.shape[1]
    out = np.empty((x.shape[0], G + P), dtype=np.float32)
    for v, cols in ((x, slice(0, G)), (y, slice(G, G + P))):
        if not scaling:
            out[:, cols] = v
            continue
        mean = (v.sum(1, dtype=np.float64) / v.shape[1]).astype(np.float32)
        np.divide(v, (np.float32(1.0) + mean)[:, None], out=out[:, cols], dtype=np.float32)
    if log_variational:
        out += np.float32(1.0)
        np.log(out, out=out)
    return out


def encoder_input_description(config: Mapping[str, Any]) -> str:
    """What ``info`` says the encoder reads (see :func:`encoder_input`)."""
    scaled = config.get("encoder_input_scaling", True)
    v = "v / (1 + mean(v))" if scaled else "v"
    text = f"log(1 + {v})" if config.get("log_variational", True) else v
    if scaled:
        return f"{text} of the gene and protein counts v (scvi-tools >= 1.3.1)"
    return (
        f"{text} of the gene and protein counts v, as scvi-tools < 1.3.1 (which trained it) "
        "computed it; 1.3.1+ divides v by 1 + mean(v)"
    )


@dataclass(frozen=True)
class TotalState:
    """The per-group state: the gene scorer and every per-cell protein constant."""

    genes: Any  # a HostScorer (its kernel scores the decoder's gene outputs)
    y: np.ndarray  # (N, P) float64 counts
    theta: np.ndarray  # (P,) or (N, P) protein inverse dispersion
    counts: np.ndarray  # (N,) sum_p m_p (lgamma(y + theta) - lgamma(theta) - lgamma(y + 1))
    mask: np.ndarray | None  # (N, P) float64 0/1, None: every protein observed
    eff: np.ndarray  # (N, P) per-batch efficiency
    prior_m: np.ndarray  # (N, P) background prior mean
    prior_s: np.ndarray  # (N, P) background prior scale
    eff_penalty: np.ndarray  # (N,) -sum_p log LogNormal(eff_p; 0, 1)


class TOTALVAE(Module):
    """``TOTALVAE``'s terms over ``encoder.onnx``, ``decoder.onnx`` and numpy."""

    Config = TOTALVAEConfig
    reconstruction_keys = ("reconst_loss_gene", "reconst_loss_protein")

    @classmethod
    def describe(cls, config: Mapping[str, Any], registry: Registry) -> dict[str, str]:
        c = config
        library = library_description(c, registry)
        return {
            "architecture": (
                f"n_hidden {c.get('n_hidden')}, n_layers_encoder {c.get('n_layers_encoder')}, "
                f"n_layers_decoder {c.get('n_layers_decoder')}"
            ),
            "gene likelihood": str(c.get("gene_likelihood")),
            "dispersion": str(c.get("gene_dispersion")),
            "protein likelihood": "negative binomial mixture of background and foreground",
            "protein dispersion": str(c.get("protein_dispersion")),
            "latent distribution": str(c.get("latent_distribution")),
            "library size": library,
            "encoder input": encoder_input_description(c),
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
        c: TOTALVAEConfig = contents.config
        self.config = c
        sparse_wanted(contents, input_layer)  # checks the value; TOTALVI bundles have none
        if scoring not in SCORING:
            raise InvalidArgumentError(f"scoring must be one of {SCORING}, got {scoring!r}")
        if scoring == "graph":
            raise InvalidArgumentError(
                "scoring='graph' but TOTALVI bundles have no scoring graph: the gene and "
                "protein likelihoods are computed on the host; use scoring='host' or 'auto'"
            )
        self.arrays = contents.arrays
        registry = contents.manifest.registry
        if registry.proteins is None or registry.proteins.n_proteins != c.n_proteins:
            raise BundleIntegrityError(
                f"{contents.path}: the registry's proteins do not match the config's "
                f"n_proteins={c.n_proteins}; re-export the bundle"
            )
        self._n_genes = contents.manifest.n_genes
        self._n_proteins = c.n_proteins
        self._check_arrays()
        self.encoder = contents.graph("encoder", device, intra_op_threads)
        self.provider = self.encoder.provider
        self.decoder = contents.graph("decoder", device, intra_op_threads, like=self.encoder)
        width = self.encoder.input_shape(F.IN_XY_NORM)[-1]
        if width not in (self._n_genes + self._n_proteins, None) and not isinstance(width, str):
            raise BundleIntegrityError(
                f"{F.ENCODER_FILE} takes {width} features but the manifest lists "
                f"{self._n_genes} genes and {self._n_proteins} proteins; re-export the bundle"
            )
        self.genes = GeneLikelihood(
            c.gene_likelihood, c.gene_dispersion, self.arrays[F.ARR_PX_R], self.decoder
        )
        a = self.arrays
        self._py_r = a[F.ARR_PY_R]
        self._back_alpha = a[F.ARR_BACK_ALPHA]
        self._back_log_beta = a[F.ARR_BACK_LOG_BETA]
        self._log_eff = a[F.ARR_LOG_EFFICIENCY]
        self._mask = a[F.ARR_PROTEIN_MASK].astype(np.float64) if c.protein_batch_mask else None
        self.learned_library = not c.use_observed_lib_size
        if self.learned_library:
            self._lib_means = a[F.ARR_LIB_MEANS].reshape(-1).astype(np.float64)
            self._lib_vars = a[F.ARR_LIB_VARS].reshape(-1).astype(np.float64)
        self.needs = DataNeeds(
            entries=True, log_library=False, positive_library=False, count_data=True
        )

    def _check_arrays(self) -> None:
        """Required arrays present with the manifest's shapes (fail at load, not mid-call)."""
        c, G, P = self.config, self._n_genes, self._n_proteins
        per = {"batch": c.n_batch, "label": c.n_labels}
        want: dict[str, tuple] = {
            F.ARR_PX_R: (G,)
            if c.gene_dispersion == "gene"
            else (G, per[c.gene_dispersion.split("-")[1]]),
            F.ARR_PY_R: (P,)
            if c.protein_dispersion == "protein"
            else (P, per[c.protein_dispersion.split("-")[1]]),
            F.ARR_BACK_ALPHA: (P, c.n_panel),
            F.ARR_BACK_LOG_BETA: (P, c.n_panel),
            F.ARR_LOG_EFFICIENCY: (P, c.n_batch),
        }
        if c.protein_batch_mask:
            want[F.ARR_PROTEIN_MASK] = (c.n_panel, P)
        if not c.use_observed_lib_size:
            want[F.ARR_LIB_MEANS] = want[F.ARR_LIB_VARS] = (1, c.n_batch)
        check_array_shapes(self.arrays, want)

    # ------------------------------------------------------------------ description
    @property
    def n_latent(self) -> int:
        return self.config.n_latent

    @property
    def n_features(self) -> int:
        return self._n_genes + self._n_proteins

    @property
    def n_proteins(self) -> int:
        return self._n_proteins

    @property
    def scores_on_graph(self) -> bool:
        return False

    def obs_use(self, scoring: bool) -> dict[str, str]:
        graphs = {"encoder": self.encoder.inputs, "decoder": self.decoder.inputs}
        return self.obs_usage(self.config, graphs, scoring)

    @staticmethod
    def obs_usage(
        config: TOTALVAEConfig, graph_inputs: Mapping[str, Sequence[str]], scoring: bool
    ) -> dict[str, str]:
        """The covariates the graphs take; for scoring also the batch (per-batch protein
        efficiency, and the dispersions and library prior where per batch), the labels (per
        label dispersions), the panel (the protein background prior and mask) and the size
        factors."""
        used = covariates_taken(graph_inputs, scoring)
        if scoring:
            c = config
            used.setdefault("batch", "the protein efficiency is per batch")
            for kind in (c.gene_dispersion, c.protein_dispersion):
                if kind.endswith("-label"):
                    used.setdefault("labels", "a dispersion is per label")
            used.setdefault("panel", "the protein background prior is per panel")
            if c.use_size_factor_key:
                used.setdefault("size_factor", "the model scales expression by size factors")
        return used

    # ------------------------------------------------------------------ pieces
    def encoder_input(self, mb: Minibatch) -> np.ndarray:
        c = self.config
        return encoder_input(mb.x, mb.y, c.log_variational, c.encoder_input_scaling)

    def encode(self, mb: Minibatch) -> dict[str, np.ndarray]:
        feeds = self.feeds(mb)
        feeds[F.IN_XY_NORM] = self.encoder_input(mb)
        return self.encoder.run(feeds)

    def library(
        self, mb: Minibatch, enc: Mapping[str, np.ndarray], seed: int, start: int, n: int
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(library size fed to the decoder (n or 1, cells, 1), the clamped log-library draw
        (n, cells, 1) or ``None`` when it is not learned)."""
        c = self.config
        if c.use_size_factor_key:
            return mb.size_factor.astype(np.float64)[None], None
        if c.use_observed_lib_size:
            if mb.entries is not None:
                total = mb.entries.row_sums(mb.entries.vals.astype(np.float64))
            else:
                total = mb.x.sum(1, dtype=np.float64)
            return total[None, :, None], None
        eps = rng.normals(seed, rng.STREAM_L, mb.cells, n, start=start).T[:, :, None]
        m = enc[F.OUT_QL_M].astype(np.float64)[None]
        s = np.sqrt(enc[F.OUT_QL_V].astype(np.float64))[None]
        log_l = np.minimum(m + eps * s, F.LOG_LIBRARY_MAX)
        return np.exp(log_l), log_l

    def library_prior(self, mb: Minibatch) -> tuple[np.ndarray, np.ndarray]:
        """Each cell's batch's log-library prior (mean, variance), (cells, 1)."""
        b = mb.batch.reshape(-1)
        return self._lib_means[b][:, None], self._lib_vars[b][:, None]

    def panel(self, mb: Minibatch) -> np.ndarray:
        """Each cell's panel code (the batch where no panel was registered)."""
        return mb.panel if mb.panel is not None else mb.batch

    def prepare(self, mb: Minibatch, enc: Mapping[str, np.ndarray] | None = None) -> TotalState:
        c = self.config
        panel = self.panel(mb)
        y = mb.y.astype(np.float64)
        theta = protein_dispersion(c.protein_dispersion, self._py_r, mb.batch, mb.labels)
        mask = None if self._mask is None else self._mask[panel.reshape(-1)]
        # the mixture's count terms, the same for every draw: once per group
        per_protein = D.nb_count_terms(y, theta)
        if mask is not None:
            per_protein = per_protein * mask
        eff = efficiency(self._log_eff, mb.batch)
        prior_m, prior_s = background_prior(self._back_alpha, self._back_log_beta, panel)
        log_eff = np.log(eff)
        eff_penalty = (0.5 * log_eff**2 + _LOG_SQRT_2PI + log_eff).sum(-1)
        return TotalState(
            genes=self.genes.prepare(mb),
            y=y,
            theta=np.asarray(theta, dtype=np.float64),
            counts=per_protein.sum(-1),
            mask=mask,
            eff=eff,
            prior_m=prior_m,
            prior_s=prior_s,
            eff_penalty=eff_penalty,
        )

    def _terms(
        self,
        mb: Minibatch,
        enc: Mapping[str, np.ndarray],
        state: TotalState,
        seed: int,
        start: int,
        n: int,
    ) -> dict[str, np.ndarray]:
        """Draws start..start+n: z, the library, the decoder, the background draw and both
        reconstruction losses, (n, cells) each."""
        _, z = self.z_draws(mb, enc, seed, start, n)
        library, log_library = self.library(mb, enc, seed, start, n)
        feeds = self.feeds(mb)
        feeds[F.IN_Z] = np.ascontiguousarray(z, dtype=np.float32)
        feeds[F.IN_LIBRARY] = np.ascontiguousarray(library, dtype=np.float32)
        dec = self.decoder.run(feeds)
        rec_gene = -state.genes.kernel.score(dec[F.OUT_PX_RATE], dec.get(F.OUT_PX_DROPOUT))
        alpha, beta = dec[F.OUT_PY_BACK_ALPHA], dec[F.OUT_PY_BACK_BETA]
        P = self._n_proteins
        eps = rng.normals(seed, rng.STREAM_PRO_BACK, mb.cells, n * P, start=start * P)
        eps = eps.reshape(mb.n, n, P).transpose(1, 0, 2).astype(np.float32)
        # Normal.rsample in float32, as torch: loc + eps * scale
        log_back = (alpha + eps * beta).astype(np.float64)
        rate_back = np.exp(log_back)
        rate_fore = rate_back * dec[F.OUT_PY_FORE_SCALE].astype(np.float64)
        mixing = dec[F.OUT_PY_MIXING].astype(np.float64)
        log_mix = nb_mixture_sum(
            state.y, state.eff * rate_back, state.eff * rate_fore, state.theta, mixing, state.mask
        )
        rec_protein = -(log_mix + state.counts)
        return {
            "z": z,
            "log_library": log_library,
            "rec_gene": rec_gene,
            "rec_protein": rec_protein,
            "log_back": log_back,
            "alpha": alpha.astype(np.float64),
            "beta": beta.astype(np.float64),
            "mixing": mixing,
        }

    # ------------------------------------------------------------------ the terms
    def elbo_terms(self, mb: Minibatch, seed: int) -> ElboTerms:
        enc = self.encode_scored(mb)
        state = self.prepare(mb)
        t = self._terms(mb, enc, state, seed, 0, 1)
        kl = D.kl_normal_standard(
            enc[F.OUT_QZ_M].astype(np.float64), enc[F.OUT_QZ_V].astype(np.float64)
        ).sum(-1)
        if self.learned_library:
            pm, pv = self.library_prior(mb)
            kl = kl + D.kl_normal(
                enc[F.OUT_QL_M].astype(np.float64), enc[F.OUT_QL_V].astype(np.float64), pm, pv
            ).sum(-1)
        kl_back = D.kl_normal(t["alpha"][0], t["beta"][0] ** 2, state.prior_m, state.prior_s**2)
        if state.mask is not None:
            kl_back = kl_back * state.mask
        # the regularisers TOTALVAE.loss adds to kl_div_back_pro (see the module docstring)
        expressed = F.PROTEIN_EXPRESSED_WEIGHT * D.softplus(-t["mixing"][0])
        kl = kl + kl_back.sum(-1) + state.eff_penalty + expressed.sum(-1)
        return ElboTerms(
            {"reconst_loss_gene": t["rec_gene"][0], "reconst_loss_protein": t["rec_protein"][0]},
            kl,
        )

    def log_weights(
        self,
        mb: Minibatch,
        enc: Mapping[str, np.ndarray],
        state: TotalState,
        seed: int,
        start: int,
        n: int,
    ) -> np.ndarray:
        t = self._terms(mb, enc, state, seed, start, n)
        z = t["z"]
        qm = enc[F.OUT_QZ_M].astype(np.float64)[None]
        qs = np.sqrt(enc[F.OUT_QZ_V].astype(np.float64))[None]
        log_back = t["log_back"]
        log_w = D.log_normal(z, 0.0, 1.0).sum(-1)
        log_w += D.log_normal(log_back, state.prior_m[None], state.prior_s[None]).sum(-1)
        log_w -= t["rec_gene"] + t["rec_protein"]
        log_w -= D.log_normal(z, qm, qs).sum(-1)
        log_w -= D.log_normal(log_back, t["alpha"], t["beta"]).sum(-1)
        if self.learned_library:
            pm, pv = self.library_prior(mb)
            lm = enc[F.OUT_QL_M].astype(np.float64)[None]
            ls = np.sqrt(enc[F.OUT_QL_V].astype(np.float64))[None]
            log_l = t["log_library"]
            log_w += D.log_normal(log_l, pm[None], np.sqrt(pv)[None]).sum(-1)
            log_w -= D.log_normal(log_l, lm, ls).sum(-1)
        return log_w
