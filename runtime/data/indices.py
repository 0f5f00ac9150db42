"""A user's cell selection (``indices=``) as validated row positions."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError
from .text import plain, preview


def resolve_indices(indices: Any, n_obs: int) -> np.ndarray:
    """Turn a user's cell selection into validated ``int64`` row positions.

    Parameters
    ----------
    indices
        ``None`` (all cells, in order), a sequence/array of integer row positions (any order,
        no duplicates), or a boolean mask of length ``n_obs``.
    n_obs
        Number of cells in the data.

    Raises
    ------
    InvalidArgumentError
        Out-of-range, negative, duplicated or non-integer positions, a mask of the wrong length,
        or an empty selection.
    """
    if isinstance(n_obs, bool) or not isinstance(n_obs, numbers.Integral) or n_obs < 0:
        raise InvalidArgumentError(f"n_obs must be a non-negative integer, got {n_obs!r}")
    n_obs = int(n_obs)
    if indices is None:
        if n_obs == 0:
            raise InvalidArgumentError("no cells selected: the data holds 0 cells")
        return np.arange(n_obs, dtype=np.int64)
    if isinstance(indices, (str, bytes)):
        raise InvalidArgumentError(
            f"indices must be integer row positions or a boolean mask, got the string "
            f"{indices!r}; to select cells by name use adata.obs_names.get_indexer(names)"
        )
    if isinstance(indices, slice):
        return resolve_indices(np.arange(n_obs)[indices], n_obs)
    try:
        arr = np.asarray(indices)
    except Exception as e:  # report any conversion failure as a bad argument
        raise InvalidArgumentError(
            f"indices could not be read as an array ({type(e).__name__}: {e}); pass a list or "
            "array of integer row positions, or a boolean mask"
        ) from e
    if arr.ndim != 1:
        if arr.ndim == 0:
            scalar = plain(arr[()])
            raise InvalidArgumentError(
                f"indices must be a 1-D sequence of row positions or a boolean mask, got the "
                f"scalar {scalar!r}; wrap a single position in a list: [{scalar!r}]"
            )
        raise InvalidArgumentError(
            f"indices must be 1-D (row positions or a boolean mask), got shape {arr.shape}"
        )
    if arr.size == 0:
        raise InvalidArgumentError("no cells selected: indices is empty; select at least one cell")

    if arr.dtype == bool:
        if arr.shape[0] != n_obs:
            raise InvalidArgumentError(
                f"boolean mask has length {arr.shape[0]} but the data holds {n_obs} cells; "
                "the mask needs one entry per cell"
            )
        out = np.flatnonzero(arr).astype(np.int64)
        if out.size == 0:
            raise InvalidArgumentError(
                "no cells selected: the boolean mask is all False; select at least one cell"
            )
        return out

    if arr.dtype == object:
        bad = [
            x
            for x in arr
            if isinstance(x, bool)
            or (
                not isinstance(x, numbers.Integral)
                and not (
                    isinstance(x, numbers.Real) and np.isfinite(float(x)) and float(x).is_integer()
                )
            )
        ]
        if bad:
            raise InvalidArgumentError(
                f"indices must be integer row positions or a boolean mask; found "
                f"{len(bad)} non-integer value(s): {preview(bad)}"
            )
        # clip to -1 / n_obs so huge python ints fail the range checks below, not the cast
        arr = np.array([min(max(int(x), -1), n_obs) for x in arr], dtype=np.int64)
    elif np.issubdtype(arr.dtype, np.floating):
        finite = np.isfinite(arr)
        nonint = ~finite | (arr != np.floor(np.where(finite, arr, 0)))
        if nonint.any():
            raise InvalidArgumentError(
                f"indices must be integer row positions; found {int(nonint.sum())} "
                f"non-integer value(s): {preview(arr[nonint])}"
            )
        too_big = np.abs(arr) > np.iinfo(np.int64).max
        if too_big.any():
            raise InvalidArgumentError(
                f"indices out of range for {n_obs} cells (valid: 0..{n_obs - 1}): "
                f"{preview(arr[too_big])}"
            )
        arr = arr.astype(np.int64)
    elif np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.unsignedinteger):
            big = arr >= n_obs
            if big.any():
                raise InvalidArgumentError(
                    f"indices out of range for {n_obs} cells (valid: 0..{n_obs - 1}): "
                    f"{preview(arr[big])}"
                )
        arr = arr.astype(np.int64, copy=False)
    else:
        hint = (
            "; to select cells by name use adata.obs_names.get_indexer(names)"
            if arr.dtype.kind in "USO"
            else ""
        )
        raise InvalidArgumentError(
            f"indices must be integer row positions or a boolean mask, got values of dtype "
            f"{arr.dtype} ({preview(arr)}){hint}"
        )

    neg = arr < 0
    if neg.any():
        raise InvalidArgumentError(
            f"indices must be non-negative row positions (negative indexing is not "
            f"supported); found {int(neg.sum())} negative value(s): {preview(arr[neg])}"
        )
    over = arr >= n_obs
    if over.any():
        raise InvalidArgumentError(
            f"indices out of range for {n_obs} cells (valid: 0..{n_obs - 1}); found "
            f"{int(over.sum())} value(s) too large: {preview(arr[over])}"
        )
    uniq, counts = np.unique(arr, return_counts=True)
    if uniq.size != arr.size:
        dup = uniq[counts > 1]
        raise InvalidArgumentError(
            f"indices must not repeat a cell; {dup.size} position(s) appear more than once: "
            f"{preview(dup)}; deduplicate them (e.g. np.unique keeps sorted order)"
        )
    return np.ascontiguousarray(arr, dtype=np.int64)
