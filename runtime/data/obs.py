"""Registered obs columns as model inputs: category codes, covariates and size factors.

Categories are matched to the training categories by ``str`` comparison; a column's values are
checked once for the whole AnnData (not per minibatch).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..bundle import CategoricalField, Registry
from ..errors import (
    InvalidArgumentError,
    InvalidValuesError,
    MissingColumnError,
    UnknownCategoryError,
)
from .text import cells_phrase, have, plain, preview

logger = logging.getLogger(__name__)


#: Kinds of registered obs inputs (the Minibatch fields they fill).
OBS_KINDS = ("batch", "labels", "cat_covs", "cont_covs", "size_factor", "panel")


@dataclass(frozen=True)
class ObsUse:
    """Which registered obs inputs a computation reads, and why (the words of refusals).

    Attributes
    ----------
    used
        Input kind (:data:`OBS_KINDS`) -> why the computation reads it, e.g. ``"the encoder
        takes it"``. Kinds not listed do not change any number of the computation: their
        columns may be absent or hold categories never seen in training.
    unseen_as
        Obs column -> a training category: cells whose category the model never saw are
        computed as that category (an explicit opt-in, logged).
    what
        What is computed (for messages), e.g. ``"the latent space"``.
    """

    used: Mapping[str, str] = field(default_factory=dict)
    unseen_as: Mapping[str, Any] = field(default_factory=dict)
    what: str = "the results"


@dataclass(frozen=True)
class ObsInputs:
    """Every cell's registered obs inputs (codes in the training order, covariate values)."""

    batch: np.ndarray  # (n, 1) int64
    labels: np.ndarray  # (n, 1) int64
    cat_covs: np.ndarray | None  # (n, K) int64
    cont_covs: np.ndarray | None  # (n, C) float32
    size_factor: np.ndarray | None  # (n, 1) float32
    panel: np.ndarray | None = None  # (n, 1) int64 (TOTALVI's panel_key)
    #: What was read differently from training, one sentence each (logged, shown by the CLI).
    notes: tuple[str, ...] = ()


def read_obs(
    obs: pd.DataFrame,
    registry: Registry,
    use: ObsUse | None = None,
    *,
    missing_labels_code: int | None = None,
) -> ObsInputs:
    """Encode the registered obs columns of ``obs`` for a computation that reads ``use``.

    Columns the computation reads must be present with training categories (or be mapped
    with ``use.unseen_as``); columns it does not read may be absent or hold unseen categories
    (filled with a placeholder that changes no number). ``use=None``: every column is read.
    ``missing_labels_code``: when the labels column is absent, every cell gets this label code
    (SCANVI query cells: all unlabeled).
    """
    use = ObsUse(used={k: "the model takes it" for k in OBS_KINDS}) if use is None else use
    n = len(obs)
    reg = registry
    _check_unseen_as(use.unseen_as, reg)
    kinds = {
        reg.batch.key: "batch",
        reg.labels.key: "labels",
        **{f.key: "cat_covs" for f in reg.categorical_covariates},
        **{k: "cont_covs" for k in reg.continuous_covariates},
        reg.size_factor_key: "size_factor",
        **({reg.panel.key: "panel"} if reg.panel is not None else {}),
    }
    for key, what in reg.obs_columns():
        if key in obs.columns or kinds[key] not in use.used:
            continue
        if what == "labels_key" and missing_labels_code is not None:
            continue
        raise missing_column_error(what, key, obs, reg, why=use.used[kinds[key]])
    notes: list[str] = []

    def codes_for(f: CategoricalField, what: str, kind: str) -> np.ndarray:
        if f.key is None:
            return np.zeros(n, dtype=np.int64)
        if f.key not in obs.columns:
            notes.append(f"obs column {f.key!r} is absent: {use.what} does not depend on it")
            return np.zeros(n, dtype=np.int64)
        return encode_categorical(obs, f, what, use=use, kind=kind, notes=notes)

    batch = codes_for(reg.batch, "batch_key", "batch").reshape(-1, 1)
    if (
        reg.labels.key is not None
        and reg.labels.key not in obs.columns
        and (missing_labels_code is not None)
    ):
        logger.info(
            "adata.obs has no %r column: every cell gets label code %d",
            reg.labels.key,
            missing_labels_code,
        )
        labels = np.full((n, 1), int(missing_labels_code), dtype=np.int64)
    else:
        labels = codes_for(reg.labels, "labels_key", "labels").reshape(-1, 1)
    cat = None
    if reg.categorical_covariates:
        cat = np.ascontiguousarray(
            np.stack(
                [
                    codes_for(f, "categorical_covariate_keys", "cat_covs")
                    for f in reg.categorical_covariates
                ],
                axis=1,
            ),
            dtype=np.int64,
        )
    cont = None
    if reg.continuous_covariates:
        if "cont_covs" in use.used:
            columns = [
                numeric_obs(obs, k, "continuous_covariate_keys", positive=False)
                for k in reg.continuous_covariates
            ]
        else:  # not read: placeholders
            columns = [np.zeros(n, dtype=np.float32) for _ in reg.continuous_covariates]
        cont = np.ascontiguousarray(np.stack(columns, axis=1), dtype=np.float32)
    size_factor = None
    if reg.size_factor_key is not None:
        if "size_factor" in use.used:
            size_factor = numeric_obs(
                obs, reg.size_factor_key, "size_factor_key", positive=True
            ).reshape(-1, 1)
        else:
            size_factor = np.ones((n, 1), dtype=np.float32)
    panel = None
    if reg.panel is not None:
        panel = codes_for(reg.panel, "panel_key", "panel").reshape(-1, 1)
    for note in notes:
        logger.info("%s", note, extra={"scvi_onnx_note": note})
    return ObsInputs(batch, labels, cat, cont, size_factor, panel, tuple(notes))


