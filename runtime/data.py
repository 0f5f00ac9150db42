"""Turn user input (an AnnData, or a user-given dataloader) into validated numpy minibatches.

A *normalized minibatch* is a ``dict`` keyed by scvi-tools' ``REGISTRY_KEYS`` names:

``X`` (:data:`X_KEY`)
    ``float32`` C-contiguous dense ``(n, n_genes)``, columns in the model's gene order.
``batch`` / ``labels`` (:data:`BATCH_KEY`, :data:`LABELS_KEY`)
    ``int64`` ``(n, 1)`` training-category codes.
``extra_categorical_covs`` (:data:`CAT_COVS_KEY`)
    ``int64`` ``(n, K)``, only when the model registered ``K > 0`` categorical covariates.
``extra_continuous_covs`` (:data:`CONT_COVS_KEY`)
    ``float32`` ``(n, C)``, only when the model registered ``C > 0`` continuous covariates.
``size_factor`` (:data:`SIZE_FACTOR_KEY`)
    ``float32`` ``(n, 1)``, only when the model registered a ``size_factor_key``.
``cell_index`` (:data:`CELL_INDEX_KEY`)
    ``int64`` ``(n,)``: the row position of each cell in the AnnData (or its running position in
    a user dataloader), used to seed per-cell random streams so results do not depend on batching.
``nonzero`` (:data:`NONZERO_KEY`)
    :class:`~scvi_onnx.entries.Entries`, X's non-zeros: only when the source is CSR and lists
    them in the model's order (then no pass over the dense X is needed to find them).

Validation that is cheap (genes, obs columns, categories, covariate values) happens once when
an :class:`AnnDataSource` is built; expression values are checked per minibatch, so the whole
matrix is never densified or loaded.
"""

from __future__ import annotations

import logging
import numbers
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._threads import ordered_map
from .bundle import CategoricalField, Manifest
from .entries import Entries, segment_positions
from .errors import (
    InputDataError,
    InvalidArgumentError,
    InvalidValuesError,
    MissingColumnError,
    MissingGenesError,
    NonIntegerCountsWarning,
    UnknownCategoryError,
    ZeroLibrarySizeError,
)

__all__ = [
    "X_KEY",
    "BATCH_KEY",
    "LABELS_KEY",
    "CAT_COVS_KEY",
    "CONT_COVS_KEY",
    "SIZE_FACTOR_KEY",
    "CELL_INDEX_KEY",
    "NONZERO_KEY",
    "MISSING_GENES_MODES",
    "resolve_indices",
    "AnnDataSource",
    "normalize_dataloader",
]

logger = logging.getLogger(__name__)

# scvi-tools' REGISTRY_KEYS names (scvi.REGISTRY_KEYS), plus our cell index.
X_KEY = "X"
BATCH_KEY = "batch"
LABELS_KEY = "labels"
CAT_COVS_KEY = "extra_categorical_covs"
CONT_COVS_KEY = "extra_continuous_covs"
SIZE_FACTOR_KEY = "size_factor"
CELL_INDEX_KEY = "cell_index"
NONZERO_KEY = "nonzero"

MISSING_GENES_MODES = ("error", "zero")

#: How many offending items an error message lists.
_SHOW = 5
#: How many missing genes an error message lists.
_SHOW_GENES = 10


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def _preview(items: Sequence[Any] | np.ndarray, n: int = _SHOW) -> str:
    """``'a', 'b', 'c' (and 12 more)``: the first ``n`` items of a sequence, repr'd."""
    items = list(items)
    shown = ", ".join(repr(_plain(x)) for x in items[:n])
    if len(items) > n:
        shown += f" (and {len(items) - n} more)"
    return shown


def _plain(x: Any) -> Any:
    """numpy scalars -> python scalars, so messages read ``3`` rather than ``np.int64(3)``."""
    return x.item() if isinstance(x, np.generic) else x


def _have(n: int) -> str:
    return "has" if n == 1 else "have"


def _cells_phrase(n: int) -> str:
    return f"{n} cell" if n == 1 else f"{n} cells"


