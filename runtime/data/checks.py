"""Checks of expression values, per minibatch: finite, non-negative, non-zero library, counts.

The whole matrix is never densified or loaded to check it: each minibatch is checked when it
is read, from its non-zero entries where it has them (a dense pass words the error).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import InvalidValuesError, NonIntegerCountsWarning, ZeroLibrarySizeError
from .entries import Entries
from .text import cells_phrase, have, preview


class ValueChecker:
    """Per-minibatch checks of X, plus the count of non-integer values over an iteration.

    :meth:`check` only reads (it may run on reader threads); :meth:`record` adds a
    minibatch's non-integer counts, in minibatch order, on the iterating thread.
    """

    def __init__(self, *, require_positive_library: bool, count_data: bool, source: str):
        self.require_positive_library = bool(require_positive_library)
        self.count_data = bool(count_data)
        self.source = source
        self.nonint_values = 0
        self.nonint_cells = 0

    def check(
        self,
        x: np.ndarray | None,
        names: Callable[[np.ndarray], list],
        integer_input: bool,
        entries: Entries | None = None,
        where: str = "",
        width: int | None = None,
    ) -> tuple[int, int]:
        """Validate a dense float32 minibatch ``x``; ``names(rows)`` gives cell names and
        ``where`` (:func:`where_phrase`) says which cells the minibatch holds.

        Returns the minibatch's (non-integer values, cells holding them) for :meth:`record`.
        With ``entries`` (x's non-zeros), the checks read those only; when one fails, the
        dense pass below runs and words the error. ``x`` may be ``None`` where ``entries``
        are given (``width`` columns): the dense rows are then made for the error only.
        """
        if x is None:
            if entries is None or width is None:
                raise ValueError("check needs the dense rows or the entries and the width")
            if entries.n_rows == 0 or width == 0:
                return 0, 0
        elif x.size == 0:
            return 0, 0
        if entries is not None:
            counts = self._check_entries(entries, integer_input)
            if counts is not None:
                return counts
        if x is None:
            x = entries.to_dense(width)
        lo = x.min()
        row_max = x.max(axis=1)  # a row of non-negative values sums to 0 iff its max is 0
        hi = row_max.max()
        if not (np.isfinite(lo) and np.isfinite(hi)):
            bad_rows = np.flatnonzero(~np.isfinite(x).all(axis=1))
            kinds = []
            if np.isnan(x[bad_rows]).any():
                kinds.append("NaN")
            if np.isinf(x[bad_rows]).any():
                kinds.append("infinite")
            raise InvalidValuesError(
                f"{self.source} holds {' and '.join(kinds)} values in "
                f"{cells_phrase(bad_rows.size)}{where}, e.g. "
                f"{preview(names(bad_rows))}; clean the data (e.g. replace or drop those "
                "cells) before scoring: the model needs finite counts"
            )
        if lo < 0:
            bad_rows = np.flatnonzero((x < 0).any(axis=1))
            raise InvalidValuesError(
                f"{self.source} holds negative values (min {float(lo):g}) in "
                f"{cells_phrase(bad_rows.size)}{where}, e.g. "
                f"{preview(names(bad_rows))}; the model needs raw non-negative counts: clean "
                "the data or read the raw counts from their layer (layer=..., CLI --layer)"
            )
        if self.require_positive_library:
            zero = np.flatnonzero(row_max <= 0)  # float32 row maxima: 4x cheaper than sums
            if zero.size:
                raise ZeroLibrarySizeError(
                    f"{cells_phrase(zero.size)} {have(zero.size)} zero total counts over the "
                    f"model's genes{where}, e.g. {preview(names(zero))}; these cells cannot be "
                    "scored with the observed library size: filter them first, e.g. "
                    "scanpy.pp.filter_cells(adata, min_counts=1)"
                )
        if self.count_data and not integer_input:
            frac = x != np.floor(x)
            n_vals = int(np.count_nonzero(frac))
            if n_vals:
                return n_vals, int(np.count_nonzero(frac.any(axis=1)))
        return 0, 0

    def _check_entries(self, e: Entries, integer_input: bool) -> tuple[int, int] | None:
        """The checks on the non-zero entries; None where the dense pass must word an error."""
        v = e.vals
        if v.size:
            lo, hi = v.min(), v.max()
            if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0:
                return None
        # entries are non-zero and non-negative: a cell's total is zero iff it has none
        if self.require_positive_library and np.any(e.indptr[1:] == e.indptr[:-1]):
            return None
        if self.count_data and not integer_input:
            frac = v != np.floor(v)
            n_vals = int(np.count_nonzero(frac))
            if n_vals:
                return n_vals, int(np.count_nonzero(e.row_sums(frac)))
        return 0, 0

    def record(self, counts: tuple[int, int]) -> None:
        """Add one minibatch's non-integer (values, cells), as :meth:`check` returned them."""
        self.nonint_values += counts[0]
        self.nonint_cells += counts[1]

    def finish(self, hint: Callable[[], str] | None = None) -> None:
        """Emit the single non-integer warning of an iteration, if any (``hint()`` adds where
        raw counts may be)."""
        if self.nonint_values:
            more = hint() if hint is not None else ""
            warnings.warn(
                f"{self.source} holds {self.nonint_values} non-integer value(s) in "
                f"{cells_phrase(self.nonint_cells)}; the model's likelihood expects counts. "
                "They are accepted as in scvi-tools, but results on non-count data (e.g. "
                "normalized or log-transformed values) are not meaningful: pass raw counts" + more,
                NonIntegerCountsWarning,
                stacklevel=3,
            )


def _numpy_dtype(dtype: Any) -> np.dtype | None:
    """``dtype`` as a numpy dtype; a pandas nullable (``Int64``, ``Float64``, ``boolean``) or
    sparse dtype as the numpy dtype of its values; ``None`` for anything else."""
    try:
        return np.dtype(dtype)
    except TypeError:
        pass
    inner = getattr(dtype, "numpy_dtype", None) or getattr(dtype, "subtype", None)
    if inner is None or inner is dtype:
        return None
    return _numpy_dtype(inner)


def dtype_is_numeric(dtype: Any) -> bool:
    dt = _numpy_dtype(dtype)
    if dt is None:
        return False
    return dt.kind == "b" or np.issubdtype(dt, np.integer) or np.issubdtype(dt, np.floating)


def dtype_is_integer(dtype: Any) -> bool:
    dt = _numpy_dtype(dtype)
    if dt is None:
        return False
    return dt.kind == "b" or np.issubdtype(dt, np.integer)


def where_phrase(done: int, n: int, total: int | None) -> str:
    """Which cells a minibatch holds, for an error found in it: ``done`` cells came before it,
    ``n`` are in it, of ``total`` (``None``: unknown, a user's dataloader)."""
    if total is not None and done == 0 and n >= total:
        return f" (of all {total} cells)"
    of = f" of {total}" if total is not None else ""
    return (
        f" (found among cells {done + 1}-{done + n}{of}, in the order they are read; "
        "the cells after them were not checked yet)"
    )
