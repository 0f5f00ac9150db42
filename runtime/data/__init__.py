"""User input to minibatches: AnnData (in memory or backed) or a user's own dataloader.

genes (match by name) -> readers (rows of the matrix) -> checks (values) -> obs (codes and
covariates) -> :class:`~scvi_onnx.data.minibatch.Minibatch`, completed once with what the model
needs (:class:`~scvi_onnx.data.minibatch.DataNeeds`).
"""

from .anndata import AnnDataSource
from .dataloader import normalize_dataloader
from .entries import Entries
from .genes import MISSING_GENES_MODES, GeneMatch
from .indices import resolve_indices
from .minibatch import DataNeeds, Minibatch

__all__ = [
    "MISSING_GENES_MODES",
    "AnnDataSource",
    "DataNeeds",
    "Entries",
    "GeneMatch",
    "Minibatch",
    "normalize_dataloader",
    "resolve_indices",
]