# --------------------------------------------------------------------------------------------
# indices
# --------------------------------------------------------------------------------------------


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
            scalar = _plain(arr[()])
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
                f"{len(bad)} non-integer value(s): {_preview(bad)}"
            )
        # clip to -1 / n_obs so huge python ints fail the range checks below, not the cast
        arr = np.array([min(max(int(x), -1), n_obs) for x in arr], dtype=np.int64)
    elif np.issubdtype(arr.dtype, np.floating):
        finite = np.isfinite(arr)
        nonint = ~finite | (arr != np.floor(np.where(finite, arr, 0)))
        if nonint.any():
            raise InvalidArgumentError(
                f"indices must be integer row positions; found {int(nonint.sum())} "
                f"non-integer value(s): {_preview(arr[nonint])}"
            )
        too_big = np.abs(arr) > np.iinfo(np.int64).max
        if too_big.any():
            raise InvalidArgumentError(
                f"indices out of range for {n_obs} cells (valid: 0..{n_obs - 1}): "
                f"{_preview(arr[too_big])}"
            )
        arr = arr.astype(np.int64)
    elif np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.unsignedinteger):
            big = arr >= n_obs
            if big.any():
                raise InvalidArgumentError(
                    f"indices out of range for {n_obs} cells (valid: 0..{n_obs - 1}): "
                    f"{_preview(arr[big])}"
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
            f"{arr.dtype} ({_preview(arr)}){hint}"
        )

    neg = arr < 0
    if neg.any():
        raise InvalidArgumentError(
            f"indices must be non-negative row positions (negative indexing is not "
            f"supported); found {int(neg.sum())} negative value(s): {_preview(arr[neg])}"
        )
    over = arr >= n_obs
    if over.any():
        raise InvalidArgumentError(
            f"indices out of range for {n_obs} cells (valid: 0..{n_obs - 1}); found "
            f"{int(over.sum())} value(s) too large: {_preview(arr[over])}"
        )
    uniq, counts = np.unique(arr, return_counts=True)
    if uniq.size != arr.size:
        dup = uniq[counts > 1]
        raise InvalidArgumentError(
            f"indices must not repeat a cell; {dup.size} position(s) appear more than once: "
            f"{_preview(dup)}; deduplicate them (e.g. np.unique keeps sorted order)"
        )
    return np.ascontiguousarray(arr, dtype=np.int64)


