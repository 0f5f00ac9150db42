"""Read rows of an expression matrix into dense float32 minibatches in the model's gene order.

In-memory dense, CSR and CSC matrices; backed (``anndata.read_h5ad(path, backed="r")``) CSR
read straight from its h5py datasets, and other lazy arrays read by increasing rows. A CSR
source also hands over the rows' non-zero entries (:class:`~scvi_onnx.data.entries.Entries`)
when it holds them in the model's gene order, so nothing downstream lists them again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse as sp

from .entries import Entries, segment_positions
from .genes import GeneMatch

logger = logging.getLogger(__name__)


class MatrixReader:
    """Rows of ``matrix`` (cells x input genes) as dense model-ordered float32 rows.

    ``read(rows)`` reads from the source on the calling thread (h5py is not for concurrent
    use) and returns a function that finishes the rows (numpy and scipy only, safe on a reader
    thread): it gives the dense rows and their non-zero entries, or ``None`` where the source
    does not hold them cheaply in model order.
    """

    def __init__(self, matrix: Any, genes: GeneMatch, where: str = "adata.X"):
        if sp.issparse(matrix) and matrix.format not in ("csr", "csc"):
            logger.info("converting %s from %s to CSR for row access", where, matrix.format)
            matrix = matrix.tocsr()
        self.genes = genes
        if isinstance(matrix, np.ndarray) or sp.issparse(matrix):
            self.kind = "memory"
        else:
            # h5py dataset, anndata backed sparse dataset, or another lazy array: read rows
            # in increasing order.
            self.kind = "lazy"
        self.matrix = matrix
        # A backed CSR matrix is read straight from its h5py datasets: anndata's row indexing
        # costs ~4 ms a call in package-version checks, more than the read itself.
        self._h5csr = None
        group = getattr(matrix, "group", None)
        if self.kind == "lazy" and getattr(matrix, "format", None) == "csr" and group is not None:
            try:
                self._h5csr = (group["data"], group["indices"], np.asarray(group["indptr"][:]))
            except (KeyError, TypeError, OSError):
                self._h5csr = None

    def _select_cols(self, block: Any) -> np.ndarray:
        """Rows already selected (all source genes) -> dense float32 in model gene order."""
        if sp.issparse(block):
            if not self.genes.identity:
                block = block[:, self.genes.src_cols]
            dense = block.toarray()
        else:
            dense = np.asarray(block)
            if not self.genes.identity:
                dense = dense[:, self.genes.src_cols]
        return self.genes.place(dense)

    def _csr_rows(
        self, m: Any, rows: np.ndarray | slice, dense: bool = True
    ) -> tuple[np.ndarray | None, Entries | None]:
        """Rows of an in-memory CSR matrix -> dense float32 in model gene order (and entries).

        Gathers the rows' stored entries and scatters them straight into the model's gene
        columns (reorder, extra and missing genes at once). scipy's row indexing costs far
        more here: it converts the whole matrix's index arrays on each call.
        """
        indptr = m.indptr
        if isinstance(rows, slice):
            lo, hi = int(indptr[rows.start]), int(indptr[rows.stop])
            lengths = np.diff(indptr[rows.start : rows.stop + 1])
            return self._scatter(lengths, m.indices[lo:hi], m.data[lo:hi], dense)
        starts = indptr[rows]
        lengths = indptr[rows + 1] - starts
        pos = segment_positions(starts, lengths)
        return self._scatter(lengths, m.indices[pos], m.data[pos], dense)

    def _h5csr_entries(self, sorted_rows: np.ndarray) -> tuple[np.ndarray, Any, Any]:
        """Increasing rows of a backed CSR matrix, read from h5py in one covering span:
        (row lengths, source columns, values), for :meth:`_scatter`."""
        data, indices, indptr = self._h5csr
        starts = indptr[sorted_rows]
        lengths = indptr[sorted_rows + 1] - starts
        lo, hi = int(starts[0]), int(indptr[sorted_rows[-1] + 1])
        if sorted_rows[-1] - sorted_rows[0] + 1 == sorted_rows.size:  # contiguous rows
            return lengths, indices[lo:hi], data[lo:hi]
        if hi - lo <= 4 * int(lengths.sum()) + (1 << 16):
            d, ix = data[lo:hi], indices[lo:hi]
            pos = segment_positions(starts - lo, lengths)
            return lengths, ix[pos], d[pos]
        parts_d, parts_i = [], []
        for s0, n0 in zip(starts.tolist(), lengths.tolist(), strict=True):
            if n0:
                parts_d.append(data[s0 : s0 + n0])
                parts_i.append(indices[s0 : s0 + n0])
        if not parts_d:
            return lengths, np.empty(0, np.intp), np.empty(0, np.float32)
        return lengths, np.concatenate(parts_i), np.concatenate(parts_d)

    def _scatter(
        self, lengths: np.ndarray, src_cols: np.ndarray, vals: np.ndarray, dense: bool = True
    ) -> tuple[np.ndarray | None, Entries | None]:
        """Stored entries of consecutive rows (``lengths`` each) -> dense model-ordered rows,
        and their non-zero :class:`Entries` when they come in model order. ``dense=False``:
        no dense rows (``None``) where the entries are there.

        A small CSR matrix of just these rows (:func:`_rows_matrix`), densified by scipy's C
        loop (which also adds up duplicated entries of a non-canonical matrix, as scipy does
        everywhere).
        """
        block = _rows_matrix(lengths, src_cols, vals, self.genes.col_map.size)
        entries = self._entries_of(block)
        if not dense and entries is not None:
            return None, entries
        return self._select_cols(block), entries

    def _entries_of(self, block: sp.csr_matrix) -> Entries | None:
        """The block's non-zeros in model gene order, exactly as a dense pass would list them;
        None when the block does not hold them in that order (unsorted or duplicated entries,
        genes reordered): then they are read from the dense rows when needed."""
        if not self.genes.order_kept or not block.has_canonical_format:
            return None
        vals = block.data.astype(np.float32, copy=False)  # the values the dense X holds
        cols = block.indices if self.genes.identity else self.genes.col_map[block.indices]
        indptr = block.indptr.astype(np.int64, copy=False)
        keep = vals != 0  # explicit zeros, and values that are zero in float32
        if not self.genes.identity:
            keep &= cols >= 0  # genes the model does not use
        if not keep.all():
            kept_before = np.zeros(keep.size + 1, dtype=np.int64)
            np.cumsum(keep, out=kept_before[1:])
            indptr, cols, vals = kept_before[indptr], cols[keep], vals[keep]
        return Entries(indptr, cols, vals)

    def read(
        self, rows: np.ndarray, dense: bool = True
    ) -> Callable[[], tuple[np.ndarray | None, Entries | None]]:
        """Read rows (in the order given) from the file, and return what finishes them: a
        function giving the dense float32 rows in model gene order and their non-zero entries
        (when the source gives them cheaply, CSR; else None). ``dense=False``: the dense rows
        are ``None`` where the entries are given (a model that reads the entries only).

        The file is only read here, on the iterating thread (h5py is not for concurrent use);
        the returned function touches numpy and scipy only and may run on a reader thread.
        """
        m = self.matrix
        if self.kind == "memory":
            return lambda: self._memory_rows(m, rows, dense)
        # lazy (backed): read increasing rows, then restore the requested order
        if rows.size > 1 and np.any(rows[1:] < rows[:-1]):
            order = np.argsort(rows, kind="stable")
        else:
            order = None  # already increasing
        sorted_rows = rows if order is None else rows[order]
        if self._h5csr is not None:
            stored = self._h5csr_entries(sorted_rows)

            def dense_rows():
                return self._scatter(*stored, dense=dense)
        else:
            lo, hi = int(sorted_rows[0]), int(sorted_rows[-1])
            if hi - lo + 1 == sorted_rows.size:
                block = m[lo : hi + 1]
            else:
                block = m[sorted_rows]

            def dense_rows():
                return self._select_cols(block), None

        if order is None:
            return dense_rows

        def in_requested_order():
            x, entries = dense_rows()
            out = None
            if x is not None:
                out = np.empty_like(x)
                out[order] = x
            if entries is not None:
                back = np.empty_like(order)
                back[order] = np.arange(order.size)
                entries = entries.take(back)
            return out, entries

        return in_requested_order

    def _memory_rows(
        self, m: Any, rows: np.ndarray, dense: bool = True
    ) -> tuple[np.ndarray | None, Entries | None]:
        """Rows of an in-memory matrix, as :meth:`_read`'s function returns them."""
        lo = int(rows[0])
        if rows.size > 1 and rows[-1] - lo + 1 == rows.size and np.all(np.diff(rows) == 1):
            rows = slice(lo, lo + rows.size)  # a contiguous range: slicing, not fancy indexing
        if isinstance(m, np.ndarray):
            if self.genes.identity:
                return np.ascontiguousarray(m[rows], dtype=np.float32), None
            if isinstance(rows, slice):
                return self.genes.place(m[rows][:, self.genes.src_cols]), None
            return self.genes.place(m[np.ix_(rows, self.genes.src_cols)]), None
        if m.format == "csc":
            # columns are the major axis of CSC: select them first, then the rows
            block = m[:, self.genes.src_cols] if not self.genes.identity else m
            return self.genes.place(block[rows, :].toarray()), None
        return self._csr_rows(m, rows, dense)


