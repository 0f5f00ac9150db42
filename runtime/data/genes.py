"""Match the input's genes to the model's by name: reorder, fill missing genes, drop extras.

Genes are matched by ``var_names``, or by a ``var`` column (``gene_key``: atlases name genes by
Ensembl ID, clinics by symbol; an AnnData often holds both).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InputDataError, MissingColumnError, MissingGenesError
from .text import SHOW_GENES, preview

logger = logging.getLogger(__name__)

MISSING_GENES_MODES = ("error", "zero")


def gene_names(adata: Any, gene_key: str | None = None) -> tuple[pd.Index, str]:
    """The input's gene names (``var_names`` or ``var[gene_key]``) and how to name them."""
    if gene_key is None:
        names = adata.var_names
        if not (isinstance(names, pd.Index) and names.inferred_type == "string"):
            names = pd.Index(np.asarray(names).astype(str))
        # an all-string Index is kept as is: pandas caches its uniqueness and hash table, so
        # scoring the same AnnData again (or a server's requests sharing one gene Index)
        # matches genes in microseconds
        return names, "adata.var_names"
    var = adata.var
    if gene_key not in var.columns:
        cols = [str(c) for c in var.columns]
        raise MissingColumnError(
            f"adata.var has no column {gene_key!r} to match genes by (gene_key); its columns: "
            f"{preview(cols, 10) if cols else 'none'}. Pass one of them, or leave gene_key out "
            "to match by adata.var_names"
        )
    col = var[gene_key]
    if col.isna().any():
        raise InputDataError(
            f"adata.var[{gene_key!r}] holds missing values ({int(col.isna().sum())} genes); "
            "genes are matched by it, so every gene needs a name"
        )
    return pd.Index(np.asarray(col).astype(str)), f"adata.var[{gene_key!r}]"


def _columns_naming(var: pd.DataFrame | None, model: pd.Index) -> list[tuple[str, int]]:
    """``var`` columns (and their counts) that name some of the model's genes, best first."""
    if var is None:
        return []
    found = []
    for c in var.columns:
        col = var[c]
        if not (
            pd.api.types.is_object_dtype(col)
            or isinstance(col.dtype, pd.CategoricalDtype)
            or pd.api.types.is_string_dtype(col)
        ):
            continue
        hits = int(model.isin(pd.Index(np.asarray(col).astype(str))).sum())
        if hits:
            found.append((str(c), hits))
    return sorted(found, key=lambda t: -t[1])


def _percent(part: int, whole: int) -> str:
    """``part / whole`` as a percentage rounded down to 0.1 (99,990 of 100,000 is "99.9%",
    not "100.0%", in a message about the ten that are missing)."""
    tenths = math.floor(1000 * part / whole) if whole else 1000
    return "<0.1%" if tenths == 0 and part else f"{tenths / 10:.1f}%"


