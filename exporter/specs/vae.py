"""SCVI (scvi-tools' ``VAE`` module): encoder, decoder, scoring graph; dispersion and library
prior in ``arrays.npz``."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from scvi_onnx.bundle import Registry
from scvi_onnx.bundle import format as F
from scvi_onnx.maths.dispersion import cell_dispersion
from scvi_onnx.selfcheck import VerifyRow, deviation

from .. import inspect
from ..graphs import GraphIO
from ..graphs.vae import DecoderGraph, EncoderGraph, ScoreGraph
from ..precision import within_rounding
from ..probes import N_PROBE_SAMPLES, module_eval, probe_cells, to_torch
from .base import ExportSpec, GraphExport


class SCVISpec(ExportSpec):
    """``scvi.model.SCVI``: every option of scvi-tools 1.4.2's VAE."""

    model_class = "SCVI"
    module_class = "VAE"

    # ------------------------------------------------------------------ manifest
    def decoder_fc(self):
        """The decoder's ``FCLayers`` (for its norm placement and covariate injection)."""
        return self.module.decoder.px_decoder

    def config(self, registry: Registry) -> dict[str, Any]:
        m = self.module
        dec_fc = self.decoder_fc()
        enc_norm = inspect.norm_placement(m.z_encoder.encoder)
        dec_norm = inspect.norm_placement(dec_fc)
        return {
            "module_class": type(m).__name__,
            "n_input": int(m.n_input),
            "n_latent": int(m.n_latent),
            "n_hidden": int(m.n_hidden),
            "n_layers": int(m.n_layers),
            "n_batch": int(m.n_batch),
            "n_labels": int(m.n_labels),
            "n_continuous_cov": len(registry.continuous_covariates),
            "n_cats_per_cov": [c.n_categories for c in registry.categorical_covariates],
            "gene_likelihood": m.gene_likelihood,
            "dispersion": m.dispersion,
            "latent_distribution": m.latent_distribution,
            "log_variational": bool(m.log_variational),
            "use_observed_lib_size": bool(m.use_observed_lib_size),
            "use_size_factor_key": bool(m.use_size_factor_key),
            "encode_covariates": self.encodes_covariates(),
            "deeply_inject_covariates": bool(dec_fc.inject_covariates),
            "batch_representation": m.batch_representation,
            "encoder_batch_norm": enc_norm["batch_norm"],
            "encoder_layer_norm": enc_norm["layer_norm"],
            "decoder_batch_norm": dec_norm["batch_norm"],
            "decoder_layer_norm": dec_norm["layer_norm"],
            "var_eps": float(m.z_encoder.var_eps),
            "likelihood_eps": F.LIKELIHOOD_EPS,
        }

    def encodes_covariates(self) -> bool:
        return bool(self.module.encode_covariates)

    def arrays(self, genes: list[str]) -> dict[str, np.ndarray]:
        m = self.module
        out: dict[str, np.ndarray] = {}
        if m.dispersion != "gene-cell":
            out[F.ARR_PX_R] = m.px_r.detach().cpu().numpy().astype(np.float32)
        if not m.use_observed_lib_size:
            out[F.ARR_LIB_MEANS] = m.library_log_means.detach().cpu().numpy().astype(np.float32)
            out[F.ARR_LIB_VARS] = m.library_log_vars.detach().cpu().numpy().astype(np.float32)
        return out

    # ------------------------------------------------------------------ graphs
    def io(self, config: dict) -> tuple[GraphIO, GraphIO]:
        """The encoder's and the decoder's inputs and outputs."""
        uses_batch = config["batch_representation"] == "embedding" or (
            config["batch_representation"] == "one-hot" and config["n_batch"] > 1
        )
        uses_cats = any(n > 1 for n in config["n_cats_per_cov"])
        uses_cont = config["n_continuous_cov"] > 0
        covs = [F.IN_CONT] * uses_cont + [F.IN_BATCH] * uses_batch + [F.IN_CAT] * uses_cats
        enc_in = [F.IN_X_LOG1P if config["log_variational"] else F.IN_X]
        if config["encode_covariates"]:
            enc_in += covs
        enc_out = [F.OUT_QZ_M, F.OUT_QZ_V]
        if not config["use_observed_lib_size"]:
            enc_out += [F.OUT_QL_M, F.OUT_QL_V]
        dec_out = [F.OUT_PX_RATE]
        if config["dispersion"] == "gene-cell":
            dec_out.append(F.OUT_PX_R)
        if config["gene_likelihood"] == "zinb":
            dec_out.append(F.OUT_PX_DROPOUT)
        return (
            GraphIO(tuple(enc_in), tuple(enc_out)),
            GraphIO((F.IN_Z, F.IN_LIBRARY, *covs), tuple(dec_out)),
        )

    def embedding_weight(self):
        m = self.module
        if m.batch_representation != "embedding":
            return None
        return m.get_embedding("batch").weight

    def decoder_graph(self, io: GraphIO) -> torch.nn.Module:
        return DecoderGraph(self.module, io, emb_weight=self.embedding_weight())

    def graphs(
        self, registry: Registry, config: dict, arrays: dict, rng: np.random.Generator
    ) -> tuple[list[GraphExport], dict[str, np.ndarray]]:
        enc_io, dec_io = self.io(config)
        enc_graph = EncoderGraph(self.module, enc_io, emb_weight=self.embedding_weight())
        dec_graph = self.decoder_graph(dec_io)
        t = probe_cells(
            self.model, registry, config["n_input"], config["n_batch"], config["n_labels"], rng
        )
        enc_ref, dec_ref, z, library = self.reference(config, t, rng)
        dec_feeds = feeds(dec_io, t, {F.IN_Z: z, F.IN_LIBRARY: library})
        graphs = [
            GraphExport("encoder", enc_graph, enc_io, feeds(enc_io, t, {}), enc_ref),
            GraphExport("decoder", dec_graph, dec_io, dec_feeds, dec_ref),
        ]
        graphs += self.more_graphs(config, arrays, graphs, t, z, rng)
        return graphs, {F.PROBE_BATCH: t["batch"], F.PROBE_LABELS: t["labels"]}

    def more_graphs(self, config, arrays, graphs, t, z, rng) -> list[GraphExport]:
        """Graphs after the encoder and decoder: the scoring graph (not for gene-cell
        dispersion, whose count terms change with every sample)."""
        if config["dispersion"] == "gene-cell":
            return []
        dec = graphs[1]
        return [scorer_graph(dec, config, arrays, t)]

    def reference(self, config, t, rng):
        """scvi-tools' own modules on the probes: encoder outputs and decoder outputs."""
        m = self.module
        device = next(m.parameters()).device
        tt = to_torch(t, device)
        with module_eval(m):
            inf = m.inference(**m._get_inference_input(tt))
            qz_m = inf["qz"].loc
            qz_v = inf["qz"].scale.square()
            enc = {F.OUT_QZ_M: qz_m, F.OUT_QZ_V: qz_v}
            if inf.get("ql") is not None:
                enc[F.OUT_QL_M] = inf["ql"].loc
                enc[F.OUT_QL_V] = inf["ql"].scale.square()
            n = qz_m.shape[0]
            eps = rng.standard_normal((N_PROBE_SAMPLES, n, config["n_latent"])).astype(np.float32)
            z = qz_m[None] + torch.as_tensor(eps, device=device) * qz_v.sqrt()[None]
            if config["latent_distribution"] == "ln":
                z = torch.softmax(z, dim=-1)
            if config["use_size_factor_key"]:
                library = torch.log(tt["size_factor"])[None].expand(N_PROBE_SAMPLES, -1, -1)
            elif config["use_observed_lib_size"]:
                library = torch.log(tt["X"].sum(1, keepdim=True))[None].expand(
                    N_PROBE_SAMPLES, -1, -1
                )
            else:
                le = rng.standard_normal((N_PROBE_SAMPLES, n, 1)).astype(np.float32)
                library = (
                    enc[F.OUT_QL_M][None]
                    + torch.as_tensor(le, device=device) * enc[F.OUT_QL_V].sqrt()[None]
                )
            gen_in = m._get_generative_input(tt, {"z": z[0], "library": library[0]})
            dec: dict[str, list] = {}
            for s in range(N_PROBE_SAMPLES):
                gen_in["z"], gen_in["library"] = z[s], library[s]
                if config["use_size_factor_key"]:
                    gen_in["size_factor"] = library[s]
                px = m.generative(**gen_in)["px"]
                lik = config["gene_likelihood"]
                rate = px.rate if lik == "poisson" else (px.loc if lik == "normal" else px.mu)
                dec.setdefault(F.OUT_PX_RATE, []).append(rate)
                theta = px.scale if lik == "normal" else getattr(px, "theta", None)
                if theta is not None:
                    dec.setdefault(F.PROBE_THETA, []).append(theta.expand_as(rate))
                if lik == "zinb":
                    dec.setdefault(F.OUT_PX_DROPOUT, []).append(px.zi_logits)
        to_np = lambda v: v.detach().cpu().numpy().astype(np.float32)  # noqa: E731
        enc_np = {k: to_np(v) for k, v in enc.items()}
        dec_np = {k: to_np(torch.stack(v)) for k, v in dec.items()}
        return enc_np, dec_np, to_np(z), to_np(library)

    # ------------------------------------------------------------------ validation
    def checks(
        self, config, arrays, graphs, outputs, probes, atol, rtol, spread
    ) -> list[VerifyRow]:
        """The dispersion the runtime selects equals scvi-tools' ``px.theta`` (or scale).

        For gene-cell dispersion it is ``exp`` of the decoder's ``px_r``: where that fails,
        the spread it is judged against is ``exp`` of the traced decoder's float32 and float64
        ``px_r`` (its absolute rounding becomes relative in theta)."""
        ref = next(g.reference for g in graphs if g.name == "decoder")
        if F.PROBE_THETA not in ref:
            return []
        want = ref[F.PROBE_THETA]

        def theta_of(px_r: np.ndarray | None) -> np.ndarray:
            theta = cell_dispersion(
                config["dispersion"],
                arrays.get(F.ARR_PX_R),
                px_r,
                probes[F.PROBE_BATCH],
                probes[F.PROBE_LABELS],
            )
            return np.broadcast_to(theta, want.shape)

        theta = theta_of(outputs["decoder"].get(F.OUT_PX_R)).astype(np.float32)
        row = deviation("theta", theta, want, atol, rtol)
        if not row.ok and config["dispersion"] == "gene-cell":  # else theta is from arrays
            px_r = spread("decoder").get(F.OUT_PX_R)
            if px_r is not None:
                row = within_rounding(row, theta, want, tuple(theta_of(v) for v in px_r))
        return [row]


