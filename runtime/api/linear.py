"""``scvi.model.LinearSCVI`` without torch: the four methods plus ``get_loadings``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..bundle import format as F
from .base import OnnxVAEModel

if TYPE_CHECKING:
    import pandas as pd


class OnnxLinearSCVI(OnnxVAEModel):
    """A frozen ``scvi.model.LinearSCVI``; use :func:`scvi_onnx.load` to create one.

    Its four methods are those of the ``LDVAE`` module (:mod:`scvi_onnx.models.ldvae`).
    """

    def get_loadings(self) -> pd.DataFrame:
        """Per-gene weights of the linear decoder, as ``scvi.model.LinearSCVI.get_loadings()``.

        The values are what scvi-tools' own ``get_loadings()`` returned at export (with batch
        norm: ``diag(gamma / sqrt(running_var + eps)) @ W``; the batch columns dropped).

        Returns
        -------
        A ``(n_genes, n_latent)`` float32 DataFrame indexed by gene names, columns ``Z_0``, ...
        """
        import pandas as pd

        meta = self.manifest.extra.get("loadings", {})
        values = self.module.arrays[F.ARR_LOADINGS].copy()
        cols = meta.get("columns") or [f"Z_{i}" for i in range(values.shape[1])]
        index = pd.Index(list(self.genes), name=meta.get("index_name"))
        return pd.DataFrame(values, index=index, columns=list(cols))
