"""A MuData's modalities as the inputs of a model set up with ``setup_mudata`` (TOTALVI).

scvi-tools' ``setup_mudata`` registers each input in a modality: the RNA counts in one
modality's ``X`` or layer, the protein counts in another's, each obs column in a modality's
``obs`` or in the MuData's own. The manifest's registry records those modalities
(:attr:`~scvi_onnx.bundle.Registry.modalities`); :func:`from_mudata` gathers what the model
reads into an AnnData (the RNA matrix and the registered obs columns, not copied) and the
protein counts, which :class:`~scvi_onnx.data.anndata.AnnDataSource` then reads as it reads
an AnnData. The ``mudata`` package itself is not imported here: a MuData is recognised by its
type name and read through its attributes (``mod``, ``obs``, ``obs_names``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from ..bundle import Registry
from ..errors import InputDataError, MissingColumnError
from .proteins import ProteinInput
from .text import preview

#: Registry field -> what registers it (``Registry.obs_columns`` names the obs ones).
_OBS_FIELDS = {
    "batch_key": "batch",
    "labels_key": "labels",
    "panel_key": "panel",
    "size_factor_key": "size_factor",
    "categorical_covariate_keys": "extra_categorical_covs",
    "continuous_covariate_keys": "extra_continuous_covs",
}


def obs_modality(registry: Registry, what: str) -> str | None:
    """The modality whose ``obs`` holds a registered obs column of kind ``what`` (a kind of
    :meth:`~scvi_onnx.bundle.Registry.obs_columns`, e.g. ``"batch_key"``); ``None``: the
    MuData's own ``obs`` (``setup_mudata`` without a modality for it), or, for a model set up
    with ``setup_anndata``, the AnnData's."""
    return (registry.modalities or {}).get(_OBS_FIELDS[what])


def obs_location(registry: Registry, what: str) -> str:
    """Where an input holds a registered obs column of kind ``what``, for messages and
    ``scvi-onnx info``: ``"obs"``, ``"mdata.obs"`` or ``"mdata.mod['rna'].obs"``."""
    if registry.modalities is None:
        return "obs"
    mod = obs_modality(registry, what)
    return "mdata.obs" if mod is None else f"mdata.mod[{mod!r}].obs"


class ModelInput(NamedTuple):
    """What a model reads, already gathered from its input: the AnnData (the expression matrix
    and the registered obs columns) and the protein counts (``None`` without proteins).

    :func:`split_input` gives one from a MuData and takes one as it is: the Dask path gathers
    a MuData's modalities on the client and each worker hands its chunk on in this form."""

    adata: Any
    proteins: ProteinInput | None


def is_mudata(obj: Any) -> bool:
    """Whether ``obj`` is a ``mudata.MuData`` (without importing mudata)."""
    return any(c.__name__ == "MuData" for c in type(obj).__mro__) and hasattr(obj, "mod")


def split_input(data: Any, registry: Registry) -> ModelInput:
    """What a model reads from ``data``: a MuData's modalities as an AnnData and its protein
    counts (:func:`from_mudata`), a :class:`ModelInput` as it is, or ``data`` itself
    (``proteins`` ``None``: read, if any, from its obsm).

    Raises
    ------
    InputDataError
        ``data`` is not a MuData but the model was set up with ``setup_mudata``.
    """
    if isinstance(data, ModelInput):
        return data
    if is_mudata(data):
        return from_mudata(data, registry)
    if registry.modalities is not None:
        mods = sorted({m for m in registry.modalities.values() if m is not None})
        raise InputDataError(
            f"this model was set up with setup_mudata: pass a MuData with the modalities "
            f"{mods} it was trained on (got a {type(data).__name__})"
        )
    return ModelInput(data, None)


