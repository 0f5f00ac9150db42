"""TOTALVI (scvi-tools' ``TOTALVAE`` module): encoder and decoder graphs without their draws;
gene and protein dispersions, the protein background prior, the per-batch protein efficiency,
the library-size prior and the panels' protein masks in ``arrays.npz``."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from scvi_onnx.bundle import CategoricalField, ProteinField, Registry
from scvi_onnx.bundle import format as F
from scvi_onnx.errors import UnsupportedModelError
from scvi_onnx.maths.dispersion import cell_codes, dispersion_table
from scvi_onnx.models.totalvae import (
    background_prior,
    efficiency,
    encoder_input,
    protein_dispersion,
)
from scvi_onnx.selfcheck import VerifyRow, deviation

from .. import inspect
from ..graphs import GraphIO
from ..graphs.totalvae import TotalDecoderGraph, TotalEncoderGraph, _activation
from ..probes import N_PROBE_SAMPLES, N_SYNTHETIC_PROBES, module_eval, probe_cells, to_torch
from .base import ExportSpec, GraphExport
from .vae import feeds as probe_feeds

logger = logging.getLogger(__name__)

#: The scvi-tools release whose TOTALVAE first divided the encoder's counts by 1 + their mean.
SCALED_INPUT_SINCE = "1.3.1"
#: scvi-tools' REGISTRY_KEYS names of TOTALVI's protein counts and panel codes.
PROTEIN_KEY = "proteins"
PANEL_KEY = "panel"
#: Registered fields whose MuData modality the registry records (setup_mudata).
_FIELDS = (
    "X",
    PROTEIN_KEY,
    "batch",
    "labels",
    PANEL_KEY,
    "size_factor",
    "extra_categorical_covs",
    "extra_continuous_covs",
)


class TOTALVISpec(ExportSpec):
    """``scvi.model.TOTALVI``: every option of scvi-tools 1.4.2's TOTALVAE."""

    model_class = "TOTALVI"
    module_class = "TOTALVAE"

    # ------------------------------------------------------------------ refusals
    def check(self) -> None:
        super().check()
        if not self.encoder_input_scaling:
            logger.warning(
                "this TOTALVI was trained by scvi-tools %s, whose encoder read log(1 + counts): "
                "the bundle reproduces that. scvi-tools >= 1.3.1 (the installed one too) divides "
                "the counts by 1 + their mean first, also for older models, and so gives "
                "another latent for it; export with reproduce='installed' (--reproduce "
                "installed) for those numbers",
                self.trained_with,
            )
        m = self.module
        if getattr(m, "minified_data_type", None) is not None:
            raise UnsupportedModelError(
                "TOTALVI on minified data is not supported: the runtime reads the counts; "
                "export the model set up on its full AnnData"
            )
        for name, value, ok in (
            ("gene_dispersion", m.gene_dispersion, ("gene", "gene-batch")),
            ("protein_dispersion", m.protein_dispersion, ("protein", "protein-batch")),
        ):
            if value.endswith("-label"):
                raise UnsupportedModelError(
                    f"TOTALVI with {name}={value!r} is not supported: scvi-tools 1.4.2 cannot "
                    "run it (TOTALVAE._regular_inference selects the dispersion by a label it is "
                    "never given, and fails in every forward pass: training, get_elbo, ...), so "
                    "there are no numbers to reproduce. Train with "
                    f"{name}={ok[0]!r} or {ok[1]!r}"
                )
            if value not in ok:
                raise UnsupportedModelError(
                    f"TOTALVI with {name}={value!r} is not supported (scvi-tools 1.4.2's "
                    f"TOTALVAE has no dispersion parameter for it); use one of {ok}"
                )
        if m.gene_likelihood not in ("nb", "zinb"):
            raise UnsupportedModelError(
                f"TOTALVI with gene_likelihood={m.gene_likelihood!r} is not supported (nb, zinb)"
            )
        if m.latent_distribution not in ("normal", "ln"):
            raise UnsupportedModelError(
                f"TOTALVI with latent_distribution={m.latent_distribution!r} is not supported"
            )
        _activation(m.decoder.activation_function_bg)
        if m.background_pro_alpha.dim() != 2 or m.background_pro_log_beta.dim() != 2:
            raise UnsupportedModelError(
                "TOTALVI with a background prior not per panel (background_pro_alpha of shape "
                f"{tuple(m.background_pro_alpha.shape)}) is not supported"
            )
        if m.panel_key not in ("batch", PANEL_KEY):
            raise UnsupportedModelError(f"TOTALVI with panel_key={m.panel_key!r} is not supported")
        if m.protein_batch_mask is not None:
            for k in m.protein_batch_mask:
                if not str(k).isdigit() or int(k) >= m.n_panel:
                    raise UnsupportedModelError(
                        f"protein_batch_mask has an entry {k!r} that is no panel code "
                        f"(0..{m.n_panel - 1})"
                    )

    # ------------------------------------------------------------------ manifest
    def registry(self) -> Registry:
        import dataclasses

        base = inspect.registry(self.model)
        reg = self.model.registry_
        pf = inspect.field(reg, PROTEIN_KEY)
        dr, st = pf.get("data_registry", {}), pf.get("state_registry", {})
        raw = list(st.get("column_names", []))
        # scvi-tools numbers the proteins of an obsm array registered without names
        named = not all(isinstance(n, (int, np.integer)) for n in raw)
        proteins = ProteinField(
            attr_name=str(dr.get("attr_name")),
            attr_key=dr.get("attr_key"),
            names=tuple(str(n) for n in raw),
            named=named,
            names_uns_key=reg.get("setup_args", {}).get("protein_names_uns_key"),
        )
        panel = None
        if self.module.panel_key == PANEL_KEY:
            pst = inspect.field(reg, PANEL_KEY).get("state_registry", {})
            panel = CategoricalField(
                key=pst.get("original_key"),
                categories=tuple(inspect.categories(pst.get("categorical_mapping", [0]))),
            )
        modalities = None
        if reg.get("setup_method_name") == "setup_mudata":
            modalities = {
                k: inspect.field(reg, k).get("data_registry", {}).get("mod_key")
                for k in _FIELDS
                if k in reg["field_registries"]
            }
        return dataclasses.replace(base, proteins=proteins, panel=panel, modalities=modalities)

    def config(self, registry: Registry) -> dict[str, Any]:
        m = self.module
        enc_norm = inspect.norm_placement(m.encoder.encoder)
        dec_norm = inspect.norm_placement(m.decoder.px_decoder)
        return {
            "module_class": type(m).__name__,
            "n_input": int(m.n_input_genes),
            "n_proteins": int(m.n_input_proteins),
            "n_latent": int(m.n_latent),
            "n_hidden": int(m.encoder.z_mean_encoder.in_features),
            "n_layers_encoder": len(m.encoder.encoder.fc_layers),
            "n_layers_decoder": len(m.decoder.px_decoder.fc_layers),
            "n_batch": int(m.n_batch),
            "n_labels": int(m.n_labels),
            "n_panel": int(m.n_panel),
            "n_continuous_cov": len(registry.continuous_covariates),
            "n_cats_per_cov": [c.n_categories for c in registry.categorical_covariates],
            "gene_likelihood": m.gene_likelihood,
            "gene_dispersion": m.gene_dispersion,
            "protein_dispersion": m.protein_dispersion,
            "latent_distribution": m.latent_distribution,
            "log_variational": bool(m.log_variational),
            "use_observed_lib_size": bool(m.use_observed_lib_size),
            "use_size_factor_key": bool(m.use_size_factor_key),
            "encode_covariates": bool(m.encode_covariates),
            "protein_batch_mask": m.protein_batch_mask is not None,
            "panel_key": m.panel_key,
            "activation_function_bg": _activation(m.decoder.activation_function_bg),
            "encoder_input_scaling": self.encoder_input_scaling,
            "encoder_batch_norm": enc_norm["batch_norm"],
            "encoder_layer_norm": enc_norm["layer_norm"],
            "decoder_batch_norm": dec_norm["batch_norm"],
            "decoder_layer_norm": dec_norm["layer_norm"],
            "var_eps": F.VAR_EPS,
            "likelihood_eps": F.LIKELIHOOD_EPS,
        }

    def arrays(self, genes: list[str]) -> dict[str, np.ndarray]:
        m = self.module

        def arr(t: torch.Tensor) -> np.ndarray:
            return t.detach().cpu().numpy().astype(np.float32)

        out = {
            F.ARR_PX_R: arr(m.px_r),
            F.ARR_PY_R: arr(m.py_r),
            F.ARR_BACK_ALPHA: arr(m.background_pro_alpha),
            F.ARR_BACK_LOG_BETA: arr(m.background_pro_log_beta),
            F.ARR_LOG_EFFICIENCY: arr(m.log_per_batch_efficiency),
        }
        if not m.use_observed_lib_size:
            out[F.ARR_LIB_MEANS] = arr(m.library_log_means)
            out[F.ARR_LIB_VARS] = arr(m.library_log_vars)
        if m.protein_batch_mask is not None:
            # scvi-tools keys the mask by the panel code (str); a panel without an entry
            # (none in training) keeps every protein
            mask = np.ones((m.n_panel, m.n_input_proteins), dtype=bool)
            for k, v in m.protein_batch_mask.items():
                mask[int(k)] = np.asarray(v, dtype=bool)
            out[F.ARR_PROTEIN_MASK] = mask
        return out

    @property
    def encoder_input_scaling(self) -> bool:
        """Whether the encoder reads the counts divided by ``1 + their mean``.

        scvi-tools 1.3.1 added that scaling to ``TOTALVAE``'s inference and applies it to
        every model it loads, also to weights trained without it (it keeps older versions'
        background activation in ``on_load``, but not this). ``reproduce="trained"`` exports
        a model trained before 1.3.1 without it, as that version computed its posterior."""
        return self.reproduce == "installed" or not inspect.version_before(
            self.trained_with, SCALED_INPUT_SINCE
        )

    # ------------------------------------------------------------------ graphs
    def io(self, config: dict) -> tuple[GraphIO, GraphIO]:
        """The encoder's and the decoder's inputs and outputs."""
        uses_batch = config["n_batch"] > 1
        uses_cats = any(n > 1 for n in config["n_cats_per_cov"])
        uses_cont = config["n_continuous_cov"] > 0
        covs = [F.IN_CONT] * uses_cont + [F.IN_BATCH] * uses_batch + [F.IN_CAT] * uses_cats
        enc_in = [F.IN_XY_NORM] + (covs if config["encode_covariates"] else [])
        enc_out = [F.OUT_QZ_M, F.OUT_QZ_V]
        if not config["use_observed_lib_size"]:
            enc_out += [F.OUT_QL_M, F.OUT_QL_V]
        dec_out = [F.OUT_PX_RATE] + [F.OUT_PX_DROPOUT] * (config["gene_likelihood"] == "zinb")
        dec_out += [F.OUT_PY_BACK_ALPHA, F.OUT_PY_BACK_BETA, F.OUT_PY_FORE_SCALE, F.OUT_PY_MIXING]
        return (
            GraphIO(tuple(enc_in), tuple(enc_out)),
            GraphIO((F.IN_Z, F.IN_LIBRARY, *covs), tuple(dec_out)),
        )

    def graphs(
        self, registry: Registry, config: dict, arrays: dict, rng: np.random.Generator
    ) -> tuple[list[GraphExport], dict[str, np.ndarray]]:
        enc_io, dec_io = self.io(config)
        n, n_pro = N_SYNTHETIC_PROBES, config["n_proteins"]
        # synthetic protein counts: a background around 10-50 plus a foreground in some cells
        back = rng.uniform(5, 50, size=(1, n_pro))
        fore = rng.uniform(0, 500, size=(n, n_pro)) * (rng.uniform(size=(n, n_pro)) < 0.3)
        extra = {PROTEIN_KEY: rng.poisson(back + fore).astype(np.float32)}
        if registry.panel is not None:
            extra[PANEL_KEY] = (np.arange(n) % config["n_panel"]).reshape(-1, 1).astype(np.int64)
        t = probe_cells(
            self.model,
            registry,
            config["n_input"],
            config["n_batch"],
            config["n_labels"],
            rng,
            extra=extra,
        )
        enc_ref, dec_ref, selections, z, library = self.reference(config, t, rng)
        xy = encoder_input(
            t["X"], t[PROTEIN_KEY], config["log_variational"], config["encoder_input_scaling"]
        )
        enc_feeds = probe_feeds(enc_io, t, {F.IN_XY_NORM: xy})
        dec_feeds = probe_feeds(dec_io, t, {F.IN_Z: z, F.IN_LIBRARY: library})
        enc_graph = TotalEncoderGraph(self.module, enc_io)
        dec_graph = TotalDecoderGraph(self.module, dec_io)
        graphs = [
            GraphExport("encoder", enc_graph, enc_io, enc_feeds, enc_ref),
            GraphExport("decoder", dec_graph, dec_io, dec_feeds, dec_ref),
        ]
        probes = {F.PROBE_BATCH: t["batch"], F.PROBE_LABELS: t["labels"]}
        probes[F.PROBE_PANEL] = t[PANEL_KEY] if PANEL_KEY in t else t["batch"]
        probes |= {F.PROBE_TOTALVI[k]: v for k, v in selections.items()}
        return graphs, probes

    def reference(self, config, t, rng):
        """scvi-tools' own module on the probes: the encoder's posteriors, the decoder's
        outputs on probe draws of z and the library, and its per-cell selections."""
        m = self.module
        device = next(m.parameters()).device
        cuda = [device.index or 0] if device.type == "cuda" else []
        tt = to_torch(t, device)
        n_s, n = N_PROBE_SAMPLES, t["X"].shape[0]
        to_np = lambda v: np.ascontiguousarray(v.detach().cpu().numpy().astype(np.float32))  # noqa: E731
        # inference and generative draw (z, l, the background): keep the user's RNG as found
        with module_eval(m), torch.random.fork_rng(devices=cuda):
            inputs = m._get_inference_input(tt)
            inf = m.inference(**inputs)
            qz, ql = inf["qz"], inf["ql"]
            if not config["encoder_input_scaling"]:
                qz, ql = unscaled_posteriors(m, inputs)
            enc = {F.OUT_QZ_M: qz.loc, F.OUT_QZ_V: qz.scale.square()}
            if not config["use_observed_lib_size"]:
                enc[F.OUT_QL_M] = ql.loc
                enc[F.OUT_QL_V] = ql.scale.square()
            prior = inf["back_mean_prior"]
            eps = rng.standard_normal((n_s, n, config["n_latent"])).astype(np.float32)
            z = qz.loc[None] + torch.as_tensor(eps, device=device) * qz.scale[None]
            if config["latent_distribution"] == "ln":
                z = torch.softmax(z, dim=-1)
            if config["use_size_factor_key"]:
                library = tt["size_factor"][None].expand(n_s, -1, -1)
            elif config["use_observed_lib_size"]:
                library = tt["X"].sum(1, keepdim=True)[None].expand(n_s, -1, -1)
            else:
                le = torch.as_tensor(rng.standard_normal((n_s, n, 1)).astype(np.float32))
                log_l = ql.loc[None] + le.to(device) * ql.scale[None]
                library = torch.exp(torch.clamp(log_l, max=F.LOG_LIBRARY_MAX))
            dec: dict[str, list] = {}
            for s in range(n_s):
                gen_in = m._get_generative_input(tt, {"z": z[s], "library_gene": library[s]})
                out = m.generative(**gen_in)
                px, py = out["px_"], out["py_"]
                for key, v in (
                    (F.OUT_PX_RATE, px["rate"]),
                    (F.OUT_PX_DROPOUT, px["dropout"]),
                    (F.OUT_PY_BACK_ALPHA, py["back_alpha"]),
                    (F.OUT_PY_BACK_BETA, py["back_beta"]),
                    (F.OUT_PY_FORE_SCALE, py["fore_scale"]),
                    (F.OUT_PY_MIXING, py["mixing"]),
                ):
                    dec.setdefault(key, []).append(v)
            selections = {
                "theta": to_np(px["r"].expand_as(px["rate"])),
                "py_theta": to_np(py["r"].expand_as(py["mixing"])),
                "efficiency": to_np(out["per_batch_efficiency"]),
                "prior_alpha": to_np(prior.loc.expand_as(py["mixing"])),
                "prior_beta": to_np(prior.scale.expand_as(py["mixing"])),
            }
        if config["gene_likelihood"] != "zinb":
            dec.pop(F.OUT_PX_DROPOUT)
        enc_np = {k: to_np(v) for k, v in enc.items()}
        dec_np = {k: to_np(torch.stack(v)) for k, v in dec.items()}
        return enc_np, dec_np, selections, to_np(z), to_np(library)

    # ------------------------------------------------------------------ validation
    def checks(
        self, config, arrays, graphs, outputs, probes, atol, rtol, spread
    ) -> list[VerifyRow]:
        """The runtime's numpy selections equal scvi-tools' on the probe cells: the gene and
        protein dispersions, the per-batch efficiency and the background prior."""
        batch, labels = probes[F.PROBE_BATCH], probes[F.PROBE_LABELS]
        theta = dispersion_table(arrays[F.ARR_PX_R])
        if theta.ndim == 2:
            theta = theta[cell_codes(config["gene_dispersion"], batch, labels)]
        prior_m, prior_s = background_prior(
            arrays[F.ARR_BACK_ALPHA], arrays[F.ARR_BACK_LOG_BETA], probes[F.PROBE_PANEL]
        )
        got = {
            "theta": theta,
            "py_theta": protein_dispersion(
                config["protein_dispersion"], arrays[F.ARR_PY_R], batch, labels
            ),
            "efficiency": efficiency(arrays[F.ARR_LOG_EFFICIENCY], batch),
            "prior_alpha": prior_m,
            "prior_beta": prior_s,
        }
        rows = []
        for k, v in got.items():
            want = probes[F.PROBE_TOTALVI[k]]
            rows.append(deviation(k, np.broadcast_to(v, want.shape), want, atol, rtol))
        return rows


def unscaled_posteriors(m, inputs: dict):
    """``q(z | x)`` and ``q(l | x)`` as ``TOTALVAE._regular_inference`` of scvi-tools < 1.3.1
    computed them: the encoder on ``log(1 + x)`` and ``log(1 + y)`` (no scaling by the
    mean), with the covariates as in 1.4.2 (the code is otherwise the same)."""
    x, y = inputs["x"], inputs["y"]
    if m.log_variational:
        x, y = torch.log(1 + x), torch.log(1 + y)
    cont, cats = inputs.get("cont_covs"), inputs.get("cat_covs")
    enc_in = torch.cat((x, y), dim=-1)
    if cont is not None and m.encode_covariates:
        enc_in = torch.cat((enc_in, cont), dim=-1)
    cat_in = torch.split(cats, 1, dim=1) if cats is not None and m.encode_covariates else ()
    qz, ql, _, _ = m.encoder(enc_in, inputs["batch_index"], *cat_in)
    return qz, ql
