"""TOTALVI's protein counts on the Dask path: checked on the client, carried to each chunk.

A model set up with ``setup_mudata`` reads them from the X or a layer of a MuData modality,
which :func:`~scvi_onnx.data.mudata.from_mudata` gathers on the client (:func:`modality_proteins`:
a Dask array, or an in-memory array, carried as below; the worker hands its rows on with the
modality's protein names). A model set up with ``setup_anndata`` reads its protein counts from
an ``obsm`` entry of the AnnData (:attr:`~scvi_onnx.bundle.Registry.proteins`). On the Dask
path that entry may be:

* a pandas DataFrame or a numpy / scipy array (in memory, as a user builds it): each chunk's
  task gets its rows, as it gets its rows of obs;
* a Dask array: rechunked to the expression matrix's row chunks, one block per task;
* a lazily read DataFrame (``anndata.experimental.read_lazy``'s ``Dataset2D``, whose columns are
  Dask arrays): its numeric columns stacked into one Dask array, carried as above, and named
  again on the worker, which sees a DataFrame as an in-memory run would.

The client checks the entry with the in-memory code (:class:`~scvi_onnx.data.proteins.
ProteinReader`: a missing entry, non-numeric values, the width, proteins missing by name) before
any task runs, reading nothing of a lazy entry but its dtypes and shape. Each worker then builds
its chunk's AnnData with the proteins in ``obsm`` under the same key and names (and, for an
array named in ``uns``, the names there), so the in-memory matching rules, value checks and
error messages apply unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..bundle import ProteinField
from ..data.checks import dtype_is_numeric
from ..data.proteins import ProteinInput, obsm_proteins
from . import is_dask_array


@dataclass(frozen=True)
class ProteinCarry:
    """How a chunk's protein rows become its AnnData's ``obsm`` entry on a worker.

    Attributes
    ----------
    key
        The registered ``obsm`` key (``None`` for a modality's counts).
    columns
        The proteins' names when the rows travel as an array but were a DataFrame on the
        client (a lazily read one): the worker makes them a DataFrame with these columns.
    uns
        ``(key, names)`` when the input names an array's proteins in ``uns`` (the model's
        ``protein_names_uns_key``): the worker's AnnData gets that ``uns`` entry.
    modality
        ``(where, names)`` for counts gathered beside the AnnData (a MuData modality's, for
        ``setup_mudata``; a SOMA experiment's protein measurement): the worker hands its rows
        on as the :class:`~scvi_onnx.data.proteins.ProteinInput` the in-memory run reads,
        named by the modality's or measurement's var names (``where`` words its messages).
    """

    key: str | None
    columns: tuple[str, ...] | None = None
    uns: tuple[str, tuple[str, ...]] | None = None
    modality: tuple[str, tuple[str, ...]] | None = None

    def modality_input(self, rows: Any) -> ProteinInput:
        """A chunk's rows of a modality's protein counts, as the in-memory run reads them."""
        where, names = self.modality
        return ProteinInput(rows, pd.Index(names), where)

    def obsm_and_uns(self, rows: Any, obs_names: pd.Index) -> tuple[dict, dict]:
        """The ``obsm`` and ``uns`` of a chunk's AnnData, from its protein ``rows``."""
        if self.columns is not None:
            rows = pd.DataFrame(np.asarray(rows), index=obs_names, columns=pd.Index(self.columns))
        uns = {} if self.uns is None else {self.uns[0]: np.asarray(self.uns[1], dtype=object)}
        return {self.key: rows}, uns


@dataclass
class Proteins:
    """A run's protein counts: the checked input, and the rows each chunk's task gets."""

    inp: ProteinInput  # what the client-side checks read (ProteinReader)
    rows: Any  # DataFrame / numpy / scipy (in memory) or a Dask array
    carry: ProteinCarry

    def select(self, idx: np.ndarray) -> None:
        """Keep the rows of an ``indices=`` selection."""
        self.rows = self.rows.iloc[idx] if isinstance(self.rows, pd.DataFrame) else self.rows[idx]

    def align(self, row_chunks: tuple[int, ...]) -> None:
        """A Dask array's rows in the expression matrix's row chunks, its columns in one."""
        if is_dask_array(self.rows) and (
            self.rows.chunks[0] != row_chunks or len(self.rows.chunks[1]) != 1
        ):
            self.rows = self.rows.rechunk({0: row_chunks, 1: -1})

    def parts(self, bounds: list[tuple[int, int]]) -> list:
        """Each chunk's rows (a Dask block, or a slice of the in-memory rows)."""
        if is_dask_array(self.rows):
            return list(self.rows.to_delayed().ravel())
        if isinstance(self.rows, pd.DataFrame):
            return [self.rows.iloc[a:b] for a, b in bounds]
        return [self.rows[a:b] for a, b in bounds]

    def token(self) -> Any:
        """What identifies the rows in the tasks' names (a Dask array by its name)."""
        from dask.base import tokenize

        return self.rows.name if is_dask_array(self.rows) else tokenize(self.rows)


def is_lazy_frame(value: Any) -> bool:
    """An ``obsm`` DataFrame read lazily (``anndata``'s ``Dataset2D``; checked by type name)."""
    return type(value).__name__ == "Dataset2D" and hasattr(value, "ds")


def _lazy_frame_columns(frame: Any) -> list[tuple[str, Any]]:
    """``(name, dtype)`` of a lazily read DataFrame's columns, in the stored order (the order
    ``to_memory`` and an in-memory read give them; ``Dataset2D.columns`` is unordered)."""
    index_key = frame.ds.attrs.get("indexing_key")
    return [(str(k), v.dtype) for k, v in frame.ds.data_vars.items() if k != index_key]


def _from_lazy_frame(inp: ProteinInput) -> tuple[ProteinInput, Any, tuple[str, ...]]:
    """A lazily read DataFrame as the in-memory checks and the tasks read it.

    The checks get a stand-in that gives an in-memory DataFrame's errors without reading the
    values: with non-numeric columns, an empty DataFrame of the same columns and dtypes (the
    dtype check comes first and raises its DataFrame message); else the numeric columns
    stacked into one lazy array, checked for its shape, and matched by the column names.
    """
    import dask.array as da

    frame = inp.matrix
    cols = _lazy_frame_columns(frame)
    names = tuple(c for c, _ in cols)
    if any(not dtype_is_numeric(dt) for _, dt in cols):
        empty = pd.DataFrame({c: pd.Series(dtype=dt) for c, dt in cols})
        return ProteinInput(empty, empty.columns, inp.where), None, names
    if not cols:
        rows = da.zeros((frame.shape[0], 0), dtype=np.float32)
    else:
        rows = da.stack([da.asarray(frame[c].data) for c in names], axis=1)
    return ProteinInput(rows, pd.Index(names), inp.where), rows, names


def protein_input(adata: Any, field: ProteinField) -> Proteins | None:
    """The registered ``obsm`` entry of ``adata`` as the checks and the tasks read it, or None
    when ``adata.obsm`` has no such entry (the in-memory checks then raise their error, in
    their order)."""
    if field.attr_key not in adata.obsm:
        return None
    inp = obsm_proteins(adata, field)
    uns = None
    if not isinstance(inp.matrix, pd.DataFrame) and not is_lazy_frame(inp.matrix):
        if inp.names is not None:  # an array named in uns
            uns = (str(field.names_uns_key), tuple(str(n) for n in np.asarray(inp.names)))
    if is_lazy_frame(inp.matrix):
        inp, rows, names = _from_lazy_frame(inp)
        return Proteins(inp=inp, rows=rows, carry=ProteinCarry(field.attr_key, columns=names))
    return Proteins(inp=inp, rows=inp.matrix, carry=ProteinCarry(field.attr_key, uns=uns))


def modality_proteins(inp: ProteinInput) -> Proteins:
    """Protein counts gathered beside the AnnData, as the checks and the tasks read them: a
    MuData modality's (:func:`~scvi_onnx.data.mudata.from_mudata`: its X or layer) or a SOMA
    measurement's (:func:`~scvi_onnx.distributed.soma.read_soma_proteins`); a Dask array or
    an in-memory matrix."""
    names = tuple(str(n) for n in inp.names)
    return Proteins(inp=inp, rows=inp.matrix, carry=ProteinCarry(None, modality=(inp.where, names)))


def obsm_placeholders(adata: Any) -> dict[str, np.ndarray]:
    """Zero-width stand-ins of ``adata``'s obsm entries: a view holding them gives the
    in-memory "no such obsm entry" error, which lists the keys present."""
    n = int(adata.n_obs)
    return {str(k): np.empty((n, 0), dtype=np.float32) for k in adata.obsm.keys()}
