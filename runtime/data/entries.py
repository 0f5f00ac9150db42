"""The non-zero entries of a minibatch, row by row: a CSR view in the model's gene order.

What is computed per cell from the counts alone (the value checks, the observed library, the
``lgamma`` count terms of NB / ZINB / Poisson) only needs the non-zero counts. A CSR source
already holds them; reading them again from the dense minibatch costs a full pass over
``cells x genes`` (and an integer division per entry to find its row and column).

Entries are always in row-major order with increasing columns inside each row, explicit zeros
dropped: the order in which a dense minibatch lists its non-zeros. So every per-cell sum over
entries adds the same values in the same order whatever the input layout, and results stay
bit-identical between dense, CSR and backed inputs.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

#: Entries summed per call of :meth:`Entries.row_sums` (bounds its float64 temporary).
ROW_SUM_BLOCK = 1 << 18


def segment_positions(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Flat positions of the segments ``[starts[i], starts[i] + lengths[i])``, in order."""
    first = np.cumsum(lengths) - lengths
    return np.repeat(starts - first, lengths) + np.arange(int(lengths.sum()))


class Entries(NamedTuple):
    """Non-zero counts of ``n`` cells: row ``i`` is ``cols[indptr[i]:indptr[i+1]]`` (model gene
    positions, increasing) and ``vals`` (float32, as in the dense minibatch) at the same
    positions."""

    indptr: np.ndarray  # (n + 1,) int64
    cols: np.ndarray  # (nnz,) integer
    vals: np.ndarray  # (nnz,) float32

    @classmethod
    def from_dense(cls, x: np.ndarray) -> Entries:
        """The non-zero entries of a dense ``(n, G)`` minibatch."""
        n, G = x.shape
        flat = x.reshape(-1)
        # nonzero of a boolean mask: ~10x faster than of the floats themselves; rows by
        # binary search, not an integer division per entry
        idx = np.flatnonzero(flat != 0)
        indptr = np.searchsorted(idx, np.arange(n + 1, dtype=np.int64) * G).astype(np.int64)
        cols = idx - np.repeat(np.arange(n, dtype=np.int64) * G, np.diff(indptr))
        return cls(indptr, cols, flat[idx])

    def to_dense(self, n_cols: int) -> np.ndarray:
        """The ``(n, n_cols)`` float32 rows these entries are the non-zeros of."""
        out = np.zeros((self.n_rows, n_cols), dtype=np.float32)
        out[self.row_of_entry(), self.cols] = self.vals
        return out

    @property
    def n_rows(self) -> int:
        return self.indptr.size - 1

    def rows(self, sl: slice) -> Entries:
        """The entries of a contiguous range of rows (``sl`` has no step)."""
        start, stop, _ = sl.indices(self.n_rows)
        stop = max(stop, start)
        lo, hi = int(self.indptr[start]), int(self.indptr[stop])
        return Entries(self.indptr[start : stop + 1] - lo, self.cols[lo:hi], self.vals[lo:hi])

    def take(self, order: np.ndarray) -> Entries:
        """Row ``j`` of the result is row ``order[j]`` of these entries."""
        starts = self.indptr[order]
        lengths = self.indptr[order + 1] - starts
        indptr = np.zeros(order.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        pos = segment_positions(starts, lengths)
        return Entries(indptr, self.cols[pos], self.vals[pos])

    def row_of_entry(self) -> np.ndarray:
        """The row of every entry, ``(nnz,)`` intp."""
        return np.repeat(np.arange(self.n_rows), np.diff(self.indptr))

    def row_sums(self, values: np.ndarray) -> np.ndarray:
        """Per-row float64 sums of ``values`` (one per entry), each row added in entry order.

        A row is reduced on its own (``reduceat``), so its sum does not depend on the other
        rows of the minibatch (bit-identity across batch sizes).
        """
        out = np.zeros(self.n_rows, dtype=np.float64)
        indptr = self.indptr
        # in blocks of rows of about ROW_SUM_BLOCK entries: reduceat casts its whole input to
        # float64 first (a minibatch of 4,096 Census cells: 42 MB at once otherwise); a row's
        # sum is the same in any block
        r0 = 0
        while r0 < self.n_rows:
            r1 = int(np.searchsorted(indptr, indptr[r0] + ROW_SUM_BLOCK, side="right")) - 1
            r1 = min(self.n_rows, max(r1, r0 + 1))
            lo = int(indptr[r0])
            starts = indptr[r0:r1] - lo
            nonempty = indptr[r0 + 1 : r1 + 1] > indptr[r0:r1]
            block = values[lo : int(indptr[r1])]
            if nonempty.all():
                out[r0:r1] = np.add.reduceat(block, starts, dtype=np.float64)
            elif nonempty.any():
                out[r0:r1][nonempty] = np.add.reduceat(block, starts[nonempty], dtype=np.float64)
            r0 = r1
        return out
