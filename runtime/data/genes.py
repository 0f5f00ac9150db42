"""Match the input's genes to the model's by name: reorder, fill missing genes, drop extras."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InputDataError, MissingGenesError
from .text import SHOW_GENES, preview

logger = logging.getLogger(__name__)

MISSING_GENES_MODES = ("error", "zero")


class GeneMatch:
    """Where each of the model's genes is in the input (``var_names``), or that it is missing.

    Parameters
    ----------
    var_names
        The input's gene names (must be unique).
    model_genes
        The model's genes, in the model's order.
    missing_genes
        ``"error"``: refuse an input that lacks some of the model's genes; ``"zero"``: fill
        them with zeros (as scvi-tools' ``prepare_query_anndata``).
    min_gene_overlap
        With ``"zero"``, the smallest fraction of the model's genes that must be present.
    what, where
        What is matched (``"genes"``, ``"proteins"``) and where the input's names are, for
        messages.

    Attributes
    ----------
    src_cols, model_pos
        The input column of each found gene and its model position (model order).
    col_map
        Input column -> model position (-1: a gene the model does not use).
    all_found, identity, order_kept
        No gene missing; the input's columns are the model's genes in order; the model's genes
        appear in the input in the model's order (extra genes allowed).
    """

    def __init__(
        self,
        var_names: Any,
        model_genes: Sequence[str],
        *,
        missing_genes: str = "error",
        min_gene_overlap: float = 0.8,
        what: str = "genes",
        where: str = "adata.var_names",
    ):
        names = pd.Index(np.asarray(var_names).astype(str))
        one = what[:-1]  # "gene", "protein"
        ids = " (symbols vs Ensembl IDs)" if what == "genes" else ""
        if not names.is_unique:
            dup = pd.unique(names[names.duplicated()])
            fix = (
                "call adata.var_names_make_unique() or deduplicate the genes"
                if where == "adata.var_names"
                else f"deduplicate the {what}"
            )
            raise InputDataError(
                f"{where} has {len(dup)} duplicated {one} name(s), e.g. "
                f"{preview(dup)}; {what} are matched to the model by name, so names must be "
                f"unique: {fix}"
            )
        model = pd.Index([str(g) for g in model_genes])
        src_cols = names.get_indexer(model)
        found = src_cols >= 0
        n_model = model.size
        self.n_model = n_model
        self.n_input = names.size
        self.n_found = int(found.sum())
        self.overlap = self.n_found / n_model if n_model else 1.0
        n_missing = n_model - self.n_found
        if n_missing:
            missing = model[~found]
            if missing_genes == "error":
                raise MissingGenesError(
                    f"{n_missing} of the model's {n_model} {what} are missing from {where}"
                    f" ({self.overlap:.1%} found), e.g. {preview(missing, SHOW_GENES)}. "
                    f"Pass the {what} the model was trained on, or opt in to filling missing "
                    f'{what} with zeros with missing_genes="zero" (as scvi-tools\' '
                    "prepare_query_anndata does)"
                )
            if self.overlap < min_gene_overlap:
                raise MissingGenesError(
                    f"only {self.n_found} of the model's {n_model} {what} are in "
                    f"{where} ({self.overlap:.1%} overlap, below "
                    f"min_gene_overlap={min_gene_overlap:g}); missing e.g. "
                    f"{preview(missing, SHOW_GENES)}. Check that the data uses the same {one} "
                    f"identifiers as the model{ids}; to score anyway pass min_gene_overlap=0"
                )
        if missing_genes == "zero":
            logger.info(
                "%d of the model's %d %s found in the data (%.1f%% overlap); %d filled with "
                "zeros; %d extra %s ignored",
                self.n_found,
                n_model,
                what,
                100.0 * self.overlap,
                n_missing,
                names.size - self.n_found,
                what,
            )
        self.model_pos = np.flatnonzero(found).astype(np.intp)
        self.src_cols = src_cols[found].astype(np.intp)
        self.all_found = n_missing == 0
        self.col_map = np.full(names.size, -1, dtype=np.intp)
        self.col_map[self.src_cols] = self.model_pos
        self.identity = self.all_found and np.array_equal(self.src_cols, np.arange(names.size))
        # a sorted CSR row then lists its entries in model order too
        by_source = np.argsort(self.src_cols)
        self.order_kept = bool(np.all(np.diff(self.model_pos[by_source]) > 0))

    def place(self, dense: np.ndarray) -> np.ndarray:
        """Model-ordered found genes -> full ``(n, n_model)`` float32, zeros where missing."""
        if self.all_found:
            return np.ascontiguousarray(dense, dtype=np.float32)
        out = np.zeros((dense.shape[0], self.n_model), dtype=np.float32)
        out[:, self.model_pos] = dense
        return out