def feeds(io: GraphIO, t: dict[str, np.ndarray], extra: dict[str, np.ndarray]) -> dict:
    """A graph's probe inputs from the probe cells ``t`` (and ``extra`` ones)."""
    src = {
        F.IN_X: t["X"],
        F.IN_X_LOG1P: np.log1p(t["X"]) if F.IN_X_LOG1P in io.inputs else None,
        F.IN_BATCH: t["batch"],
        F.IN_CAT: t.get("extra_categorical_covs"),
        F.IN_CONT: t.get("extra_continuous_covs"),
        **extra,
    }
    return {name: np.ascontiguousarray(src[name]) for name in io.inputs}


def scorer_graph(dec: GraphExport, config: dict, arrays: dict, t: dict) -> GraphExport:
    """The scoring graph (decoder + log p(x | z) summed over genes, without count terms), its
    feeds, and its reference: the float64 formulas of ``scvi_onnx.maths.distributions`` on
    scvi-tools' own decoder outputs, less the count terms."""
    from scipy.special import gammaln

    from scvi_onnx.maths import distributions as D

    lik = config["gene_likelihood"]
    inputs = [*dec.io.inputs, F.IN_COUNTS]
    # the labels pick a per-label dispersion; Poisson has none (scvi-tools accepts and ignores
    # dispersion="gene-label" for it, and the traced graph would not take the input)
    if lik != "poisson" and config["dispersion"] == "gene-label" and config["n_labels"] > 1:
        inputs.append(F.IN_LABELS)
    io = GraphIO(tuple(inputs), (F.OUT_LOG_PX,))
    graph = ScoreGraph(dec.module, io, config, arrays.get(F.ARR_PX_R))
    graph_feeds = {**dec.feeds, F.IN_COUNTS: t["X"]}
    if F.IN_LABELS in inputs:
        graph_feeds[F.IN_LABELS] = t["labels"]
    ref = dec.reference
    x = t["X"].astype(np.float64)
    mu = ref[F.OUT_PX_RATE].astype(np.float64)
    if lik == "poisson":
        full, counts = D.log_poisson(x, mu), -gammaln(x + 1.0)
    elif lik == "normal":
        full, counts = D.log_normal(x, mu, ref[F.PROBE_THETA].astype(np.float64)), 0.0
    else:
        theta = ref[F.PROBE_THETA].astype(np.float64)
        if lik == "nb":
            full = D.log_nb_positive(x, mu, theta)
            mask = x != 0
        else:
            full = D.log_zinb_positive(x, mu, theta, ref[F.OUT_PX_DROPOUT].astype(np.float64))
            mask = x > F.LIKELIHOOD_EPS
        counts = np.where(mask, gammaln(x + theta) - gammaln(theta) - gammaln(x + 1.0), 0.0)
    return GraphExport("scorer", graph, io, graph_feeds, {F.OUT_LOG_PX: (full - counts).sum(-1)})