class GeneMatch:
    """Where each of the model's genes is in the input, or that it is missing.

    Parameters
    ----------
    names
        The input's gene names (must be unique): ``var_names`` or a ``var`` column.
    model_genes
        The model's genes, in the model's order (a ``pd.Index`` of names is used as is, e.g.
        :attr:`~scvi_onnx.bundle.Manifest.gene_index`).
    missing_genes
        ``"error"``: refuse an input that lacks some of the model's genes; ``"zero"``: fill
        them with zeros (as scvi-tools' ``prepare_query_anndata``).
    min_gene_overlap
        With ``"zero"``, the smallest fraction of the model's genes that must be present.
    what, where
        What is matched (``"genes"``, ``"proteins"``) and where the input's names are, for
        messages.
    var
        The input's ``var`` table: when genes do not match, its columns that name the model's
        genes are suggested (``gene_key``).

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
        names: Any,
        model_genes: Sequence[str],
        *,
        missing_genes: str = "error",
        min_gene_overlap: float = 0.8,
        what: str = "genes",
        where: str = "adata.var_names",
        var: pd.DataFrame | None = None,
    ):
        if isinstance(names, pd.Index) and names.inferred_type == "string":
            # already names (pandas caches inferred_type and uniqueness on the Index, so a
            # caller scoring the same AnnData again, or a server reusing one gene Index,
            # matches in microseconds instead of re-converting thousands of strings)
            pass
        else:
            names = pd.Index(np.asarray(names).astype(str))
        self.what = what
        one = what[:-1]  # "gene", "protein"
        ids = " (symbols vs Ensembl IDs)" if what == "genes" else ""
        if not names.is_unique:
            dup = pd.unique(names[names.duplicated()])
            fix = (
                f"call adata.var_names_make_unique() or deduplicate the {what}"
                if where == "adata.var_names"
                else f"deduplicate the {what}"
            )
            raise InputDataError(
                f"{where} has {len(dup)} duplicated {one} name(s), e.g. "
                f"{preview(dup)}; {what} are matched to the model by name, so names must be "
                f"unique: {fix}"
            )
        model = (
            model_genes
            if isinstance(model_genes, pd.Index)
            else pd.Index([str(g) for g in model_genes])
        )
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
            if self.n_found == 0:
                raise MissingGenesError(
                    f"none of the model's {n_model} {what} is in {where}: the {one} "
                    f"identifiers may differ{ids}: the model's {what} look like "
                    f"{preview(model, 3)}, the data's like {preview(names, 3)}. "
                    + self._hint(var, model, where)
                )
            if missing_genes == "error":
                raise MissingGenesError(
                    f"{n_missing} of the model's {n_model} {what} are missing from {where}"
                    f" ({_percent(self.n_found, n_model)} found), e.g. "
                    f"{preview(missing, SHOW_GENES)}. "
                    f"Pass the {what} the model was trained on, or opt in to filling missing "
                    f'{what} with zeros with missing_genes="zero" (as scvi-tools\' '
                    "prepare_query_anndata does)" + self._hint(var, model, where, lead="; ")
                )
            if self.overlap < min_gene_overlap:
                raise MissingGenesError(
                    f"only {self.n_found} of the model's {n_model} {what} are in "
                    f"{where} ({_percent(self.n_found, n_model)} overlap, below "
                    f"min_gene_overlap={min_gene_overlap:g}); missing e.g. "
                    f"{preview(missing, SHOW_GENES)}. Check that the data uses the same {one} "
                    f"identifiers as the model{ids}; to score anyway pass min_gene_overlap=0"
                    + self._hint(var, model, where, lead="; ")
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

    def _hint(self, var, model: pd.Index, where: str, lead: str = "") -> str:
        """Suggest the var columns that name more of the model's genes (or regions) than
        ``where`` does (proteins: rename the input's, which have no ``gene_key``)."""
        if self.what == "proteins":
            if self.n_found == 0:
                return (
                    f"{lead}Rename the input's {self.what} to the model's names ({self.what} "
                    "are matched by name; `model.proteins` and `scvi-onnx info --json BUNDLE` "
                    "list them)"
                )
            return ""
        better = [(c, k) for c, k in _columns_naming(var, model) if k > self.n_found]
        if better:
            cols = ", ".join(f"{c!r} ({k} of {model.size})" for c, k in better[:3])
            return (
                f"{lead}adata.var columns that name the model's {self.what}: {cols}: match by one "
                f"with gene_key={better[0][0]!r} (CLI: --var-column {better[0][0]})"
            )
        if self.n_found == 0:
            return (
                f"{lead}Match by a var column holding the model's {self.what[:-1]} "
                "identifiers with gene_key=... (CLI: --var-column ...), or map the identifiers "
                "first"
            )
        return ""

    def place(self, dense: np.ndarray) -> np.ndarray:
        """Model-ordered found genes -> full ``(n, n_model)`` float32, zeros where missing."""
        if self.all_found:
            return np.ascontiguousarray(dense, dtype=np.float32)
        out = np.zeros((dense.shape[0], self.n_model), dtype=np.float32)
        out[:, self.model_pos] = dense
        return out
