"""A user's own minibatches (an iterable of dicts keyed by scvi-tools' ``REGISTRY_KEYS``
names) as checked, completed :class:`~scvi_onnx.data.minibatch.Minibatch` objects."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from ..bundle import CategoricalField, Manifest
from ..errors import (
    InputDataError,
    InvalidArgumentError,
    InvalidValuesError,
    MissingColumnError,
    UnknownCategoryError,
)
from .checks import ValueChecker, dtype_is_integer, dtype_is_numeric, where_phrase
from .minibatch import NO_NEEDS, DataNeeds, Minibatch
from .text import cells_phrase, have, preview

logger = logging.getLogger(__name__)

# scvi-tools' REGISTRY_KEYS names of a minibatch dict.
X_KEY = "X"
BATCH_KEY = "batch"
LABELS_KEY = "labels"
CAT_COVS_KEY = "extra_categorical_covs"
CONT_COVS_KEY = "extra_continuous_covs"
SIZE_FACTOR_KEY = "size_factor"
PROTEIN_KEY = "proteins"  # TOTALVI's protein counts
PANEL_KEY = "panel"  # TOTALVI's panel codes (panel_key)


def _as_numpy(value: Any, key: str, i: int) -> np.ndarray:
    if sp.issparse(value):
        return value.toarray()
    try:
        return np.asarray(value)
    except Exception as e:  # any conversion failure is an input problem
        raise InputDataError(
            f"minibatch {i}: {key!r} could not be converted to a numpy array "
            f"({type(e).__name__}: {e}); pass numpy arrays, lists, or CPU tensors "
            "(for torch tensors on a GPU call .cpu() first)"
        ) from e


def _as_column(arr: np.ndarray, key: str, n: int, i: int, width: int = 1) -> np.ndarray:
    """Accept ``(n,)`` (when width is 1) or ``(n, width)``; return ``(n, width)``."""
    if width == 1 and arr.ndim == 1 and arr.shape[0] == n:
        return arr.reshape(n, 1)
    if arr.ndim == 2 and arr.shape == (n, width):
        return arr
    expected = f"({n},) or ({n}, 1)" if width == 1 else f"({n}, {width})"
    raise InputDataError(
        f"minibatch {i}: {key!r} has shape {arr.shape}, expected {expected} to match X's {n} cells"
    )


def _integer_codes(
    arr: np.ndarray, key: str, fields: Sequence[CategoricalField], i: int, first_cell: int
) -> np.ndarray:
    """Validate categorical codes (integers, possibly stored as floats) against each field."""
    if arr.dtype == bool or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise InvalidValuesError(
            f"minibatch {i}: {key!r} must hold integer category codes, got dtype {arr.dtype}"
        )
    if np.issubdtype(arr.dtype, np.floating):
        finite = np.isfinite(arr)
        nonint = ~finite | (arr != np.floor(np.where(finite, arr, 0)))
        if nonint.any():
            rows = np.flatnonzero(nonint.any(axis=1))
            raise InvalidValuesError(
                f"minibatch {i}: {key!r} must hold integer category codes; found non-integer "
                f"values {preview(arr[nonint])} in "
                f"{preview([f'cell {first_cell + r}' for r in rows])}"
            )
    codes = arr.astype(np.int64)
    for j, f in enumerate(fields):
        n_cat = max(len(f.categories), 1)
        col = codes[:, j]
        bad = (col < 0) | (col >= n_cat)
        if bad.any():
            rows = np.flatnonzero(bad)
            name = key if len(fields) == 1 else f"{key}[:, {j}]"
            if f.key is not None:
                name += f" (obs column {f.key!r})"
            raise UnknownCategoryError(
                f"minibatch {i}: {name} holds codes outside 0..{n_cat - 1} (the model knows "
                f"{n_cat} categories: {preview(f.categories, 10)}): values "
                f"{preview(np.unique(col[bad]))} in {cells_phrase(rows.size)}, e.g. "
                f"{preview([f'cell {first_cell + r}' for r in rows])}; encode categories with "
                "the training codes"
            )
    return np.ascontiguousarray(codes)


def _float_values(
    arr: np.ndarray, key: str, i: int, first_cell: int, *, positive: bool
) -> np.ndarray:
    if not dtype_is_numeric(arr.dtype):
        raise InvalidValuesError(f"minibatch {i}: {key!r} must be numeric, got dtype {arr.dtype}")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    bad = ~np.isfinite(out)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        raise InvalidValuesError(
            f"minibatch {i}: {key!r} holds NaN or infinite values in "
            f"{cells_phrase(rows.size)}, e.g. {preview([f'cell {first_cell + r}' for r in rows])}"
            "; clean the data before scoring"
        )
    if positive:
        bad = out <= 0
        if bad.any():
            rows = np.flatnonzero(bad.any(axis=1))
            raise InvalidValuesError(
                f"minibatch {i}: {key!r} must be > 0, but {cells_phrase(rows.size)} "
                f"{have(rows.size)} a value <= 0, e.g. "
                f"{preview([f'cell {first_cell + r}' for r in rows])}"
            )
    return out


def normalize_dataloader(
    dataloader: Iterable[Mapping[str, Any]],
    manifest: Manifest,
    *,
    needs: DataNeeds = NO_NEEDS,
    missing_labels_code: int | None = None,
) -> Iterator[Minibatch]:
    """Normalize a user-given iterable of minibatch dicts (scvi-tools ``REGISTRY_KEYS`` names).

    Values may be numpy arrays, lists, or anything with ``__array__`` (e.g. CPU torch tensors).
    ``X`` must have ``manifest.n_genes`` columns in the model's gene order. ``batch`` and
    ``labels`` may be left out when the model did not register them (they default to 0), or,
    with ``missing_labels_code`` (SCANVI: its unlabeled category), as an AnnData without a
    labels column (every cell unlabeled);
    covariates and size factors the model registered are required. Cells are named
    ``"cell i"`` (their running position) in error messages, and their key (``cells``) is
    that running position.

    Raises
    ------
    InputDataError
        (or a subclass) for a malformed minibatch; the message names the minibatch and cells.

    Warns
    -----
    NonIntegerCountsWarning
        Once, after the last minibatch, when ``count_data`` and non-integer values were seen.
    """
    if isinstance(dataloader, Mapping):
        raise InvalidArgumentError(
            "dataloader must be an iterable of minibatch dicts, got a single dict; wrap it in a "
            "list: [minibatch]"
        )
    try:
        it = iter(dataloader)
    except TypeError as e:
        raise InvalidArgumentError(
            f"dataloader must be an iterable of minibatch dicts, got {type(dataloader).__name__}"
        ) from e
    return _normalize_iter(it, manifest, needs, missing_labels_code)


def _normalize_iter(
    it: Iterator[Any], manifest: Manifest, needs: DataNeeds, missing_labels_code: int | None
) -> Iterator[Minibatch]:
    reg = manifest.registry
    n_genes = manifest.n_genes
    checker = ValueChecker(
        require_positive_library=needs.positive_library,
        count_data=needs.count_data,
        source="the dataloader's X",
    )
    prot_checker = ValueChecker(
        require_positive_library=False,
        count_data=needs.count_data,
        source=f"the dataloader's {PROTEIN_KEY!r}",
    )
    position = 0
    for i, mb in enumerate(it):
        if not isinstance(mb, Mapping):
            raise InputDataError(
                f"minibatch {i} is a {type(mb).__name__}, expected a dict keyed by scvi-tools "
                f"REGISTRY_KEYS names ({X_KEY!r}, {BATCH_KEY!r}, ...)"
            )
        if X_KEY not in mb:
            raise MissingColumnError(
                f"minibatch {i} has no {X_KEY!r} entry (keys: {sorted(map(str, mb))}); the "
                "expression matrix must be under 'X'"
            )
        x = _as_numpy(mb[X_KEY], X_KEY, i)
        if x.ndim != 2 or x.shape[1] != n_genes:
            raise InputDataError(
                f"minibatch {i}: X has shape {x.shape}, expected (n_cells, {n_genes}): one "
                f"column per model gene, in the model's gene order"
            )
        if not dtype_is_numeric(x.dtype):
            raise InvalidValuesError(
                f"minibatch {i}: X must hold numbers, got dtype {x.dtype}; pass raw counts"
            )
        n = x.shape[0]
        if n == 0:
            logger.debug("skipping empty minibatch %d", i)
            continue
        first = position
        integer_input = dtype_is_integer(x.dtype)
        xf = np.ascontiguousarray(x, dtype=np.float32)
        checker.record(
            checker.check(
                xf,
                lambda r, first=first: [f"cell {first + k}" for k in r],
                integer_input,
                where=where_phrase(first, n, None),
            )
        )
        out: dict[str, np.ndarray] = {X_KEY: xf}

        for key, f, reg_name in (
            (BATCH_KEY, reg.batch, "batch_key"),
            (LABELS_KEY, reg.labels, "labels_key"),
        ):
            if key in mb and mb[key] is not None:
                arr = _as_column(_as_numpy(mb[key], key, i), key, n, i)
                out[key] = _integer_codes(arr, key, (f,), i, first)
            elif f.key is None:
                out[key] = np.zeros((n, 1), dtype=np.int64)
            elif key == LABELS_KEY and missing_labels_code is not None:
                out[key] = np.full((n, 1), int(missing_labels_code), dtype=np.int64)
            else:
                raise MissingColumnError(
                    f"minibatch {i} has no {key!r} entry, but the model was trained with "
                    f"{reg_name}={f.key!r}; add the category codes (0..{len(f.categories) - 1}, "
                    "in the training order) under that key"
                )

        k = len(reg.categorical_covariates)
        if k:
            if CAT_COVS_KEY not in mb or mb[CAT_COVS_KEY] is None:
                raise MissingColumnError(
                    f"minibatch {i} has no {CAT_COVS_KEY!r} entry, but the model was trained "
                    f"with categorical covariates {[f.key for f in reg.categorical_covariates]!r}"
                    f"; add their codes as an (n, {k}) array"
                )
            arr = _as_column(_as_numpy(mb[CAT_COVS_KEY], CAT_COVS_KEY, i), CAT_COVS_KEY, n, i, k)
            out[CAT_COVS_KEY] = _integer_codes(
                arr, CAT_COVS_KEY, reg.categorical_covariates, i, first
            )

        c = len(reg.continuous_covariates)
        if c:
            if CONT_COVS_KEY not in mb or mb[CONT_COVS_KEY] is None:
                raise MissingColumnError(
                    f"minibatch {i} has no {CONT_COVS_KEY!r} entry, but the model was trained "
                    f"with continuous covariates {list(reg.continuous_covariates)!r}; add them as "
                    f"an (n, {c}) array"
                )
            arr = _as_column(_as_numpy(mb[CONT_COVS_KEY], CONT_COVS_KEY, i), CONT_COVS_KEY, n, i, c)
            out[CONT_COVS_KEY] = _float_values(arr, CONT_COVS_KEY, i, first, positive=False)

        if reg.size_factor_key is not None:
            if SIZE_FACTOR_KEY not in mb or mb[SIZE_FACTOR_KEY] is None:
                raise MissingColumnError(
                    f"minibatch {i} has no {SIZE_FACTOR_KEY!r} entry, but the model was trained "
                    f"with size_factor_key={reg.size_factor_key!r}; add the size factors as an "
                    "(n, 1) array"
                )
            arr = _as_column(
                _as_numpy(mb[SIZE_FACTOR_KEY], SIZE_FACTOR_KEY, i), SIZE_FACTOR_KEY, n, i
            )
            out[SIZE_FACTOR_KEY] = _float_values(arr, SIZE_FACTOR_KEY, i, first, positive=True)

        y = None
        if reg.proteins is not None:
            p = reg.proteins.n_proteins
            if PROTEIN_KEY not in mb or mb[PROTEIN_KEY] is None:
                raise MissingColumnError(
                    f"minibatch {i} has no {PROTEIN_KEY!r} entry, but the model was trained with "
                    f"{p} proteins; add their counts as an (n, {p}) array in the model's protein "
                    "order"
                )
            arr = _as_column(_as_numpy(mb[PROTEIN_KEY], PROTEIN_KEY, i), PROTEIN_KEY, n, i, p)
            if not dtype_is_numeric(arr.dtype):
                raise InvalidValuesError(
                    f"minibatch {i}: {PROTEIN_KEY!r} must hold numbers, got dtype {arr.dtype}"
                )
            y = np.ascontiguousarray(arr, dtype=np.float32)
            prot_checker.record(
                prot_checker.check(
                    y,
                    lambda r, first=first: [f"cell {first + k}" for k in r],
                    dtype_is_integer(arr.dtype),
                )
            )
        panel = None
        if reg.panel is not None:
            if PANEL_KEY in mb and mb[PANEL_KEY] is not None:
                arr = _as_column(_as_numpy(mb[PANEL_KEY], PANEL_KEY, i), PANEL_KEY, n, i)
                panel = _integer_codes(arr, PANEL_KEY, (reg.panel,), i, first)
            else:
                raise MissingColumnError(
                    f"minibatch {i} has no {PANEL_KEY!r} entry, but the model was trained with "
                    f"panel_key={reg.panel.key!r}; add the panel codes (0.."
                    f"{len(reg.panel.categories) - 1}, in the training order) under that key"
                )

        position += n
        yield Minibatch(
            x=xf,
            cells=np.arange(first, first + n, dtype=np.int64),
            batch=out[BATCH_KEY],
            labels=out[LABELS_KEY],
            cat_covs=out.get(CAT_COVS_KEY),
            cont_covs=out.get(CONT_COVS_KEY),
            size_factor=out.get(SIZE_FACTOR_KEY),
            y=y,
            panel=panel,
        ).complete(needs)
    if position == 0:
        raise InputDataError(
            "the dataloader yielded no cells (no minibatch, or only empty ones); pass at least "
            "one cell"
        )
    checker.finish()
    prot_checker.finish()