def _check_batch_size(batch_size: Any) -> int:
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, numbers.Integral)
        or int(batch_size) < 1
    ):
        raise InvalidArgumentError(f"batch_size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


# --------------------------------------------------------------------------------------------
# expression-value checks shared by AnnDataSource and normalize_dataloader
# --------------------------------------------------------------------------------------------


class _ValueChecker:
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
        x: np.ndarray,
        names: Callable[[np.ndarray], list],
        integer_input: bool,
        entries: Entries | None = None,
    ) -> tuple[int, int]:
        """Validate a dense float32 minibatch ``x``; ``names(rows)`` gives cell names.

        Returns the minibatch's (non-integer values, cells holding them) for :meth:`record`.
        With ``entries`` (x's non-zeros), the checks read those only; when one fails, the
        dense pass below runs and words the error.
        """
        if x.size == 0:
            return 0, 0
        if entries is not None:
            counts = self._check_entries(entries, integer_input)
            if counts is not None:
                return counts
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
                f"{_cells_phrase(bad_rows.size)} of this minibatch, e.g. "
                f"{_preview(names(bad_rows))}; clean the data (e.g. replace or drop those "
                "cells) before scoring: the model needs finite counts"
            )
        if lo < 0:
            bad_rows = np.flatnonzero((x < 0).any(axis=1))
            raise InvalidValuesError(
                f"{self.source} holds negative values (min {float(lo):g}) in "
                f"{_cells_phrase(bad_rows.size)} of this minibatch, e.g. "
                f"{_preview(names(bad_rows))}; the model needs raw non-negative counts: clean "
                "the data or pass the raw-count layer the model was trained on"
            )
        if self.require_positive_library:
            zero = np.flatnonzero(row_max <= 0)  # float32 row maxima: 4x cheaper than sums
            if zero.size:
                raise ZeroLibrarySizeError(
                    f"{_cells_phrase(zero.size)} of this minibatch {_have(zero.size)} zero total "
                    f"counts over the model's genes, e.g. {_preview(names(zero))}; these cells "
                    "cannot be "
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

    def finish(self) -> None:
        """Emit the single non-integer warning of an iteration, if any."""
        if self.nonint_values:
            warnings.warn(
                f"{self.source} holds {self.nonint_values} non-integer value(s) in "
                f"{_cells_phrase(self.nonint_cells)}; the model's likelihood expects counts. "
                "They are accepted as in scvi-tools, but results on non-count data (e.g. "
                "normalized or log-transformed values) are not meaningful: pass raw counts",
                NonIntegerCountsWarning,
                stacklevel=3,
            )


def _dtype_is_numeric(dtype: Any) -> bool:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        return False
    return dt.kind == "b" or np.issubdtype(dt, np.integer) or np.issubdtype(dt, np.floating)


def _dtype_is_integer(dtype: Any) -> bool:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        return False
    return dt.kind == "b" or np.issubdtype(dt, np.integer)


# --------------------------------------------------------------------------------------------
# categorical / continuous obs columns
# --------------------------------------------------------------------------------------------


def _needed_columns(manifest: Manifest) -> list[str]:
    reg = manifest.registry
    cols: list[str] = []
    for f in (reg.batch, reg.labels):
        if f.key is not None:
            cols.append(f.key)
    cols += [c.key for c in reg.categorical_covariates if c.key is not None]
    cols += list(reg.continuous_covariates)
    if reg.size_factor_key is not None:
        cols.append(reg.size_factor_key)
    return cols


def _missing_column_error(
    what: str, key: str, obs: pd.DataFrame, manifest: Manifest
) -> MissingColumnError:
    present = [str(c) for c in obs.columns]
    return MissingColumnError(
        f"adata.obs has no column {key!r} ({what} registered at training time); the model "
        f"needs obs columns {_needed_columns(manifest)!r}; present: "
        f"{_preview(present, 10) if present else 'none'}. Add the column, with the "
        "same name and meaning as in training"
    )


def _encode_categorical(obs: pd.DataFrame, field: CategoricalField, what: str) -> np.ndarray:
    """Map an obs column to training-category codes (by ``str`` comparison)."""
    col = obs[field.key]
    lookup: dict[str, int] = {}
    for code, cat in enumerate(field.categories):
        lookup.setdefault(str(cat), code)
    try:
        cat_col = pd.Categorical(col)
    except TypeError:  # unhashable / unorderable mixtures: compare as strings
        cat_col = pd.Categorical(col.map(lambda v: v if pd.isna(v) else str(v)))

    def code_of(value: Any) -> int:
        code = lookup.get(str(value), -1)
        if code < 0 and isinstance(value, (float, np.floating)) and float(value).is_integer():
            # int-coded columns turn float when they hold NaN somewhere: 1.0 matches 1
            code = lookup.get(str(int(value)), -1)
        return code

    value_codes = np.array([code_of(c) for c in cat_col.categories] + [-1], dtype=np.int64)
    raw = np.asarray(cat_col.codes, dtype=np.int64)  # -1 = missing value
    codes = value_codes[raw]  # raw == -1 picks the trailing -1
    bad = codes < 0
    if bad.any():
        n_nan = int(np.count_nonzero(raw < 0))
        used = np.unique(raw[bad & (raw >= 0)])
        unseen = [cat_col.categories[j] for j in used]
        parts = []
        if unseen:
            parts.append(f"categories never seen in training: {_preview(unseen)}")
        if n_nan:
            parts.append(f"missing values (NaN) in {_cells_phrase(n_nan)}")
        raise UnknownCategoryError(
            f"obs column {field.key!r} ({what}) holds {'; '.join(parts)} "
            f"({_cells_phrase(int(bad.sum()))} affected). The model knows "
            f"{len(field.categories)} categories: {_preview(field.categories, 10)}. Map these "
            "cells to a known category or drop them before scoring"
        )
    return codes


def _numeric_obs(obs: pd.DataFrame, key: str, what: str, *, positive: bool) -> np.ndarray:
    col = obs[key]
    dtype = col.dtype
    if isinstance(dtype, pd.CategoricalDtype) or not pd.api.types.is_numeric_dtype(dtype):
        raise InvalidValuesError(
            f"obs column {key!r} ({what}) must be numeric, but its dtype is {dtype}; convert "
            f"it, e.g. adata.obs[{key!r}] = adata.obs[{key!r}].astype(float)"
        )
    values = col.to_numpy(dtype=np.float64, na_value=np.nan).astype(np.float32)
    bad = ~np.isfinite(values)
    if bad.any():
        raise InvalidValuesError(
            f"obs column {key!r} ({what}) holds NaN or infinite values in "
            f"{_cells_phrase(int(bad.sum()))}, e.g. {_preview(obs.index[bad])}; fill or drop "
            "these cells before scoring"
        )
    if positive:
        bad = values <= 0
        if bad.any():
            n_bad = int(bad.sum())
            raise InvalidValuesError(
                f"obs column {key!r} ({what}) must be > 0, but {_cells_phrase(n_bad)} "
                f"{_have(n_bad)} a value <= 0, e.g. {_preview(obs.index[bad])}; size factors "
                "multiply the expected counts and must be positive"
            )
    return values


# --------------------------------------------------------------------------------------------
# AnnDataSource
# --------------------------------------------------------------------------------------------


class AnnDataSource:
    """Validated access to an AnnData's cells as normalized minibatches for a model.

    Parameters
    ----------
    adata
        In-memory or backed (``anndata.read_h5ad(path, backed="r")``) AnnData. The expression
        matrix may be dense (any numeric dtype) or scipy CSR/CSC (matrix or array).
    manifest
        The bundle's manifest: gene list and registry.
    missing_genes
        ``"error"`` (default): refuse data lacking some of the model's genes. ``"zero"``: fill
        them with zeros, as scvi-tools' ``prepare_query_anndata`` does.
    min_gene_overlap
        With ``missing_genes="zero"``, the smallest fraction of the model's genes that must be
        present (default 0.8); ``0`` disables the check.
    missing_labels_code
        When the registered labels column is absent from ``adata.obs``, give every cell this
        label code instead of raising (used by SCANVI for unlabeled query cells).
    require_positive_library
        Refuse cells whose total count over the model's genes is zero (needed when the model
        uses the observed library size).
    count_data
        Whether the model's likelihood is a count likelihood: if so, non-integer values trigger
        one :class:`NonIntegerCountsWarning` per iteration.

    Raises
    ------
    InputDataError
        (or a subclass) when the data cannot be used with the model; the message says why and
        what to do.
    """

    def __init__(
        self,
        adata: Any,
        manifest: Manifest,
        *,
        missing_genes: str = "error",
        min_gene_overlap: float = 0.8,
        missing_labels_code: int | None = None,
        require_positive_library: bool = False,
        count_data: bool = True,
    ):
        try:
            import anndata
        except ImportError as e:  # pragma: no cover - anndata is a dependency
            raise InputDataError("reading AnnData input needs the anndata package") from e

        if not isinstance(adata, anndata.AnnData):
            raise InputDataError(
                f"expected an anndata.AnnData, got {type(adata).__name__}; load your data with "
                "anndata.read_h5ad(path) (or backed='r' for large files)"
            )
        if missing_genes not in MISSING_GENES_MODES:
            raise InvalidArgumentError(
                f"missing_genes must be one of {MISSING_GENES_MODES!r}, got {missing_genes!r}"
            )
        if (
            isinstance(min_gene_overlap, bool)
            or not isinstance(min_gene_overlap, numbers.Real)
            or not 0.0 <= float(min_gene_overlap) <= 1.0
        ):
            raise InvalidArgumentError(
                f"min_gene_overlap must be a number in [0, 1], got {min_gene_overlap!r}"
            )
        if adata.n_obs == 0:
            raise InputDataError(
                "empty AnnData: it holds 0 cells; nothing to score: pass an AnnData with at "
                "least one cell"
            )

        self._manifest = manifest
        self._obs_names = adata.obs_names
        self._n_obs = int(adata.n_obs)
        self.missing_genes = missing_genes
        self.min_gene_overlap = float(min_gene_overlap)
        self.require_positive_library = bool(require_positive_library)
        self.count_data = bool(count_data)
        reg = manifest.registry

        # ---- genes --------------------------------------------------------------------------
        var_names = pd.Index(np.asarray(adata.var_names).astype(str))
        if not var_names.is_unique:
            dup = pd.unique(var_names[var_names.duplicated()])
            raise InputDataError(
                f"adata.var_names has {len(dup)} duplicated gene name(s), e.g. "
                f"{_preview(dup)}; genes are matched to the model by name, so names must be "
                "unique: call adata.var_names_make_unique() or deduplicate the genes"
            )
        model_genes = pd.Index([str(g) for g in manifest.genes])
        src_cols = var_names.get_indexer(model_genes)
        found = src_cols >= 0
        n_model = model_genes.size
        self.n_genes_found = int(found.sum())
        self.gene_overlap = self.n_genes_found / n_model if n_model else 1.0
        n_missing = n_model - self.n_genes_found
        if n_missing:
            missing = model_genes[~found]
            if missing_genes == "error":
                raise MissingGenesError(
                    f"{n_missing} of the model's {n_model} genes are missing from adata.var_names"
                    f" ({self.gene_overlap:.1%} found), e.g. {_preview(missing, _SHOW_GENES)}. "
                    "Pass the genes the model was trained on, or opt in to filling missing "
                    'genes with zeros with missing_genes="zero" (as scvi-tools\' '
                    "prepare_query_anndata does)"
                )
            if self.gene_overlap < self.min_gene_overlap:
                raise MissingGenesError(
                    f"only {self.n_genes_found} of the model's {n_model} genes are in "
                    f"adata.var_names ({self.gene_overlap:.1%} overlap, below "
                    f"min_gene_overlap={self.min_gene_overlap:g}); missing e.g. "
                    f"{_preview(missing, _SHOW_GENES)}. Check that the data uses the same gene "
                    "identifiers as the model (symbols vs Ensembl IDs); to score anyway pass "
                    "min_gene_overlap=0"
                )
        if missing_genes == "zero":
            logger.info(
                "%d of the model's %d genes found in the data (%.1f%% overlap); %d filled with "
                "zeros; %d extra genes ignored",
                self.n_genes_found,
                n_model,
                100.0 * self.gene_overlap,
                n_missing,
                var_names.size - self.n_genes_found,
            )
        self._model_pos = np.flatnonzero(found).astype(np.intp)
        self._src_cols = src_cols[found].astype(np.intp)
        self._n_genes = n_model
        self._all_found = n_missing == 0
        # source column -> model gene position (-1: a gene the model does not use)
        self._col_map = np.full(var_names.size, -1, dtype=np.intp)
        self._col_map[self._src_cols] = self._model_pos
        self._identity_cols = self._all_found and np.array_equal(
            self._src_cols, np.arange(var_names.size)
        )
        # the model's genes appear in the source in the model's order (extra genes allowed):
        # a sorted CSR row then lists its entries in model order too
        by_source = np.argsort(self._src_cols)
        self._order_kept = bool(np.all(np.diff(self._model_pos[by_source]) > 0))

        # ---- expression matrix --------------------------------------------------------------
        if reg.layer is None:
            matrix = adata.X
            where = "adata.X"
            if matrix is None:
                raise InputDataError(
                    "adata.X is None but the model reads its counts from adata.X; put the raw "
                    "counts in adata.X"
                )
        else:
            if reg.layer not in adata.layers:
                present = list(adata.layers.keys())
                raise MissingColumnError(
                    f"adata.layers has no layer {reg.layer!r}, where the model reads its counts "
                    f"(registered at training); layers present: "
                    f"{_preview(present, 10) if present else 'none'}. Put the raw counts in "
                    f"adata.layers[{reg.layer!r}]"
                )
            matrix = adata.layers[reg.layer]
            where = f"adata.layers[{reg.layer!r}]"
        self._source_name = where
        dtype = getattr(matrix, "dtype", None)
        if dtype is None or not _dtype_is_numeric(dtype):
            raise InvalidValuesError(
                f"{where} must hold numbers, but its dtype is {dtype}; convert it to a numeric "
                "(integer or float) matrix of raw counts"
            )
        shape = getattr(matrix, "shape", None)
        if shape is None or len(shape) != 2 or tuple(shape) != (self._n_obs, var_names.size):
            raise InputDataError(
                f"{where} has shape {shape}, expected (n_obs, n_vars) = "
                f"({self._n_obs}, {var_names.size})"
            )
        self._integer_input = _dtype_is_integer(dtype)
        if sp.issparse(matrix) and matrix.format not in ("csr", "csc"):
            logger.info("converting %s from %s to CSR for row access", where, matrix.format)
            matrix = matrix.tocsr()
        if isinstance(matrix, np.ndarray) or sp.issparse(matrix):
            self._kind = "memory"
        else:
            # h5py dataset, anndata backed sparse dataset, or another lazy array: read rows
            # in increasing order.
            self._kind = "lazy"
        self._matrix = matrix
        # A backed CSR matrix is read straight from its h5py datasets: anndata's row indexing
        # costs ~4 ms a call in package-version checks, more than the read itself.
        self._h5csr = None
        group = getattr(matrix, "group", None)
        if self._kind == "lazy" and getattr(matrix, "format", None) == "csr" and group is not None:
            try:
                self._h5csr = (group["data"], group["indices"], np.asarray(group["indptr"][:]))
            except (KeyError, TypeError, OSError):
                self._h5csr = None

        # ---- obs columns --------------------------------------------------------------------
        obs = adata.obs
        labels_absent = reg.labels.key is not None and reg.labels.key not in obs.columns
        for key, what in self._obs_requirements(reg):
            if key not in obs.columns:
                if what == "labels_key" and missing_labels_code is not None:
                    continue  # e.g. SCANVI query cells: all unlabeled
                raise _missing_column_error(what, key, obs, manifest)

        def codes_for(f: CategoricalField, what: str) -> np.ndarray:
            if f.key is None:
                return np.zeros(self._n_obs, dtype=np.int64)
            return _encode_categorical(obs, f, what)

        self._batch = codes_for(reg.batch, "batch_key").reshape(-1, 1)
        if labels_absent and missing_labels_code is not None:
            logger.info(
                "adata.obs has no %r column: every cell gets label code %d",
                reg.labels.key,
                missing_labels_code,
            )
            self._labels = np.full((self._n_obs, 1), int(missing_labels_code), dtype=np.int64)
        else:
            self._labels = codes_for(reg.labels, "labels_key").reshape(-1, 1)
        if reg.categorical_covariates:
            self._cat = np.ascontiguousarray(
                np.stack(
                    [
                        codes_for(f, "categorical_covariate_keys")
                        for f in reg.categorical_covariates
                    ],
                    axis=1,
                ),
                dtype=np.int64,
            )
        else:
            self._cat = None
        if reg.continuous_covariates:
            self._cont = np.ascontiguousarray(
                np.stack(
                    [
                        _numeric_obs(obs, k, "continuous_covariate_keys", positive=False)
                        for k in reg.continuous_covariates
                    ],
                    axis=1,
                ),
                dtype=np.float32,
            )
        else:
            self._cont = None
        if reg.size_factor_key is not None:
            self._size_factor = _numeric_obs(
                obs, reg.size_factor_key, "size_factor_key", positive=True
            ).reshape(-1, 1)
        else:
            self._size_factor = None

    @staticmethod
    def _obs_requirements(reg: Any) -> list[tuple[str, str]]:
        req = []
        if reg.batch.key is not None:
            req.append((reg.batch.key, "batch_key"))
        if reg.labels.key is not None:
            req.append((reg.labels.key, "labels_key"))
        req += [(f.key, "categorical_covariate_keys") for f in reg.categorical_covariates]
        req += [(k, "continuous_covariate_keys") for k in reg.continuous_covariates]
        if reg.size_factor_key is not None:
            req.append((reg.size_factor_key, "size_factor_key"))
        return req

    # ---- properties -------------------------------------------------------------------------

    @property
    def n_obs(self) -> int:
        """Number of cells in the AnnData."""
        return self._n_obs

    @property
    def obs_names(self) -> pd.Index:
        """The AnnData's cell names."""
        return self._obs_names

    @property
    def n_genes(self) -> int:
        """Number of model genes (columns of ``X`` in each minibatch)."""
        return self._n_genes

    # ---- reading ----------------------------------------------------------------------------

    def _select_cols(self, block: Any) -> np.ndarray:
        """Rows already selected (all source genes) -> dense float32 in model gene order."""
        if sp.issparse(block):
            if not self._identity_cols:
                block = block[:, self._src_cols]
            dense = block.toarray()
        else:
            dense = np.asarray(block)
            if not self._identity_cols:
                dense = dense[:, self._src_cols]
        return self._place(dense)

    def _place(self, dense: np.ndarray) -> np.ndarray:
        """Model-ordered found genes -> full (n, n_genes) float32, zeros for missing genes."""
        if self._all_found:
            return np.ascontiguousarray(dense, dtype=np.float32)
        out = np.zeros((dense.shape[0], self._n_genes), dtype=np.float32)
        out[:, self._model_pos] = dense
        return out

    def _csr_rows(self, m: Any, rows: np.ndarray | slice) -> tuple[np.ndarray, Entries | None]:
        """Rows of an in-memory CSR matrix -> dense float32 in model gene order (and entries).

        Gathers the rows' stored entries and scatters them straight into the model's gene
        columns (reorder, extra and missing genes at once). scipy's row indexing costs far
        more here: it converts the whole matrix's index arrays on each call.
        """
        indptr = m.indptr
        if isinstance(rows, slice):
            lo, hi = int(indptr[rows.start]), int(indptr[rows.stop])
            lengths = np.diff(indptr[rows.start : rows.stop + 1])
            return self._scatter(lengths, m.indices[lo:hi], m.data[lo:hi])
        starts = indptr[rows]
        lengths = indptr[rows + 1] - starts
        pos = segment_positions(starts, lengths)
        return self._scatter(lengths, m.indices[pos], m.data[pos])

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
        self, lengths: np.ndarray, src_cols: np.ndarray, vals: np.ndarray
    ) -> tuple[np.ndarray, Entries | None]:
        """Stored entries of consecutive rows (``lengths`` each) -> dense model-ordered rows,
        and their non-zero :class:`Entries` when they come in model order.

        A small CSR matrix of just these rows, densified by scipy's C loop (which also adds up
        duplicated entries of a non-canonical matrix, as scipy does everywhere).
        """
        indptr = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        block = sp.csr_matrix(
            (vals, src_cols, indptr), shape=(lengths.size, self._col_map.size), copy=False
        )
        return self._select_cols(block), self._entries_of(block)

    def _entries_of(self, block: sp.csr_matrix) -> Entries | None:
        """The block's non-zeros in model gene order, exactly as a dense pass would list them;
        None when the block does not hold them in that order (unsorted or duplicated entries,
        genes reordered): then they are read from the dense rows when needed."""
        if not self._order_kept or not block.has_canonical_format:
            return None
        vals = block.data.astype(np.float32, copy=False)  # the values the dense X holds
        cols = block.indices if self._identity_cols else self._col_map[block.indices]
        indptr = block.indptr.astype(np.int64, copy=False)
        keep = vals != 0  # explicit zeros, and values that are zero in float32
        if not self._identity_cols:
            keep &= cols >= 0  # genes the model does not use
        if not keep.all():
            kept_before = np.zeros(keep.size + 1, dtype=np.int64)
            np.cumsum(keep, out=kept_before[1:])
            indptr, cols, vals = kept_before[indptr], cols[keep], vals[keep]
        return Entries(indptr, cols, vals)

    def _read(self, rows: np.ndarray) -> Callable[[], tuple[np.ndarray, Entries | None]]:
        """Read rows (in the order given) from the file, and return what finishes them: a
        function giving the dense float32 rows in model gene order and their non-zero entries
        (when the source gives them cheaply, CSR; else None).

        The file is only read here, on the iterating thread (h5py is not for concurrent use);
        the returned function touches numpy and scipy only and may run on a reader thread.
        """
        m = self._matrix
        if self._kind == "memory":
            return lambda: self._memory_rows(m, rows)
        # lazy (backed): read increasing rows, then restore the requested order
        if rows.size > 1 and np.any(rows[1:] < rows[:-1]):
            order = np.argsort(rows, kind="stable")
        else:
            order = None  # already increasing
        sorted_rows = rows if order is None else rows[order]
        if self._h5csr is not None:
            stored = self._h5csr_entries(sorted_rows)

            def dense_rows():
                return self._scatter(*stored)
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
            dense, entries = dense_rows()
            out = np.empty_like(dense)
            out[order] = dense
            if entries is not None:
                back = np.empty_like(order)
                back[order] = np.arange(order.size)
                entries = entries.take(back)
            return out, entries

        return in_requested_order

    def _memory_rows(self, m: Any, rows: np.ndarray) -> tuple[np.ndarray, Entries | None]:
        """Rows of an in-memory matrix, as :meth:`_read`'s function returns them."""
        lo = int(rows[0])
        if rows.size > 1 and rows[-1] - lo + 1 == rows.size and np.all(np.diff(rows) == 1):
            rows = slice(lo, lo + rows.size)  # a contiguous range: slicing, not fancy indexing
        if isinstance(m, np.ndarray):
            if self._identity_cols:
                return np.ascontiguousarray(m[rows], dtype=np.float32), None
            if isinstance(rows, slice):
                return self._place(m[rows][:, self._src_cols]), None
            return self._place(m[np.ix_(rows, self._src_cols)]), None
        if m.format == "csc":
            # columns are the major axis of CSC: select them first, then the rows
            block = m[:, self._src_cols] if not self._identity_cols else m
            return self._place(block[rows, :].toarray()), None
        return self._csr_rows(m, rows)

    def minibatches(
        self, indices: Any, batch_size: int, *, prefetch: int = 0, entries: bool = True
    ) -> Iterator[dict[str, Any]]:
        """Yield normalized minibatches of the cells at ``indices``, in that order.

        Parameters
        ----------
        indices
            Row positions (see :func:`resolve_indices`; ``None`` means all cells).
        batch_size
            Cells per minibatch; the last one may be smaller.
        prefetch
            Reader threads that densify and check the next minibatches while the caller works
            on the current one (the file itself is read on the iterating thread). 0: none.
            The minibatches, errors and warning are the same whatever the number.
        entries
            Attach the non-zero :class:`~scvi_onnx.entries.Entries` (``NONZERO_KEY``): a
            canonical CSR source in the model's gene order hands over its own; other sources
            list them from the dense rows (one pass). The value checks then read the non-zeros
            only. ``False`` (what the latent space needs): no entries, the checks read the
            dense rows, or the CSR's entries where it has them.

        Raises
        ------
        InvalidValuesError
            NaN, infinite or negative expression values.
        ZeroLibrarySizeError
            With ``require_positive_library``, cells with zero total counts.

        Warns
        -----
        NonIntegerCountsWarning
            Once, after the last minibatch, when ``count_data`` and non-integer values were
            seen.
        """
        idx = resolve_indices(indices, self._n_obs)
        bs = _check_batch_size(batch_size)
        prefetch = int(prefetch)
        if prefetch < 0:
            raise InvalidArgumentError(f"prefetch must be >= 0, got {prefetch}")
        return self._iterate(idx, bs, prefetch, entries)

    def _iterate(
        self, idx: np.ndarray, bs: int, prefetch: int, keep_entries: bool
    ) -> Iterator[dict[str, Any]]:
        checker = _ValueChecker(
            require_positive_library=self.require_positive_library,
            count_data=self.count_data,
            source=self._source_name,
        )

        def finish(rows: np.ndarray, dense_rows: Callable) -> tuple[dict[str, Any], tuple]:
            x, entries = dense_rows()
            if entries is None and keep_entries:
                # the scoring methods need the non-zeros anyway: listing them once here
                # (on a reader thread where there are some) lets the checks read them only
                entries = Entries.from_dense(x)
            counts = checker.check(
                x,
                lambda r: [self._obs_names[i] for i in rows[r]],
                self._integer_input,
                entries,
            )
            return self._assemble(x, rows, entries if keep_entries else None), counts

        reads = (  # the file is read here, on the iterating thread
            (rows, self._read(rows))
            for rows in (idx[start : start + bs] for start in range(0, idx.size, bs))
        )
        if prefetch:
            done = ordered_map(lambda r: finish(*r), reads, prefetch, "scvi-onnx-read")
            for mb, counts in done:
                checker.record(counts)
                yield mb
        else:
            # Inline, the loop holds the last read's buffers until the next read: measured flat
            # in memory over 1M backed cells, while freeing them at once (a plain map) let
            # glibc's heap fragment and creep, 380 -> 456 MB peak.
            for rows, dense_rows in reads:
                mb, counts = finish(rows, dense_rows)
                checker.record(counts)
                yield mb
        checker.finish()

    def _assemble(
        self, x: np.ndarray, rows: np.ndarray, entries: Entries | None = None
    ) -> dict[str, Any]:
        batch: dict[str, np.ndarray] = {
            X_KEY: x,
            BATCH_KEY: np.ascontiguousarray(self._batch[rows]),
            LABELS_KEY: np.ascontiguousarray(self._labels[rows]),
        }
        if self._cat is not None:
            batch[CAT_COVS_KEY] = np.ascontiguousarray(self._cat[rows])
        if self._cont is not None:
            batch[CONT_COVS_KEY] = np.ascontiguousarray(self._cont[rows])
        if self._size_factor is not None:
            batch[SIZE_FACTOR_KEY] = np.ascontiguousarray(self._size_factor[rows])
        batch[CELL_INDEX_KEY] = np.array(rows, dtype=np.int64)
        if entries is not None:
            batch[NONZERO_KEY] = entries
        return batch