#: Value dtypes scipy.sparse computes with as they are (others are converted on construction).
_SPARSE_VALUES = frozenset(
    np.dtype(t)
    for t in (
        np.bool_,
        np.int8,
        np.uint8,
        np.int16,
        np.uint16,
        np.int32,
        np.uint32,
        np.int64,
        np.uint64,
        np.float32,
        np.float64,
    )
)


def _rows_matrix(lengths: np.ndarray, cols: np.ndarray, vals: np.ndarray, n_cols: int):
    """The CSR matrix of consecutive rows (``lengths`` stored entries each) sharing ``cols``
    and ``vals``.

    scipy's ``(data, indices, indptr)`` constructor copies arrays that are a small part of a
    larger one (its ``prune``): the rows of a minibatch sliced out of a Dask chunk's CSR block
    were copied every time (~35 MB per 8,192 PBMC rows; with the fresh pages it touched, ~8% of
    a chunk's CPU). Built empty and then given the arrays (the matrix's public ``indptr``,
    ``indices`` and ``data``), it shares them; scipy works out the format flags
    (``has_canonical_format``) from them when asked. Values of a dtype scipy would convert go
    through the constructor.
    """
    shape = (lengths.size, n_cols)
    idx = np.int32 if max(int(vals.size), n_cols) < np.iinfo(np.int32).max else np.int64
    indptr = np.zeros(lengths.size + 1, dtype=idx)
    np.cumsum(lengths, out=indptr[1:])
    if vals.dtype not in _SPARSE_VALUES or vals.ndim != 1 or cols.ndim != 1:
        return sp.csr_matrix((vals, cols, indptr), shape=shape, copy=False)
    block = sp.csr_matrix(shape, dtype=vals.dtype)
    block.indptr, block.indices, block.data = indptr, cols.astype(idx, copy=False), vals
    return block