def from_mudata(mdata: Any, registry: Registry) -> ModelInput:
    """The AnnData a model set up with ``setup_mudata`` reads, and its protein counts.

    Parameters
    ----------
    mdata
        An in-memory MuData holding the modalities the model was set up with.
    registry
        The bundle's registry (with :attr:`~scvi_onnx.bundle.Registry.modalities`).

    Returns
    -------
    ``(adata, proteins)``: an AnnData with the RNA modality's registered matrix (in its
    registered layer) and var names, and the registered obs columns gathered from their
    modalities; the protein modality's counts and names (``None`` for models without
    proteins).

    Raises
    ------
    InputDataError
        (or a subclass) when the MuData lacks a registered modality, layer or column, or a
        modality's cells are not the MuData's.
    """
    import anndata

    mods = registry.modalities
    if mods is None:
        raise InputDataError(
            "this model was set up with setup_anndata (one AnnData), not setup_mudata: pass an "
            "AnnData (for TOTALVI with the protein counts in its registered obsm entry), e.g. "
            "the RNA modality with the proteins copied into .obsm"
        )
    names = list(mdata.mod.keys())

    def modality(field: str, what: str) -> Any | None:
        name = mods.get(field)
        if name is None:
            return None
        if name not in mdata.mod:
            raise MissingColumnError(
                f"the MuData has no modality {name!r}, where the model reads {what} (registered "
                f"at training with setup_mudata); modalities present: {preview(names, 10)}"
            )
        m = mdata.mod[name]
        if getattr(m, "isbacked", False):
            raise InputDataError(
                f"modality {name!r} is backed (read with backed=True); read the MuData into "
                "memory (mudata.read_h5mu(path)), or pass an AnnData with the protein counts "
                "in obsm, which may be backed"
            )
        if m.n_obs != mdata.n_obs or not np.array_equal(
            np.asarray(m.obs_names), np.asarray(mdata.obs_names)
        ):
            if m.n_obs == mdata.n_obs and pd.Index(m.obs_names).sort_values().equals(
                pd.Index(mdata.obs_names).sort_values()
            ):
                raise InputDataError(
                    f"modality {name!r} holds the MuData's cells in another order; the model "
                    "reads every modality row by row for the same cells: put them in the "
                    f"MuData's order, e.g. mdata.mod[{name!r}] = "
                    f"mdata.mod[{name!r}][mdata.obs_names].copy()"
                )
            raise InputDataError(
                f"modality {name!r} holds {m.n_obs} cells, not the MuData's {mdata.n_obs} in "
                "the same order; the model reads every modality for the same cells: subset "
                "the MuData to the cells shared by its modalities (e.g. "
                "mudata.MuData.intersect_obs)"
            )
        return m

    rna = modality("X", "the RNA counts")
    if rna is None:
        raise InputDataError("the registry names no RNA modality; re-export the model")
    obs = pd.DataFrame(index=pd.Index(mdata.obs_names))
    for key, what in registry.obs_columns():
        field = _OBS_FIELDS[what]
        src = modality(field, f"obs column {key!r}")
        frame = mdata.obs if src is None else src.obs
        place = obs_location(registry, what)
        if key not in frame.columns:
            present = [str(c) for c in frame.columns]
            elsewhere = [
                p
                for p, f in [("mdata.obs", mdata.obs)]
                + [(f"mdata.mod[{k!r}].obs", mdata.mod[k].obs) for k in names]
                if p != place and key in f.columns
            ]
            hint = (
                f"; it is in {elsewhere[0]}, but setup_mudata registered it in {place}: "
                f"copy it there ({place}[{key!r}] = {elsewhere[0]}[{key!r}])"
                if elsewhere
                else ". Add the column, with the same name and meaning as in training"
            )
            raise MissingColumnError(
                f"{place} has no column {key!r} ({what} registered at training time); "
                f"present: {preview(present, 10) if present else 'none'}{hint}"
            )
        obs[key] = frame[key].values
    layer = registry.layer
    var = pd.DataFrame(index=pd.Index(rna.var_names))
    if layer is None:
        adata = anndata.AnnData(X=rna.X, obs=obs, var=var)
    else:
        if layer not in rna.layers:
            present = list(rna.layers.keys())
            raise MissingColumnError(
                f"mdata.mod[{mods['X']!r}].layers has no layer {layer!r}, where the model reads "
                f"its RNA counts; layers present: {preview(present, 10) if present else 'none'}"
            )
        adata = anndata.AnnData(obs=obs, var=var, layers={layer: rna.layers[layer]})
    proteins = None
    field = registry.proteins
    if field is not None:
        prot = modality("proteins", "the protein counts")
        if prot is None:
            raise InputDataError("the registry names no protein modality; re-export the model")
        where = f"mdata.mod[{mods['proteins']!r}]"
        if field.attr_name == "layers" and field.attr_key is not None:
            if field.attr_key not in prot.layers:
                present = list(prot.layers.keys())
                raise MissingColumnError(
                    f"{where}.layers has no layer {field.attr_key!r}, where the model reads its "
                    f"protein counts; layers present: {preview(present, 10) if present else 'none'}"
                )
            matrix, where = prot.layers[field.attr_key], f"{where}.layers[{field.attr_key!r}]"
        else:
            matrix, where = prot.X, f"{where}.X"
        proteins = ProteinInput(matrix, prot.var_names, where)
    return ModelInput(adata, proteins)