def _check_unseen_as(unseen_as: Mapping[str, Any], reg: Registry) -> None:
    """``unseen_as`` names registered categorical columns and their training categories."""
    fields = {f.key: f for f in (reg.batch, reg.labels, *reg.categorical_covariates) if f.key}
    if reg.panel is not None and reg.panel.key:
        fields.setdefault(reg.panel.key, reg.panel)
    for column, category in unseen_as.items():
        if column not in fields:
            raise InvalidArgumentError(
                f"unseen_as names obs column {column!r}, which is not a categorical column the "
                f"model registered; its categorical columns: {preview(list(fields), 10)}"
            )
        cats = [str(c) for c in fields[column].categories]
        if str(category) not in cats:
            raise InvalidArgumentError(
                f"unseen_as[{column!r}] = {category!r} is not a training category of "
                f"{column!r}; the model knows {preview(fields[column].categories, 10)}"
            )


def missing_column_error(
    what: str, key: str, obs: pd.DataFrame, registry: Registry, *, why: str | None = None
) -> MissingColumnError:
    """The column is absent: say what the model knows of it, and how to add it."""
    present = [str(c) for c in obs.columns]
    known = {
        f.key: f.categories
        for f in (registry.batch, registry.labels, *registry.categorical_covariates)
    }
    if key in known:
        cats = known[key]
        values = (
            f"one of its {len(cats)} training categories ({preview(cats, 10)}) for each "
            "cell, e.g. for a file that is one sample: "
            f"adata.obs[{key!r}] = {plain(cats[0])!r} (CLI: --obs {key}={plain(cats[0])})"
        )
    else:
        values = "the same values and meaning as in training"
    reason = f" ({why})" if why else ""
    return MissingColumnError(
        f"adata.obs has no column {key!r} ({what} registered at training time){reason}; the "
        f"model needs obs columns {[k for k, _ in registry.obs_columns()]!r}; present: "
        f"{preview(present, 10) if present else 'none'}. Add the column with {values}"
    )


def encode_categorical(
    obs: pd.DataFrame,
    field: CategoricalField,
    what: str,
    *,
    use: ObsUse | None = None,
    kind: str | None = None,
    notes: list[str] | None = None,
) -> np.ndarray:
    """Map an obs column to training-category codes (by ``str`` comparison).

    Values never seen in training (and missing values) are refused when ``use`` reads the
    column, unless ``use.unseen_as`` maps the column to a training category; where ``use``
    does not read it, they get a placeholder code (a sentence goes to ``notes``).
    """
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
    if not bad.any():
        return codes
    n_bad = int(bad.sum())
    n_nan = int(np.count_nonzero(raw < 0))
    used = np.unique(raw[bad & (raw >= 0)])
    unseen = [cat_col.categories[j] for j in used]
    parts = []
    if unseen:
        parts.append(f"categories never seen in training: {preview(unseen)}")
    if n_nan:
        parts.append(f"missing values (NaN) in {cells_phrase(n_nan)}")
    # the cells, counted once (a NaN-only column's part already counts them)
    total = f" ({cells_phrase(n_bad)})" if unseen else ""
    found = f"obs column {field.key!r} ({what}) holds {'; '.join(parts)}{total}"
    use = ObsUse(used={kind: "the model takes it"}) if use is None else use
    if field.key in use.unseen_as:
        target = str(use.unseen_as[field.key])
        codes = np.where(bad, lookup[target], codes)
        note = f"{found}: computed as {field.key}={target!r} (unseen_as)"
        if notes is not None:
            notes.append(note)
        return codes
    if kind not in use.used:
        if notes is not None:
            notes.append(
                f"{found}: {use.what} does not depend on {field.key!r}, so they are computed "
                "as any other cell"
            )
        return np.where(bad, 0, codes)
    example = (
        f"unseen_as={{{field.key!r}: {plain(field.categories[0])!r}}} (CLI: --unseen-as "
        f"{field.key}={plain(field.categories[0])})"
    )
    known = f"The model knows {len(field.categories)} categories: {preview(field.categories, 10)}"
    reads = f"{use.what[:1].upper() + use.what[1:]} reads {field.key!r} ({use.used[kind]})"
    if not unseen:  # missing values only: no category at all, not an unseen one
        raise UnknownCategoryError(
            f"{found}. {reads} and a missing value is none of its categories. {known}. Fill "
            f"them (or drop these cells), or compute them as a training category, {example}"
        )
    raise UnknownCategoryError(
        f"{found}. {reads} and the model has no weights for categories it never saw. {known}. "
        f"Either compute these cells as a training category, {example}, or fine-tune a query "
        "model with scvi-tools (model.load_query_data(query, reference), train, then export it)"
    )


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
