"""A first layer's product over sparse input, ``x @ W``, from the non-zero entries of ``x``.

scATAC input is a few percent non-zero, and a PEAKVI encoder's first layer is its largest
product by far (100,000 regions x 316 hidden units: 126 MB of weights, ~99% of the encoder's
FLOPs). ONNX Runtime multiplies the dense minibatch, zeros included; here scipy multiplies
the non-zero entries only, in column order (CSC): each row of ``W`` is read once per call and
added to the cells holding that region. A cell's sums run over its regions in increasing
order whatever other cells share the call, so its result does not depend on the batch size.

``W`` is not stored twice: it is the full graph's initializer (``encoder.onnx``), memory-mapped
and viewed in place; the manifest names it (``format.INPUT_LAYER``), and the file's sha256 was
checked with the bundle's.
"""

from __future__ import annotations

import mmap
import threading
from pathlib import Path

import numpy as np

from ..data.entries import Entries
from ..errors import BundleIntegrityError
from .ops import FLOAT, initializer

#: Byte alignment under which ``W`` is copied out of the file rather than viewed in place
#: (float32 products want aligned rows; the exporter's files keep raw data 4-byte aligned
#: or not, as protobuf lays them out).
_ALIGN = 4


class InputLayer:
    """``x @ W[:rows]`` for ``W``, initializer ``name`` of the ONNX file ``path``, read on first
    use (a process that never calls it never maps the file).

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
        self._w: np.ndarray | None = None
        self._lock = threading.Lock()

    @property
    def weight(self) -> np.ndarray:
        """``W[:rows]``, ``(rows, H)`` float32, read-only."""
        w = self._w
        if w is None:
            with self._lock:
                if self._w is None:
                    self._w = self._read()
                w = self._w
        return w

    def _read(self) -> np.ndarray:
        where = f"{self.path.name}: initializer {self.name!r}"
        try:
            with open(self.path, "rb") as f:
                try:
                    buf: mmap.mmap | bytes = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                except OSError:  # a file system that cannot map files (FUSE direct_io)
                    buf = f.read()
        except OSError as e:
            raise BundleIntegrityError(
                f"cannot read {self.path} ({e}); re-export the bundle"
            ) from e
        try:
            with memoryview(buf) as view:
                loc = initializer(view, self.name)
        except (ValueError, RecursionError) as e:
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
        w = np.frombuffer(buf, dtype="<f4", count=self.rows * dims[1], offset=offset)
        w = w.reshape(self.rows, dims[1])
        if offset % _ALIGN:
            w = np.array(w)  # a copy in memory, aligned
        return w

    def product(self, entries: Entries) -> np.ndarray:
        """``(n, H)`` float32 ``x @ W`` for the cells whose non-zero entries are ``entries``."""
        import scipy.sparse as sp

        n = entries.n_rows
        x = sp.csr_matrix(
            (entries.vals, entries.cols, entries.indptr), shape=(n, self.rows), copy=False
        )
        out = x.tocsc() @ self.weight
        return np.ascontiguousarray(out, dtype=np.float32)
