"""PEAKVI (scvi-tools' ``PEAKVAE`` module): encoder, depth encoder, decoder, scoring graph;
the region factors in ``arrays.npz``."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from scvi_onnx.bundle import Registry
from scvi_onnx.bundle import format as F
from scvi_onnx.data import Entries
from scvi_onnx.errors import UnsupportedModelError
from scvi_onnx.maths import distributions as D
from scvi_onnx.maths.likelihood import BernoulliScorer
from scvi_onnx.selfcheck import VerifyRow, deviation

from .. import inspect
from ..graphs import GraphIO
from ..graphs.peakvae import (
    DecoderGraph,
    DepthGraph,
    EncoderGraph,
    ScoreGraph,
    first_layer_weight,
    sparse_graph,
)
from ..precision import within_rounding
from ..probes import N_PROBE_SAMPLES, module_eval, probe_cells, to_torch
from .base import ExportSpec, GraphExport
from .vae import feeds

#: Regions from which a PEAKVI bundle also gets the sparse encoders (``encoder_sparse.onnx``,
#: ``depth_sparse.onnx``, ~0.4 MB each at 100,000 regions); below it the encoders are cheap
#: either way. The manifest records the training data's share of non-zero values, from which
#: the runtime decides whether the CPU uses them (``scvi_onnx.models.base.sparse_wanted``).
SPARSE_MIN_REGIONS = 10_000


class PEAKVISpec(ExportSpec):
    """``scvi.model.PEAKVI``: every option of scvi-tools 1.4.2's PEAKVAE."""

    model_class = "PEAKVI"
    module_class = "PEAKVAE"

    def check(self) -> None:
        super().check()
        m = self.module
        if m.latent_distribution not in ("normal", "ln"):
            raise UnsupportedModelError(
                f"PEAKVI with latent_distribution={m.latent_distribution!r} is not supported "
                "(normal or ln)"
            )
        if m.model_depth != (m.d_encoder is not None):
            raise UnsupportedModelError(
                "PEAKVI module whose model_depth does not match its d_encoder; rebuild the "
                "model with scvi.model.PEAKVI"
            )

    # ------------------------------------------------------------------ manifest
    def config(self, registry: Registry) -> dict[str, Any]:
        m = self.module
        enc_norm = inspect.norm_placement(m.z_encoder.encoder)
        dec_norm = inspect.norm_placement(m.z_decoder.px_decoder)
        n_batch = registry.batch.n_categories
        return {
            "module_class": type(m).__name__,
            "n_input": int(m.n_input_regions),
            "n_latent": int(m.n_latent),
            "n_hidden": int(m.n_hidden),
            "n_layers_encoder": int(m.n_layers_encoder),
            "n_layers_decoder": int(m.n_layers_decoder),
            "n_batch": int(n_batch),
            "n_continuous_cov": int(m.n_continuous_cov),
            "n_cats_per_cov": [int(c) for c in (m.n_cats_per_cov or [])],
            "latent_distribution": m.latent_distribution,
            "model_depth": bool(m.model_depth),
            "region_factors": m.region_factors is not None,
            "encode_covariates": bool(m.encode_covariates),
            "deeply_inject_covariates": bool(m.z_decoder.px_decoder.inject_covariates),
            "encoder_batch_norm": enc_norm["batch_norm"],
            "encoder_layer_norm": enc_norm["layer_norm"],
            "decoder_batch_norm": dec_norm["batch_norm"],
            "decoder_layer_norm": dec_norm["layer_norm"],
            "var_eps": float(m.z_encoder.var_eps),
            "bce_log_min": F.BCE_LOG_MIN,
        }

    def arrays(self, genes: list[str]) -> dict[str, np.ndarray]:
        rf = self.module.region_factors
        if rf is None:
            return {}
        # what scvi-tools multiplies by: torch's sigmoid, float32 (get_region_factors())
        with torch.no_grad():
            f = torch.sigmoid(rf.detach()).cpu().numpy().astype(np.float32)
        return {F.ARR_REGION_FACTORS: f}

    # ------------------------------------------------------------------ graphs
    def io(self, config: dict) -> tuple[GraphIO, GraphIO, GraphIO, GraphIO]:
        """The encoder's, the depth graph's, the decoder's and the scorer's inputs and
        outputs."""
        uses_batch = config["n_batch"] > 1
        uses_cats = any(n > 1 for n in config["n_cats_per_cov"])
        uses_cont = config["n_continuous_cov"] > 0
        covs = [F.IN_CONT] * uses_cont + [F.IN_BATCH] * uses_batch + [F.IN_CAT] * uses_cats
        enc_in = [F.IN_X] + (covs if config["encode_covariates"] else [])
        dec_in = [F.IN_Z, *covs]
        return (
            GraphIO(tuple(enc_in), (F.OUT_QZ_M, F.OUT_QZ_V)),
            GraphIO(tuple(enc_in), (F.OUT_DEPTH,)),
            GraphIO(tuple(dec_in), (F.OUT_PX,)),
            GraphIO((*dec_in, F.IN_DEPTH, F.IN_COUNTS), (F.OUT_LOG_PX,)),
        )

    def graphs(
        self, registry: Registry, config: dict, arrays: dict, rng: np.random.Generator
    ) -> tuple[list[GraphExport], dict[str, np.ndarray]]:
        enc_io, depth_io, dec_io, score_io = self.io(config)
        k_cat = len(config["n_cats_per_cov"])
        enc_graph = EncoderGraph(self.module, enc_io, k_cat)
        dec_graph = DecoderGraph(self.module, dec_io, k_cat)
        score_graph = ScoreGraph(dec_graph, score_io, arrays.get(F.ARR_REGION_FACTORS))
        t = probe_cells(
            self.model,
            registry,
            config["n_input"],
            config["n_batch"],
            registry.labels.n_categories,
            rng,
        )
        enc_ref, px, z, depth = self.reference(config, t, rng)
        dec_feeds = feeds(dec_io, t, {F.IN_Z: z})
        x = t["X"]
        q = px * depth[None] if config["model_depth"] else px.copy()
        if F.ARR_REGION_FACTORS in arrays:
            q = q * arrays[F.ARR_REGION_FACTORS]  # float32, as torch: (p * d) * f
        log_px = -D.binary_cross_entropy(q.astype(np.float64), (x > 0).astype(np.float64))
        graphs = [GraphExport("encoder", enc_graph, enc_io, feeds(enc_io, t, {}), enc_ref)]
        if config["model_depth"]:
            depth_graph = DepthGraph(self.module, depth_io, k_cat)
            graphs.append(
                GraphExport(
                    "depth", depth_graph, depth_io, feeds(depth_io, t, {}), {F.OUT_DEPTH: depth}
                )
            )
        if config["n_input"] >= SPARSE_MIN_REGIONS:
            d = inspect.density(self.model)
            more = {} if d is None else {"density": round(d, 6)}
            if d is None:
                warnings.warn(
                    "the model's training data is not at hand, so the bundle cannot record "
                    "how sparse it is: the CPU will run the dense encoders unless loaded with "
                    "input_layer='sparse' (the faster choice for data up to ~5% non-zero, as "
                    "scATAC peaks usually are). Export with the data (adata=..., CLI --adata) "
                    "to record it",
                    UserWarning,
                    stacklevel=4,
                )
            graphs += self._sparse_graphs(graphs, config["n_input"], more)
        graphs += [
            GraphExport("decoder", dec_graph, dec_io, dec_feeds, {F.OUT_PX: px}),
            GraphExport(
                "scorer",
                score_graph,
                score_io,
                {**dec_feeds, F.IN_DEPTH: depth, F.IN_COUNTS: x},
                {F.OUT_LOG_PX: log_px.sum(-1)},
            ),
        ]
        return graphs, {F.PROBE_BATCH: t["batch"], F.PROBE_LABELS: t["labels"]}

    @staticmethod
    def _sparse_graphs(full: list[GraphExport], n_regions: int, more: dict) -> list[GraphExport]:
        """``encoder_sparse`` (and ``depth_sparse``): the full graphs after their first
        layer's product over the regions, fed ``x @ W`` of the probe cells; ``more``: what
        their manifest entries record besides (the training data's density)."""
        weights = [first_layer_weight(g.module).detach()[:n_regions] for g in full]
        if not all(bool(torch.isfinite(w).all()) for w in weights):
            # a product over the entries would give NaN to fewer cells than the dense one:
            # such a model keeps the full encoders only (their export warns of the values)
            warnings.warn(
                "the encoders' first-layer weights hold non-finite values: no sparse encoders",
                UserWarning,
                stacklevel=4,
            )
            return []
        out = []
        for g, w in zip(full, weights, strict=True):
            io = GraphIO(
                tuple(F.IN_X_PRODUCT if k == F.IN_X else k for k in g.io.inputs), g.io.outputs
            )
            x = np.ascontiguousarray(g.feeds[F.IN_X], dtype=np.float32)
            feeds = {k: v for k, v in g.feeds.items() if k != F.IN_X}
            feeds[F.IN_X_PRODUCT] = x @ w.numpy()
            out.append(
                GraphExport(
                    f"{g.name}_sparse",
                    sparse_graph(g.module, io, n_regions),
                    io,
                    feeds,
                    g.reference,
                    input_layer=(g.name, w, n_regions, more),
                )
            )
        return out

    def reference(self, config, t, rng):
        """scvi-tools' own module on the probes: ``q(z | x)``, ``d``, and ``px`` at probe z.

        Returns (encoder outputs, px (S, N, R), z (S, N, L), depth (N, 1)), float32.
        """
        m = self.module
        device = next(m.parameters()).device
        tt = to_torch(t, device)
        with module_eval(m):
            inf = m.inference(**m._get_inference_input(tt))
            qz = inf["qz"]
            enc = {F.OUT_QZ_M: qz.loc, F.OUT_QZ_V: qz.scale.square()}
            n = qz.loc.shape[0]
            depth = inf["d"] if config["model_depth"] else torch.ones(n, 1, device=device)
            eps = rng.standard_normal((N_PROBE_SAMPLES, n, config["n_latent"])).astype(np.float32)
            z = qz.loc[None] + torch.as_tensor(eps, device=device) * qz.scale[None]
            if config["latent_distribution"] == "ln":
                z = torch.softmax(z, dim=-1)
            px = []
            for s in range(N_PROBE_SAMPLES):
                gen_in = m._get_generative_input(tt, {"z": z[s], "qz": qz})
                px.append(m.generative(**gen_in)["px"])
        to_np = lambda v: np.ascontiguousarray(v.detach().cpu().numpy().astype(np.float32))  # noqa: E731
        return (
            {k: to_np(v) for k, v in enc.items()},
            to_np(torch.stack(px)),
            to_np(z),
            to_np(depth),
        )

    # ------------------------------------------------------------------ validation
    def checks(
        self, config, arrays, graphs, outputs, probes, atol, rtol, spread
    ) -> list[VerifyRow]:
        """The runtime's numpy likelihood kernel on the ONNX decoder's outputs equals the
        float64 reference on scvi-tools' (what ``get_elbo`` sums, end to end)."""
        score = next(g for g in graphs if g.name == "scorer")
        x = score.feeds[F.IN_COUNTS]
        kernel = BernoulliScorer(
            Entries.from_dense(np.ascontiguousarray(x, dtype=np.float32)),
            x.shape[1],
            arrays.get(F.ARR_REGION_FACTORS),
        )
        depth = score.feeds[F.IN_DEPTH] if config["model_depth"] else None
        got = kernel.score(outputs["decoder"][F.OUT_PX], depth)
        want = score.reference[F.OUT_LOG_PX]
        row = deviation("host_log_px", got, want, atol, rtol)
        if not row.ok:  # the scoring graph computes the same sums: its spread is theirs
            row = within_rounding(row, got, want, spread("scorer").get(F.OUT_LOG_PX))
        return [row]
