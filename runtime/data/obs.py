"""Registered obs columns as model inputs: category codes, covariates and size factors.

Categories are matched to the training categories by ``str`` comparison; a column's values are
checked once for the whole AnnData (not per minibatch).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..bundle import CategoricalField, Registry
from ..errors import InvalidValuesError, MissingColumnError, UnknownCategoryError
from .text import cells_phrase, have, preview

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ObsInputs:
    """Every cell's registered obs inputs (codes in the training order, covariate values)."""

    batch: np.ndarray  # (n, 1) int64
    labels: np.ndarray  # (n, 1) int64
    cat_covs: np.ndarray | None  # (n, K) int64
    cont_covs: np.ndarray | None  # (n, C) float32
    size_factor: np.ndarray | None  # (n, 1) float32
    panel: np.ndarray | None = None  # (n, 1) int64 (TOTALVI's panel_key)


def read_obs(
    obs: pd.DataFrame, registry: Registry, *, missing_labels_code: int | None = None
) -> ObsInputs:
    """Encode the registered obs columns of ``obs``.

    ``missing_labels_code``: when the labels column is absent, every cell gets this label
    code instead of an error (SCANVI query cells: all unlabeled).
    """
    n = len(obs)
    reg = registry
    labels_absent = reg.labels.key is not None and reg.labels.key not in obs.columns
    for key, what in reg.obs_columns():
        if key not in obs.columns:
            if what == "labels_key" and missing_labels_code is not None:
                continue
            raise missing_column_error(what, key, obs, reg)

    def codes_for(f: CategoricalField, what: str) -> np.ndarray:
        if f.key is None:
            return np.zeros(n, dtype=np.int64)
        return encode_categorical(obs, f, what)

    batch = codes_for(reg.batch, "batch_key").reshape(-1, 1)
    if labels_absent and missing_labels_code is not None:
        logger.info(
            "adata.obs has no %r column: every cell gets label code %d",
            reg.labels.key,
            missing_labels_code,
        )
        labels = np.full((n, 1), int(missing_labels_code), dtype=np.int64)
    else:
        labels = codes_for(reg.labels, "labels_key").reshape(-1, 1)
    cat = None
    if reg.categorical_covariates:
        cat = np.ascontiguousarray(
            np.stack(
                [codes_for(f, "categorical_covariate_keys") for f in reg.categorical_covariates],
                axis=1,
            ),
            dtype=np.int64,
        )
    cont = None
    if reg.continuous_covariates:
        cont = np.ascontiguousarray(
            np.stack(
                [
                    numeric_obs(obs, k, "continuous_covariate_keys", positive=False)
                    for k in reg.continuous_covariates
                ],
                axis=1,
            ),
            dtype=np.float32,
        )
    size_factor = None
    if reg.size_factor_key is not None:
        size_factor = numeric_obs(
            obs, reg.size_factor_key, "size_factor_key", positive=True
        ).reshape(-1, 1)
    panel = None
    if reg.panel is not None:
        panel = codes_for(reg.panel, "panel_key").reshape(-1, 1)
    return ObsInputs(batch, labels, cat, cont, size_factor, panel)


def missing_column_error(
    what: str, key: str, obs: pd.DataFrame, registry: Registry
) -> MissingColumnError:
    present = [str(c) for c in obs.columns]
    return MissingColumnError(
        f"adata.obs has no column {key!r} ({what} registered at training time); the model "
        f"needs obs columns {[k for k, _ in registry.obs_columns()]!r}; present: "
        f"{preview(present, 10) if present else 'none'}. Add the column, with the "
        "same name and meaning as in training"
    )


def encode_categorical(obs: pd.DataFrame, field: CategoricalField, what: str) -> np.ndarray:
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
            parts.append(f"categories never seen in training: {preview(unseen)}")
        if n_nan:
            parts.append(f"missing values (NaN) in {cells_phrase(n_nan)}")
        raise UnknownCategoryError(
            f"obs column {field.key!r} ({what}) holds {'; '.join(parts)} "
            f"({cells_phrase(int(bad.sum()))} affected). The model knows "
            f"{len(field.categories)} categories: {preview(field.categories, 10)}. Map these "
            "cells to a known category or drop them before scoring"
        )
    return codes


def numeric_obs(obs: pd.DataFrame, key: str, what: str, *, positive: bool) -> np.ndarray:
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
            f"{cells_phrase(int(bad.sum()))}, e.g. {preview(obs.index[bad])}; fill or drop "
            "these cells before scoring"
        )
    if positive:
        bad = values <= 0
        if bad.any():
            n_bad = int(bad.sum())
            raise InvalidValuesError(
                f"obs column {key!r} ({what}) must be > 0, but {cells_phrase(n_bad)} "
                f"{have(n_bad)} a value <= 0, e.g. {preview(obs.index[bad])}; size factors "
                "multiply the expected counts and must be positive"
            )
    return values