# --------------------------------------------------------------------------------------------
# user dataloaders
# --------------------------------------------------------------------------------------------


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
                f"values {_preview(arr[nonint])} in "
                f"{_preview([f'cell {first_cell + r}' for r in rows])}"
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
                f"{n_cat} categories: {_preview(f.categories, 10)}): values "
                f"{_preview(np.unique(col[bad]))} in {_cells_phrase(rows.size)}, e.g. "
                f"{_preview([f'cell {first_cell + r}' for r in rows])}; encode categories with "
                "the training codes"
            )
    return np.ascontiguousarray(codes)


def _float_values(
    arr: np.ndarray, key: str, i: int, first_cell: int, *, positive: bool
) -> np.ndarray:
    if not _dtype_is_numeric(arr.dtype):
        raise InvalidValuesError(f"minibatch {i}: {key!r} must be numeric, got dtype {arr.dtype}")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    bad = ~np.isfinite(out)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        raise InvalidValuesError(
            f"minibatch {i}: {key!r} holds NaN or infinite values in "
            f"{_cells_phrase(rows.size)}, e.g. {_preview([f'cell {first_cell + r}' for r in rows])}"
            "; clean the data before scoring"
        )
    if positive:
        bad = out <= 0
        if bad.any():
            rows = np.flatnonzero(bad.any(axis=1))
            raise InvalidValuesError(
                f"minibatch {i}: {key!r} must be > 0, but {_cells_phrase(rows.size)} "
                f"{_have(rows.size)} a value <= 0, e.g. "
                f"{_preview([f'cell {first_cell + r}' for r in rows])}"
            )
    return out


