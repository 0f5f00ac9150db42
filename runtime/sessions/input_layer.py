"""A first layer's product over sparse input, ``x @ W``, from the non-zero entries of ``x``.

scATAC input is a few percent non-zero, and a PEAKVI encoder's first layer is its largest
product by far (100,000 regions x 316 hidden units: 126 MB of weights, ~99% of the encoder's
FLOPs). ONNX Runtime multiplies the dense minibatch, zeros included; here scipy multiplies
the non-zero entries only, in column order (CSC): each row of ``W`` is read once per call and
added to the cells holding that region. A cell's sums run over its regions in increasing
order whatever other cells share the call, so its result does not depend on the batch size.

``W`` is not stored twice: it is the full graph's initializer (``encoder.onnx``), found by
walking the file's protobuf (memory-mapped, the weights skipped by their length) and read
into memory from its offset; the manifest names it (``format.INPUT_LAYER``), and the file's
sha256 was checked with the bundle's. The marginal LL does not keep it: it reads ``W`` in
blocks for its one product per minibatch (``hold=False``), with the same bits.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from ..data.entries import Entries
from ..errors import BundleIntegrityError
from .ops import FLOAT, file_initializer

#: Regions per block of ``W`` read from the file by a product that does not keep it (4,096 x
#: 316 hidden units: 5 MB); the sums are the same bits as with ``W`` held.
PRODUCT_BLOCK_ROWS = 4096


def _csc_matvecs():
    """scipy's ``Y += A X`` kernel for a CSC ``A`` (what ``csc_matrix @ dense`` runs, adding
    column by column into ``Y``), or ``None`` where this scipy lacks it (a private name)."""
    try:
        from scipy.sparse import _sparsetools
    except ImportError:
        return None
    return getattr(_sparsetools, "csc_matvecs", None)


class InputLayer:
    """``x @ W[:rows]`` for ``W``, initializer ``name`` of the ONNX file ``path``, read on first
    use of :attr:`weight`.

    Parameters
    ----------
    path
        The full graph's file.
    name
        The initializer (``(n_in, H)`` float32; its first ``rows`` rows multiply the regions).
    rows
        Regions: the columns of ``x``.
    """

    def __init__(self, path: str | Path, name: str, rows: int):
        self.path = Path(path)
        self.name = name
        self.rows = int(rows)
        self._where: tuple[int, int] | None = None  # (byte offset, columns), once located
        self._w: np.ndarray | None = None
        self._lock = threading.Lock()

    @property
    def columns(self) -> int:
        """``H``, the layer's outputs (the file's headers are read on first use)."""
        return self._locate()[1]

    def _locate(self) -> tuple[int, int]:
        """Find the initializer in the file and check it: ``(byte offset, columns)``.
        :class:`BundleIntegrityError` when it is not there or not a float32 matrix of at
        least ``rows`` rows."""
        if self._where is not None:
            return self._where
        where = f"{self.path.name}: initializer {self.name!r}"
        try:
            loc = file_initializer(self.path, self.name)
        except OSError as e:
            raise BundleIntegrityError(
                f"cannot read {self.path} ({e}); re-export the bundle"
            ) from e
        except ValueError as e:
            raise BundleIntegrityError(
                f"{self.path.name} is not a valid ONNX graph ({e}); re-export the bundle"
            ) from None
        if loc is None:
            raise BundleIntegrityError(
                f"{where} is not in the file (or its values are not inside it); the manifest "
                "names it as the sparse encoders' first layer: re-export the bundle"
            )
        dims, dtype, offset, nbytes = loc
        if dtype != FLOAT or len(dims) != 2 or dims[0] < self.rows or dims[1] < 1:
            raise BundleIntegrityError(
                f"{where} is {dims} of ONNX data type {dtype}, not a float32 matrix with at "
                f"least {self.rows} rows; re-export the bundle"
            )
        if nbytes != dims[0] * dims[1] * 4:
            raise BundleIntegrityError(f"{where} holds {nbytes} bytes for {dims}; re-export")
        self._where = (offset, dims[1])
        return self._where

    @property
    def weight(self) -> np.ndarray:
        """``W[:rows]``, ``(rows, H)`` float32, read-only; read from the file on first use,
        into aligned memory (protobuf lays raw data out at any byte offset, and scipy's
        kernels want aligned rows), as ONNX Runtime holds its weights."""
        w = self._w
        if w is None:
            with self._lock:
                if self._w is None:
                    offset, cols = self._locate()
                    count = self.rows * cols
                    try:
                        w = np.fromfile(self.path, dtype="<f4", count=count, offset=offset)
                    except OSError as e:
                        raise BundleIntegrityError(
                            f"cannot read {self.path} ({e}); re-export the bundle"
                        ) from e
                    if w.size != count:
                        raise BundleIntegrityError(
                            f"{self.path.name} ends inside initializer {self.name!r}; "
                            "re-export the bundle"
                        )
                    w = w.reshape(self.rows, cols)
                    w.flags.writeable = False
                    self._w = w
                w = self._w
        return w

    @property
    def resident(self) -> bool:
        """Whether ``W`` is held in memory (read by an earlier :attr:`weight`)."""
        return self._w is not None

    def product(self, entries: Entries, *, hold: bool = True) -> np.ndarray:
        """``(n, H)`` float32 ``x @ W`` for the cells whose non-zero entries are ``entries``.

        ``hold=False`` reads ``W`` from the file in blocks of :data:`PRODUCT_BLOCK_ROWS`
        regions, never holding it whole (the marginal LL: one product per minibatch, then
        minutes of decoding); each block's products are added into the same sums in the
        same order as one product over all of ``W`` would add them, so both give the same
        bits. ``hold=True`` (the default) reads ``W`` once and keeps it for the next call; a
        held ``W`` is used either way."""
        import scipy.sparse as sp

        n = entries.n_rows
        x = sp.csr_matrix(
            (entries.vals, entries.cols, entries.indptr), shape=(n, self.rows), copy=False
        ).tocsc()
        cols = self._locate()[1]
        if hold or self.resident:
            blocks = iter([(0, self.weight)])
        else:
            blocks = self._read_blocks()
        out = np.zeros((n, cols), dtype=np.float32)
        add = _csc_matvecs()
        data = x.data.astype(np.float32, copy=False)
        for r0, w in blocks:
            r1 = r0 + w.shape[0]
            p0, p1 = int(x.indptr[r0]), int(x.indptr[r1])
            if p1 == p0:
                continue
            ptr = x.indptr[r0 : r1 + 1] - x.indptr.dtype.type(p0)
            if add is not None:  # out += x[:, r0:r1] @ w, column by column (scipy's kernel)
                add(n, r1 - r0, cols, ptr, x.indices[p0:p1], data[p0:p1], w.ravel(), out.ravel())
            else:  # the same sums, another order of additions
                part = sp.csc_matrix((data[p0:p1], x.indices[p0:p1], ptr), shape=(n, r1 - r0))
                out += part @ w
        return out

    def _read_blocks(self):
        """``(first row, W[rows])`` block by block from the file, in one reused buffer."""
        offset, cols = self._locate()
        buf = np.empty(min(self.rows, PRODUCT_BLOCK_ROWS) * cols, dtype="<f4")
        try:
            with open(self.path, "rb") as f:
                f.seek(offset)
                for r0 in range(0, self.rows, PRODUCT_BLOCK_ROWS):
                    rows = min(PRODUCT_BLOCK_ROWS, self.rows - r0)
                    view = buf[: rows * cols]
                    if f.readinto(memoryview(view).cast("B")) != view.nbytes:
                        raise BundleIntegrityError(
                            f"{self.path.name} ends inside initializer {self.name!r}; "
                            "re-export the bundle"
                        )
                    yield r0, view.reshape(rows, cols)
        except OSError as e:
            msg = f"cannot read {self.path} ({e}); re-export the bundle"
            raise BundleIntegrityError(msg) from e
