"""SCANVI (scvi-tools' ``SCANVAE`` module): SCVI's graphs plus the classifier and the z2
graphs; the label prior in ``arrays.npz``."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from scvi_onnx.bundle import Registry
from scvi_onnx.bundle import format as F
from scvi_onnx.errors import UnsupportedModelError

from .. import inspect
from ..graphs import GraphIO
from ..graphs.scanvae import ClassifierGraph, Z1DecoderGraph, Z2EncoderGraph
from ..probes import module_eval
from .base import GraphExport
from .vae import SCVISpec


class SCANVISpec(SCVISpec):
    """``scvi.model.SCANVI``."""

    model_class = "SCANVI"
    module_class = "SCANVAE"

    def check(self) -> None:
        super().check()
        m = self.module
        if getattr(m, "use_labels_groups", False):
            raise UnsupportedModelError("SCANVI with use_labels_groups=True is not supported")
        if m.dispersion == "gene-label":
            raise UnsupportedModelError(
                "SCANVI with dispersion='gene-label' is not supported: scvi-tools 1.4.2 one-hot "
                "encodes the label over the known labels only, so it fails on every cell of the "
                "unlabeled category"
            )
        if m.batch_representation == "embedding" and m.encode_covariates:
            raise UnsupportedModelError(
                "SCANVI with batch_representation='embedding' and encode_covariates=True is not "
                "supported: scvi-tools 1.4.2's classify() feeds the encoder without the batch "
                "embedding and fails (predict and the classification loss)"
            )

    def config(self, registry: Registry) -> dict[str, Any]:
        m = self.module
        st = inspect.field(self.model.registry_, "labels").get("state_registry", {})
        unlabeled = st.get("unlabeled_category")
        cls_layers = list(m.classifier.classifier)
        return super().config(registry) | {
            "unlabeled_category": (
                inspect.categories([unlabeled])[0] if unlabeled is not None else None
            ),
            "classifier_logits": bool(m.classifier.logits),
            "classifier_n_layers": (
                len(cls_layers[0].fc_layers) if hasattr(cls_layers[0], "fc_layers") else 0
            ),
        }

    def arrays(self, genes: list[str]) -> dict[str, np.ndarray]:
        y_prior = self.module.y_prior.detach().cpu().numpy().reshape(-1).astype(np.float32)
        return super().arrays(genes) | {F.ARR_Y_PRIOR: y_prior}

    def more_graphs(self, config, arrays, graphs, t, z, rng) -> list[GraphExport]:
        """SCANVAE's classifier, ``encoder_z2_z1`` and ``decoder_z1_z2`` (no scoring graph).

        The references are scvi-tools' own modules run as ``SCANVAE.loss`` runs them: on the
        probe z (S, N, L), each label broadcast with ``broadcast_labels`` (rows ``k * N + i``),
        regrouped here to (S, N, K, L). z2 is drawn from the torch ``q(z2 | z1, y)`` with
        numpy noise.
        """
        from scvi.module._utils import broadcast_labels

        n_s, n, n_lat = z.shape
        k = int(config["n_labels"])
        m = self.module
        cls_graph = ClassifierGraph(m.classifier, n_lat)
        z2e_graph = Z2EncoderGraph(m.encoder_z2_z1, n_lat, k)
        z1d_graph = Z1DecoderGraph(m.decoder_z1_z2, n_lat, k)
        eps = rng.standard_normal((n_s, n, k, n_lat)).astype(np.float32)
        device = next(m.parameters()).device
        cuda = [device.index or 0] if device.type == "cuda" else []
        ref: dict[str, list] = {}
        # encoder_z2_z1 draws a sample: keep the user's (CUDA) RNG as found.
        with module_eval(m), torch.random.fork_rng(devices=cuda):
            zt = torch.as_tensor(z, device=device)
            probs = m.classifier(zt)
            if m.classifier.logits:
                probs = torch.softmax(probs, dim=-1)
            for s in range(n_s):
                ys, z1s = broadcast_labels(zt[s], n_broadcast=k)
                qz2, _ = m.encoder_z2_z1(z1s, ys)

                def regroup(v):  # (K * N, L) -> (N, K, L)
                    return v.reshape(k, n, n_lat).transpose(0, 1)

                qm, qv = regroup(qz2.loc), regroup(qz2.scale.square())
                z2 = qm + torch.as_tensor(eps[s], device=device) * qv.sqrt()
                pm, pv = m.decoder_z1_z2(z2.transpose(0, 1).reshape(k * n, n_lat), ys)
                for key, v in (
                    (F.OUT_QZ2_M, qm),
                    (F.OUT_QZ2_V, qv),
                    (F.IN_Z2, z2),
                    (F.OUT_PZ1_M, regroup(pm)),
                    (F.OUT_PZ1_V, regroup(pv)),
                ):
                    ref.setdefault(key, []).append(v)
        to_np = lambda v: np.ascontiguousarray(v.detach().cpu().numpy().astype(np.float32))  # noqa: E731
        st = {key: to_np(torch.stack(v)) for key, v in ref.items()}
        return [
            GraphExport(
                "classifier",
                cls_graph,
                GraphIO((F.IN_Z,), (F.OUT_PROBS,)),
                {F.IN_Z: z},
                {F.OUT_PROBS: to_np(probs)},
            ),
            GraphExport(
                "z2_encoder",
                z2e_graph,
                GraphIO((F.IN_Z,), (F.OUT_QZ2_M, F.OUT_QZ2_V)),
                {F.IN_Z: z},
                {F.OUT_QZ2_M: st[F.OUT_QZ2_M], F.OUT_QZ2_V: st[F.OUT_QZ2_V]},
            ),
            GraphExport(
                "z1_decoder",
                z1d_graph,
                GraphIO((F.IN_Z2,), (F.OUT_PZ1_M, F.OUT_PZ1_V)),
                {F.IN_Z2: st[F.IN_Z2]},
                {F.OUT_PZ1_M: st[F.OUT_PZ1_M], F.OUT_PZ1_V: st[F.OUT_PZ1_V]},
            ),
        ]
