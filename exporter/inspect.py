"""What a trained scvi-tools model registered: its genes, obs columns and categories.

scvi-tools keeps the AnnData setup in ``model.registry_["field_registries"]``; the manifest's
:class:`~scvi_onnx.bundle.Registry` is the part of it the runtime needs to read new data.
"""

from __future__ import annotations

import re

import numpy as np

from scvi_onnx.bundle import CategoricalField, Registry


def field(registry: dict, key: str) -> dict:
    return registry["field_registries"].get(key, {}) or {}


def categories(values) -> list:
    out = []
    for v in list(values):
        if isinstance(v, (np.generic,)):
            v = v.item()
        out.append(v if isinstance(v, (str, int, float, bool)) else str(v))
    return out


def registry(model) -> Registry:
    reg = model.registry_
    x = field(reg, "X")
    layer = x.get("data_registry", {}).get("attr_key")

    def catfield(key: str, internal: str) -> CategoricalField:
        f = field(reg, key)
        st = f.get("state_registry", {})
        original = st.get("original_key")
        mapping = st.get("categorical_mapping", [0])
        user_key = None if original in (None, internal) else original
        return CategoricalField(key=user_key, categories=tuple(categories(mapping)))

    sf = field(reg, "size_factor").get("data_registry", {})
    size_factor_key = sf.get("attr_key") if sf else None
    cat_st = field(reg, "extra_categorical_covs").get("state_registry", {})
    cats = tuple(
        CategoricalField(key=k, categories=tuple(categories(cat_st["mappings"][k])))
        for k in cat_st.get("field_keys", [])
    )
    cont_st = field(reg, "extra_continuous_covs").get("state_registry", {})
    conts = tuple(str(c) for c in cont_st.get("columns", []))
    return Registry(
        layer=layer,
        batch=catfield("batch", "_scvi_batch"),
        labels=catfield("labels", "_scvi_labels"),
        size_factor_key=size_factor_key,
        categorical_covariates=cats,
        continuous_covariates=conts,
    )


def genes(model) -> list[str]:
    st = field(model.registry_, "X").get("state_registry", {})
    names = st.get("column_names")
    if names is None:
        names = model.adata.var_names
    return [str(g) for g in list(names)]


def density(model, max_cells: int = 20_000, block: int = 1_000) -> float | None:
    """The share of non-zero values in the registered ``X`` of the model's AnnData, or
    ``None`` without one (a model loaded without its data). At most ``max_cells`` cells are
    read, in blocks of ``block`` rows spread evenly over the data (data sorted by sample is
    not judged by its first sample; a backed dense ``X`` is never read whole)."""
    import scipy.sparse as sp

    manager = getattr(model, "_adata_manager", None)
    if manager is None:
        return None
    try:
        x = manager.get_from_registry("X")
    except (KeyError, ValueError, AttributeError):
        return None
    n, g = int(x.shape[0]), int(x.shape[1])
    if n == 0 or g == 0:
        return None
    n_blocks = max(1, min(max_cells, n) // block)
    starts = np.unique(np.linspace(0, max(0, n - block), n_blocks).astype(np.int64))
    nonzero = seen = 0
    for s0 in starts.tolist():
        rows = x[s0 : min(n, s0 + block)]
        if sp.issparse(rows):
            nonzero += int(np.count_nonzero(sp.csr_matrix(rows).data))
        else:
            nonzero += int(np.count_nonzero(np.asarray(rows)))
        seen += rows.shape[0]
    return nonzero / (seen * g)


def norm_placement(fc) -> dict[str, bool]:
    seq = fc.fc_layers[0]
    return {"batch_norm": seq[1] is not None, "layer_norm": seq[2] is not None}


def trained_with(model) -> str | None:
    """The scvi-tools version that trained ``model``'s weights, as its registry records it.

    A model loaded from a folder keeps the saved registry as its manager's source registry
    (the model's own registry then names the installed version); a model built here has only
    its own. ``load_saved_model`` writes the saved version into the registry it returns."""
    manager = getattr(model, "_adata_manager", None)
    source = getattr(manager, "_source_registry", None) or {}
    own = getattr(model, "registry_", None) or {}
    version = source.get("scvi_version") or own.get("scvi_version")
    return str(version) if version else None


def version_before(version: str | None, release: str) -> bool:
    """Whether scvi-tools ``version`` (as a registry records it: ``"1.1.6.post2"``,
    ``"< 0.15"``) is older than ``release``; False when it is not known."""
    if not version:
        return False
    if version.strip().startswith("<"):  # the legacy loader's "< 0.15" (no version saved)
        return True
    parsed = _release(version)
    return parsed is not None and parsed < _release(release)


def _release(version: str) -> tuple[int, int, int] | None:
    """``(major, minor, micro)`` of a version string (pre-release and post tags ignored)."""
    m = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", version)
    return None if m is None else (int(m[1]), int(m[2]), int(m[3] or 0))
