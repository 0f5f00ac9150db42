"""LinearSCVI (scvi-tools' ``LDVAE`` module): SCVI's graphs with a linear decoder, and the
loadings scvi-tools' own ``get_loadings()`` returns."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from scvi_onnx.bundle import Registry
from scvi_onnx.bundle import format as F
from scvi_onnx.errors import UnsupportedModelError

from .. import inspect
from ..graphs import GraphIO
from ..graphs.ldvae import LinearDecoderGraph
from .vae import SCVISpec


class LinearSCVISpec(SCVISpec):
    """``scvi.model.LinearSCVI``."""

    model_class = "LinearSCVI"
    module_class = "LDVAE"

    def check(self) -> None:
        super().check()
        m = self.module
        if m.batch_representation != "one-hot":
            raise UnsupportedModelError(
                "LinearSCVI with batch_representation='embedding' is not supported (scvi-tools' "
                "LinearDecoderSCVI takes the latent only; the embedding would not fit its input)"
            )
        if m.dispersion == "gene-cell":
            raise UnsupportedModelError(
                "LinearSCVI with dispersion='gene-cell' is not supported: LinearDecoderSCVI has no "
                "dispersion head (scvi-tools 1.4.2 itself fails on it)"
            )
        if m.dispersion == "gene-label" and m.px_r.shape[-1] == 0:
            raise UnsupportedModelError(
                "LinearSCVI with dispersion='gene-label' is not supported: scvi-tools 1.4.2 builds "
                "LDVAE with n_labels=0 (unless passed), so the dispersion has no label columns and "
                "scvi-tools itself fails on it"
            )

    def decoder_fc(self):
        return self.module.decoder.factor_regressor

    def encodes_covariates(self) -> bool:
        # LDVAE replaces the encoders by ones that never see covariates.
        return False

    def config(self, registry: Registry) -> dict[str, Any]:
        config = super().config(registry)
        config["decoder_bias"] = self.decoder_fc().fc_layers[0][0].bias is not None
        return config

    def decoder_graph(self, io: GraphIO) -> torch.nn.Module:
        return LinearDecoderGraph(self.module, io)

    @functools.cache  # noqa: B019  (one spec per export: the cache dies with it)
    def _loadings(self, genes: tuple[str, ...]) -> tuple[np.ndarray, dict[str, Any]]:
        return loadings(self.model, list(genes))

    def arrays(self, genes: list[str]) -> dict[str, np.ndarray]:
        return super().arrays(genes) | {F.ARR_LOADINGS: self._loadings(tuple(genes))[0]}

    def extra(self, genes: list[str]) -> dict[str, Any]:
        return {"loadings": self._loadings(tuple(genes))[1]}


def loadings(model, genes: list[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """scvi-tools' own ``LinearSCVI.get_loadings()``: its values, columns and index name.

    Without an AnnData (a folder loaded from its registry only) scvi-tools' method cannot run
    (it reads ``adata.var_names``); the same values come from ``module.get_loadings()`` with the
    registered gene names and the columns ``Z_0..Z_{L-1}`` scvi-tools uses.
    """
    if getattr(model, "adata", None) is not None:
        df = model.get_loadings()
        values = df.to_numpy()
        if [str(g) for g in df.index] != genes:
            raise UnsupportedModelError("get_loadings() rows differ from the registered genes")
        name = df.index.name
        meta = {
            "columns": inspect.categories(df.columns),
            "index_name": None if name is None else str(name),
        }
    else:
        values = model.module.get_loadings()
        meta = {"columns": [f"Z_{i}" for i in range(values.shape[1])], "index_name": None}
    return np.ascontiguousarray(values, dtype=np.float32), meta
