"""``scvi.model.PEAKVI`` without torch: the four methods (PEAKVAE's terms), the region factors
and the depth factors."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ..distributed import dask_dispatch
from ..errors import InvalidArgumentError
from .base import OnnxVAEModel, _read


class OnnxPEAKVI(OnnxVAEModel):
    """A frozen ``scvi.model.PEAKVI``; use :func:`scvi_onnx.load` to create one.

    The model's "genes" are its regions, read from ``X`` (or the registered layer) and matched
    by name. ``get_elbo`` and ``get_reconstruction_error`` give scvi-tools' numbers
    (``reconstruction_loss``: the binary cross-entropy of ``p * d * f`` against ``x > 0``,
    summed over regions); ``get_marginal_ll``, which scvi-tools 1.4.2 does not implement for
    PEAKVI, is the importance-sampling estimate of :mod:`scvi_onnx.models.peakvae`.
    """

    def get_region_factors(self) -> np.ndarray:
        """Region-specific factors ``sigmoid(region_factors)``, as
        ``scvi.model.PEAKVI.get_region_factors()``.

        Returns
        -------
        ``(n_regions,)`` float32 array, in the model's region order.

        Raises
        ------
        InvalidArgumentError
            The model was trained with ``region_factors=False`` (scvi-tools raises a
            ``RuntimeError``).
        """
        if self.module.region_factors is None:
            raise InvalidArgumentError(
                "region factors were not included in this model (region_factors=False)"
            )
        return self.module.region_factors.copy()

    def _require_depth(self) -> None:
        """Refuse the depth factors of a model without them (in memory and on Dask)."""
        if not self.config.model_depth:
            raise InvalidArgumentError(
                "this model has no depth factors (model_depth=False): its depth is 1 for every cell"
            )

    @dask_dispatch  # an AnnData whose matrix is a Dask array runs on Dask
    def get_library_size_factors(
        self,
        adata: Any = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        dataloader: Iterable[dict[str, Any]] | None = None,
        *,
        missing_genes: str = "error",
        min_gene_overlap: float = 0.8,
        layer: str | None = None,
        gene_key: str | None = None,
        unseen_as: Mapping[str, Any] | None = None,
        progress_bar: bool = False,
        first_key: int = 0,
    ) -> np.ndarray:
        """Each cell's depth factor ``d``, as ``scvi.model.PEAKVI.get_library_size_factors``.

        Parameters
        ----------
        adata, indices, batch_size, dataloader, missing_genes, min_gene_overlap
            As in :meth:`get_latent_representation`.
        layer, gene_key, unseen_as, progress_bar, first_key
            As in :meth:`get_latent_representation` (the depth encoder takes the covariates
            the encoder takes).

        Returns
        -------
        ``(n_cells,)`` float32 array of the depth encoder's output (in (0, 1)).

        Raises
        ------
        InvalidArgumentError
            The model was trained with ``model_depth=False`` (it has no depth encoder).
        """
        self._require_depth()
        mbs = self._minibatches(
            adata,
            indices,
            batch_size,
            dataloader,
            scoring=False,
            what="the depth factors",
            **_read(
                missing_genes, min_gene_overlap, layer, gene_key, unseen_as, progress_bar, first_key
            ),
        )
        tasks = self.engine.tasks(mbs, self.module.n_features, self.module.latent_call_rows)
        return np.concatenate(list(self.engine.pmap(self.module.depth, tasks))).reshape(-1)
