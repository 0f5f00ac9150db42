"""LinearSCVI (scvi-tools' ``LDVAE``): the SCVI runtime plus ``get_loadings``.

LDVAE differs from SCVI only in its decoder (``LinearDecoderSCVI``: a softmax of one linear
layer of z, with optional batch norm folded at export), which the exporter traces to the same
``decoder.onnx`` interface; so the four methods are :class:`~scvi_onnx.model.OnnxSCVI`'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import bundle as B
from .model import OnnxSCVI

if TYPE_CHECKING:
    import pandas as pd


class OnnxLinearSCVI(OnnxSCVI):
    """A frozen ``scvi.model.LinearSCVI``; use :func:`scvi_onnx.load` to create one."""

    def __repr__(self) -> str:
        return "OnnxLinearSCVI" + super().__repr__()[len("OnnxSCVI") :]

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
        values = self._arrays[B.ARR_LOADINGS].copy()
        cols = meta.get("columns") or [f"Z_{i}" for i in range(values.shape[1])]
        index = pd.Index(list(self.genes), name=meta.get("index_name"))
        return pd.DataFrame(values, index=index, columns=list(cols))
