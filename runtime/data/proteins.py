"""A model's protein counts (TOTALVI): where they are in the input, matched to the model's.

``setup_anndata`` registers them as an obsm entry (a DataFrame whose columns name the
proteins, or an array, named by ``protein_names_uns_key`` or numbered by scvi-tools);
``setup_mudata`` as a modality's ``X`` or layer (named by its ``var_names``). Proteins are
matched by name where both the model and the input name them, with the rules and errors of
genes (:class:`~scvi_onnx.data.genes.GeneMatch`: reordered, extra ones ignored, missing ones an
error unless ``missing_genes="zero"``); by position otherwise, with a width check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..bundle import ProteinField
from ..errors import InputDataError, InvalidValuesError, MissingColumnError
from .checks import dtype_is_integer, dtype_is_numeric
from .genes import GeneMatch
from .readers import MatrixReader
from .text import preview


@dataclass(frozen=True)
class ProteinInput:
    """An input's protein counts: the matrix (cells x proteins: dense, sparse, DataFrame),
    the proteins' names where the input has them, and where it is (for messages)."""

    matrix: Any
    names: Any
    where: str


def obsm_proteins(adata: Any, field: ProteinField) -> ProteinInput:
    """The registered obsm entry of an AnnData (a ``setup_anndata`` model)."""
    key = field.attr_key
    where = f"adata.obsm[{key!r}]"
    if key not in adata.obsm:
        present = list(adata.obsm.keys())
        raise MissingColumnError(
            f"adata.obsm has no {key!r}, where the model reads its protein counts (registered "
            f"at training); obsm keys present: {preview(present, 10) if present else 'none'}. "
            f"Put the protein counts in adata.obsm[{key!r}] (a DataFrame with the proteins' "
            "names as columns, or an array in the model's protein order)"
        )
    value = adata.obsm[key]
    names = None
    if isinstance(value, pd.DataFrame):
        names = value.columns
    elif field.names_uns_key is not None and field.names_uns_key in getattr(adata, "uns", {}):
        names = adata.uns[field.names_uns_key]
        where += f" (names in adata.uns[{field.names_uns_key!r}])"
    return ProteinInput(value, names, where)


class ProteinReader:
    """Rows of an input's protein counts as dense float32 in the model's protein order.

    Parameters
    ----------
    inp
        The input's proteins.
    field
        The model's registered proteins.
    n_obs
        The input's number of cells.
    missing_genes, min_gene_overlap
        As for genes (:class:`~scvi_onnx.data.genes.GeneMatch`).

    Raises
    ------
    InputDataError
        (or a subclass) when the proteins cannot be used with the model.
    """

    def __init__(
        self,
        inp: ProteinInput,
        field: ProteinField,
        n_obs: int,
        *,
        missing_genes: str = "error",
        min_gene_overlap: float = 0.8,
    ):
        self.where = inp.where
        matrix = inp.matrix
        if isinstance(matrix, pd.DataFrame):
            bad = [str(c) for c, dt in matrix.dtypes.items() if not dtype_is_numeric(dt)]
            if bad:
                raise InvalidValuesError(
                    f"{inp.where} must hold numbers, but its columns {preview(bad)} are not "
                    "numeric; convert them to raw protein counts"
                )
            self.integer_input = all(dtype_is_integer(dt) for dt in matrix.dtypes)
            # nullable columns (Int64, Float64): a missing value is NaN, refused as such below
            matrix = matrix.to_numpy(dtype=np.float32, na_value=np.nan)
        else:
            dtype = getattr(matrix, "dtype", None)
            if dtype is None or not dtype_is_numeric(dtype):
                raise InvalidValuesError(
                    f"{inp.where} must hold numbers, but its dtype is {dtype}; convert it to a "
                    "numeric matrix of raw protein counts"
                )
            self.integer_input = dtype_is_integer(dtype)
        shape = getattr(matrix, "shape", None)
        if shape is None or len(shape) != 2 or shape[0] != n_obs:
            raise InputDataError(
                f"{inp.where} has shape {shape}, expected (n_obs, n_proteins) with n_obs = {n_obs}"
            )
        n_model = field.n_proteins
        names = inp.names
        if names is not None and (isinstance(names, (str, bytes)) or np.ndim(names) != 1):
            raise InputDataError(
                f"{inp.where}: the protein names are a {type(names).__name__}, not a list of "
                f"names; store one name per column ({shape[1]}), in the columns' order"
            )
        if names is not None and len(names) != shape[1]:
            raise InputDataError(
                f"{inp.where} has {shape[1]} columns but {len(names)} protein names; the "
                "names must list the columns' proteins, one per column, in order"
            )
        if field.named and names is not None:
            match = GeneMatch(
                names,
                field.names,
                missing_genes=missing_genes,
                min_gene_overlap=min_gene_overlap,
                what="proteins",
                where=f"the protein names of {inp.where}",
            )
        else:
            # numbered proteins (no names on one side): the model's order, by position
            if shape[1] != n_model:
                raise InputDataError(
                    f"{inp.where} has {shape[1]} columns but the model was trained on "
                    f"{n_model} proteins, matched by position here (no protein names to match "
                    "by); pass the proteins the model was trained on, in its order"
                    + (
                        f" ({preview(field.names, 10)}), or a DataFrame with their names"
                        if field.named
                        else ""
                    )
                )
            match = GeneMatch(field.names, field.names)
        self.reader = MatrixReader(matrix, match, inp.where)

    def read(self, rows: np.ndarray):
        """As :meth:`MatrixReader.read`: a function giving the dense rows (entries dropped:
        the proteins' maths reads the dense rows only)."""
        finish = self.reader.read(rows)
        return lambda: finish()[0]
