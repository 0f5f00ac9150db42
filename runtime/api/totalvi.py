"""``scvi.model.TOTALVI`` without torch: RNA and surface proteins (CITE-seq)."""

from __future__ import annotations

from .base import OnnxVAEModel


class OnnxTOTALVI(OnnxVAEModel):
    """A frozen ``scvi.model.TOTALVI``; use :func:`scvi_onnx.load` to create one.

    Its four methods are :class:`~scvi_onnx.api.base.OnnxVAEModel`'s over the ``TOTALVAE``
    module (:mod:`scvi_onnx.models.totalvae`). The data: an AnnData with the protein counts in
    the obsm entry registered at training (a DataFrame with the proteins' names as columns is
    matched by name; an array must hold the model's :attr:`proteins` in order), or, for a model
    set up with ``TOTALVI.setup_mudata``, a MuData with the registered modalities.

    ``get_reconstruction_error`` returns scvi-tools' keys ``"reconst_loss_gene"`` and
    ``"reconst_loss_protein"``; ``get_marginal_ll(return_mean=False)`` gives per-cell values
    (scvi-tools 1.4.2 fails there).
    """

    @property
    def proteins(self) -> tuple[str, ...]:
        """The model's proteins, in its order."""
        return self.manifest.registry.proteins.names

    def __repr__(self) -> str:
        c = self.config
        return (
            f"{type(self).__name__}(path={str(self.path)!r}, genes={len(self.genes)}, "
            f"proteins={c.n_proteins}, n_latent={c.n_latent}, "
            f"gene_likelihood={c.gene_likelihood!r}, gene_dispersion={c.gene_dispersion!r}, "
            f"protein_dispersion={c.protein_dispersion!r}, n_batch={c.n_batch}, "
            f"provider={self.provider!r})"
        )
