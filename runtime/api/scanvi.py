"""``scvi.model.SCANVI`` without torch: the four methods (SCANVAE's terms) and ``predict``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..data import resolve_indices
from ..distributed import dask_dispatch
from ..methods import latent as latent_loop
from .base import OnnxVAEModel, _read

if TYPE_CHECKING:
    import pandas as pd


class OnnxSCANVI(OnnxVAEModel):
    """A frozen ``scvi.model.SCANVI``; use :func:`scvi_onnx.load` to create one.

    Adds :meth:`predict` and the :attr:`labels` the classifier predicts. The four
    ``VAEMixin`` methods give what scvi-tools gives for SCANVI (see
    :mod:`scvi_onnx.models.scanvae`).
    """

    def _repr_extra(self) -> str:
        return f", n_labels={self.module.n_labels}"

    @property
    def n_labels(self) -> int:
        return self.module.n_labels

    @property
    def labels(self) -> tuple:
        """The labels the classifier predicts, in scvi-tools' column order."""
        return self.module.labels

    @property
    def unlabeled_category(self) -> Any:
        """The training ``unlabeled_category``."""
        return self.config.unlabeled_category

    @dask_dispatch
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
        layer: str | None = None,
        gene_key: str | None = None,
        unseen_as: Mapping[str, Any] | None = None,
        progress_bar: bool = False,
        first_key: int = 0,
    ) -> np.ndarray | pd.DataFrame:
        """Cell label predictions, as ``scvi.model.SCANVI.predict``.

        Parameters
        ----------
        adata, indices, batch_size, dataloader, missing_genes, min_gene_overlap
            As in :meth:`get_latent_representation`.
        layer, gene_key, unseen_as, progress_bar, first_key
            As in :meth:`get_latent_representation` (the classifier takes the latent only,
            so covariates the encoder does not take may be absent or unseen).
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

        seed = self._seed(seed)
        mbs = self._minibatches(
            adata,
            indices,
            batch_size,
            dataloader,
            scoring=False,
            what="the predicted labels",
            **_read(
                missing_genes, min_gene_overlap, layer, gene_key, unseen_as, progress_bar, first_key
            ),
        )
        probs = latent_loop.class_probabilities(
            self.module, self.engine, mbs, use_posterior_mean=use_posterior_mean, seed=seed
        )
        labels = self.module.labels
        if not soft:
            return np.array([labels[c] for c in probs.argmax(axis=1)])
        if dataloader is not None:
            index = pd.RangeIndex(len(probs))
        else:
            data = self.adata if adata is None else adata
            index = data.obs_names[resolve_indices(indices, data.n_obs)]
        return pd.DataFrame(probs, columns=list(labels), index=index)