def normalize_dataloader(
    dataloader: Iterable[Mapping[str, Any]],
    manifest: Manifest,
    *,
    require_positive_library: bool = False,
    count_data: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
    """Normalize a user-given iterable of minibatch dicts (scvi-tools ``REGISTRY_KEYS`` names).

    Values may be numpy arrays, lists, or anything with ``__array__`` (e.g. CPU torch tensors).
    ``X`` must have ``manifest.n_genes`` columns in the model's gene order. ``batch`` and
    ``labels`` may be left out when the model did not register them (they default to 0);
    covariates and size factors the model registered are required. Cells are named
    ``"cell i"`` (their running position) in error messages, and ``cell_index`` is that
    running position.

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
    return _normalize_iter(
        it, manifest, require_positive_library=require_positive_library, count_data=count_data
    )


def _normalize_iter(
    it: Iterator[Any],
    manifest: Manifest,
    *,
    require_positive_library: bool,
    count_data: bool,
) -> Iterator[dict[str, np.ndarray]]:
    reg = manifest.registry
    n_genes = manifest.n_genes
    checker = _ValueChecker(
        require_positive_library=require_positive_library,
        count_data=count_data,
        source="the dataloader's X",
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
        if not _dtype_is_numeric(x.dtype):
            raise InvalidValuesError(
                f"minibatch {i}: X must hold numbers, got dtype {x.dtype}; pass raw counts"
            )
        n = x.shape[0]
        if n == 0:
            logger.debug("skipping empty minibatch %d", i)
            continue
        first = position
        integer_input = _dtype_is_integer(x.dtype)
        xf = np.ascontiguousarray(x, dtype=np.float32)
        checker.record(
            checker.check(
                xf, lambda r, first=first: [f"cell {first + k}" for k in r], integer_input
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

        out[CELL_INDEX_KEY] = np.arange(first, first + n, dtype=np.int64)
        position += n
        yield out
    checker.finish()
