"""Load model folders saved by older scvi-tools versions with the installed scvi-tools.

scvi-tools has written three kinds of folders:

* < 0.15: ``model_params.pt`` (the module's state dict), ``attr.pkl`` (the model's public
  attributes, the AnnData setup in ``scvi_setup_dict_``) and ``var_names.csv``; up to 0.8 the
  ``init_params_`` were one flat dict holding ``use_cuda``.
* >= 0.15: one ``model.pt`` pickle ``{"model_state_dict", "var_names", "attr_dict"}`` whose
  ``attr_dict["registry_"]`` holds ``field_registries`` (0.17+ also ``setup_method_name`` and the
  genes as ``column_names``); from 1.3 the state dict also holds ``pyro_param_store``.
* any of them with or without ``adata.h5ad`` (``mdata.h5mu`` for models set up with
  ``setup_mudata``, whose ``var_names`` are one array per modality).

:func:`load_saved_model` reads any of these, rewrites what scvi-tools 1.4 cannot load itself
into the form it writes (in a temporary copy of ``model.pt``: the user's folder is never
modified) and loads it with the model class's own ``load``. Without an AnnData it hands
``load`` a stand-in AnnData built from the saved registry (genes and categories only, its
values never reach the model: the saved weights and library-size priors replace whatever
the stand-in produced) and detaches it afterwards, because several classes
(``LinearSCVI``, ``SCANVI``, ``SCVI`` with a learned library size) cannot be built from a
registry alone. What cannot be converted raises :class:`~scvi_onnx.errors.UnsupportedModelError`
naming it.

``model.pt`` and ``attr.pkl`` are pickles: load only folders you trust.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scvi_onnx.errors import UnsupportedModelError

logger = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
ADATA_FILE = "adata.h5ad"
MDATA_FILE = "mdata.h5mu"
LEGACY_MODEL_FILE = "model_params.pt"
LEGACY_ATTR_FILE = "attr.pkl"
LEGACY_VAR_NAMES_FILE = "var_names.csv"

# init parameters that old model classes took and scvi-tools 1.x no longer does (they only
# chose a device).
_OBSOLETE_INIT_PARAMS = ("use_cuda", "use_gpu")
_LIBRARY_BUFFERS = ("library_log_means", "library_log_vars")
#: Model classes whose ``setup_mudata`` models export (the runtime reads their modalities).
MUDATA_MODELS = ("TOTALVI",)
#: TOTALVAE's own parameters besides its encoder and decoder (scvi-tools < 0.15 names none).
_TOTALVI_PARAMS = (
    "px_r",
    "py_r",
    "background_pro_alpha",
    "background_pro_log_beta",
    "log_per_batch_efficiency",
)


@dataclass
class SavedModel:
    """The contents of a saved model folder (rewritten in place by :func:`normalise`)."""

    path: Path
    prefix: str
    layout: str  # "model.pt" or "pre-0.15"
    model_name: str
    scvi_version: str
    attr_dict: dict
    var_names: np.ndarray
    state_dict: dict
    changes: list[str] = field(default_factory=list)

    @property
    def registry(self) -> dict:
        return self.attr_dict["registry_"]


# ----------------------------------------------------------------------------- reading
def _find(path: Path, suffix: str) -> str | None:
    """The file-name prefix of ``<prefix><suffix>`` in ``path`` (``model.save(prefix=...)``)."""
    if (path / suffix).is_file():
        return ""
    hits = sorted(p.name for p in path.iterdir() if p.name.endswith(suffix) and p.is_file())
    return hits[0][: -len(suffix)] if len(hits) == 1 else None


def _not_a_folder(path: Path) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{path} is not a saved scvi-tools model folder (no {MODEL_FILE}, nor the "
        f"{LEGACY_MODEL_FILE} + {LEGACY_ATTR_FILE} + {LEGACY_VAR_NAMES_FILE} of "
        "scvi-tools < 0.15); pass a trained model instance or the folder written by model.save()"
    )


def _read_var_names(file: Path) -> np.ndarray:
    # scvi-tools < 0.15 wrote one gene per line (np.savetxt fmt="%s"); reading lines keeps
    # names with commas or '#' whole (np.genfromtxt would split or truncate them).
    lines = file.read_text().splitlines()
    while lines and lines[-1] == "":
        lines.pop()
    return np.asarray(lines, dtype=object)


def read_saved_model(path: str | os.PathLike, model_class: str | None = None) -> SavedModel:
    """Read a saved model folder of any scvi-tools version >= 0.8 (nothing is converted yet).

    Nothing is loaded into a model; the folder is not modified.
    """
    path = Path(path)
    if not path.is_dir():
        raise _not_a_folder(path)
    prefix = _find(path, MODEL_FILE)
    if prefix is not None:
        try:
            # model.pt is a pickle: export only trusted folders (see README).
            file = path / f"{prefix}{MODEL_FILE}"
            saved = torch.load(file, map_location="cpu", weights_only=False)
        except Exception as e:
            raise UnsupportedModelError(f"cannot read {path / (prefix + MODEL_FILE)}: {e}") from e
        if not isinstance(saved, dict) or "attr_dict" not in saved:
            raise UnsupportedModelError(
                f"{path / (prefix + MODEL_FILE)} is not a scvi-tools model file "
                "(no attr_dict): was it written by model.save()?"
            )
        attr_dict = dict(saved["attr_dict"])
        state_dict = dict(saved.get("model_state_dict") or {})
        var_names = saved.get("var_names")
        layout = "model.pt"
    else:
        prefix = _find(path, LEGACY_MODEL_FILE)
        if prefix is None or not all(
            (path / f"{prefix}{f}").is_file() for f in (LEGACY_ATTR_FILE, LEGACY_VAR_NAMES_FILE)
        ):
            raise _not_a_folder(path)
        import pandas as pd

        try:
            state_dict = dict(
                torch.load(
                    path / f"{prefix}{LEGACY_MODEL_FILE}", map_location="cpu", weights_only=False
                )
            )
            with open(path / f"{prefix}{LEGACY_ATTR_FILE}", "rb") as f:
                attr_dict = dict(pd.read_pickle(f))
        except Exception as e:
            raise UnsupportedModelError(
                f"cannot read the scvi-tools < 0.15 files in {path}: {e}. Load the model with the "
                "scvi-tools version that saved it and convert the folder there with "
                "scvi.model.<Class>.convert_legacy_save(old_folder, new_folder)"
            ) from e
        var_names = _read_var_names(path / f"{prefix}{LEGACY_VAR_NAMES_FILE}")
        layout = "pre-0.15"

    if isinstance(var_names, dict):  # a MuData model: one array per modality
        var_names = {
            str(k): np.asarray([str(v) for v in np.asarray(n).ravel()], dtype=object)
            for k, n in var_names.items()
        }
    else:
        var_names = np.asarray(var_names if var_names is not None else [], dtype=object)
        var_names = np.asarray([str(v) for v in var_names.ravel()], dtype=object)

    registry = attr_dict.get("registry_")
    setup_dict = attr_dict.get("scvi_setup_dict_")
    if registry is not None:
        name = model_class or registry.get("model_name")
        version = str(registry.get("scvi_version", "unknown"))
    elif setup_dict is not None:
        name = model_class or _infer_class(path, state_dict)
        version = str(setup_dict.get("scvi_version", "< 0.15"))
    else:
        raise UnsupportedModelError(
            f"{path}: the saved attributes hold neither a registry (registry_) nor a setup "
            "dictionary (scvi_setup_dict_); it was not written by a scvi-tools model's save()"
        )
    if not name:
        name = _infer_class(path, state_dict)
    return SavedModel(
        path=path,
        prefix=prefix,
        layout=layout,
        model_name=str(name),
        scvi_version=version,
        attr_dict=attr_dict,
        var_names=var_names,
        state_dict=state_dict,
        changes=[f"read the scvi-tools < 0.15 layout ({LEGACY_MODEL_FILE} + {LEGACY_ATTR_FILE})"]
        if layout == "pre-0.15"
        else [],
    )


def _infer_class(path: Path, state_dict: dict) -> str:
    """The model class of a folder that does not record it (scvi-tools < 0.15)."""
    keys = set(state_dict)
    prefixes = {k.split(".", 1)[0] for k in keys}
    totalvi = {*_TOTALVI_PARAMS, "encoder", "decoder", *_LIBRARY_BUFFERS}
    if {"py_r", "background_pro_alpha", "encoder", "decoder"} <= prefixes <= totalvi:
        return "TOTALVI"
    vae = {"px_r", "z_encoder", "l_encoder", "decoder", *_LIBRARY_BUFFERS}
    if {"classifier", "encoder_z2_z1", "decoder_z1_z2"} <= prefixes and prefixes <= vae | {
        "classifier",
        "encoder_z2_z1",
        "decoder_z1_z2",
        "y_prior",
    }:
        return "SCANVI"
    if prefixes <= vae and any(k.startswith("decoder.factor_regressor.") for k in keys):
        return "LinearSCVI"
    if prefixes <= vae and any(k.startswith("decoder.px_decoder.") for k in keys):
        return "SCVI"
    peakvae = {"z_encoder", "z_decoder", "d_encoder", "region_factors"}
    if prefixes <= peakvae and any(k.startswith("z_decoder.px_decoder.") for k in keys):
        return "PEAKVI"
    raise UnsupportedModelError(
        f"{path} was saved by scvi-tools < 0.15, whose files do not name the model class, and "
        "its weights are not those of SCVI, LinearSCVI, SCANVI, TOTALVI or PEAKVI. Convert it "
        "with the class that saved it: scvi.model.<Class>.convert_legacy_save(old_folder, "
        "new_folder), then "
        "load it with scvi-tools and save it again (model.save())"
    )


# ----------------------------------------------------------------------------- normalising
def _model_cls(name: str):
    import scvi

    cls = getattr(scvi.model, name, None)
    if cls is None or not inspect.isclass(cls):
        raise UnsupportedModelError(
            f"the saved model class {name} does not exist in scvi-tools {scvi.__version__}"
        )
    return cls


def _normalise_registry(cls, saved: SavedModel) -> None:
    attr = saved.attr_dict
    if "registry_" not in attr:
        from scvi.data._compat import registry_from_setup_dict

        setup_dict = copy.deepcopy(attr.pop("scvi_setup_dict_"))
        try:
            attr["registry_"] = registry_from_setup_dict(
                cls, setup_dict, unlabeled_category=attr.get("unlabeled_category_")
            )
        except Exception as e:
            raise UnsupportedModelError(
                f"cannot convert the scvi-tools {saved.scvi_version} setup dictionary of "
                f"{saved.path} to a registry ({type(e).__name__}: {e}). Convert the folder with "
                f"scvi.model.{cls.__name__}.convert_legacy_save(old_folder, new_folder) and "
                "export the new folder"
            ) from e
        saved.changes.append("converted scvi_setup_dict_ to a registry (registry_from_setup_dict)")
    else:
        attr["registry_"] = copy.deepcopy(attr["registry_"])
    registry = attr["registry_"]
    registry.setdefault("model_name", cls.__name__)
    method = registry.get("setup_method_name", "setup_anndata")
    if method != "setup_anndata" and not (
        method == "setup_mudata" and cls.__name__ in MUDATA_MODELS
    ):
        raise UnsupportedModelError(
            f"{saved.path} was set up with {cls.__name__}.{method}(); only models set up with "
            f"setup_anndata() (one AnnData), or {', '.join(MUDATA_MODELS)} with setup_mudata(), "
            "can be exported"
        )
    if "field_registries" not in registry or "setup_args" not in registry:
        raise UnsupportedModelError(
            f"the registry saved in {saved.path} has no field_registries / setup_args"
        )
    setup_args = registry["setup_args"]
    # Only named parameters: setup_anndata's **kwargs go to register_fields as transfer
    # options, which ignore what they do not know.
    params = {
        k
        for k, p in inspect.signature(getattr(cls, method)).parameters.items()
        if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }
    for key, value in list(setup_args.items()):
        # scvi-tools < 0.15 named an absent batch / labels column after its internal one
        # ("_scvi_batch"); registry_from_setup_dict carries that name into setup_args, where
        # it would be looked up in the user's AnnData.
        if key.endswith("_key") and value == f"_scvi_{key[: -len('_key')]}":
            setup_args[key] = None
            saved.changes.append(f"setup_args[{key!r}]: internal column {value!r} -> None")
        elif key not in params:
            if value is None or value is False:
                del setup_args[key]
                saved.changes.append(f"dropped setup argument {key!r} unknown to this version")
            else:
                raise UnsupportedModelError(
                    f"{saved.path} was set up with {key}={value!r}, an argument "
                    f"{cls.__name__}.{method}() no longer takes"
                )


def _normalise_init_params(cls, saved: SavedModel) -> None:
    attr = saved.attr_dict
    init = attr.get("init_params_")
    if not isinstance(init, dict):
        raise UnsupportedModelError(
            f"{saved.path}: the saved attributes hold no init_params_ to rebuild the model with"
        )
    init = copy.deepcopy(init)
    if "non_kwargs" not in init:
        # scvi-tools <= 0.8: one flat dict; dict values were the **kwargs.
        saved.changes.append("split the flat init_params_ (scvi-tools <= 0.8) into (non_)kwargs")
        init = {
            "non_kwargs": {k: v for k, v in init.items() if not isinstance(v, dict)},
            "kwargs": {k: v for k, v in init.items() if isinstance(v, dict)},
        }
    non_kwargs = init.setdefault("non_kwargs", {})
    init.setdefault("kwargs", {})
    for k in _OBSOLETE_INIT_PARAMS:
        if k in non_kwargs:
            del non_kwargs[k]
            saved.changes.append(f"dropped the init parameter {k!r}")
    if non_kwargs.get("datamodule") is not None:
        raise UnsupportedModelError(
            f"{saved.path} was trained from a datamodule; only AnnData models can be exported"
        )
    attr["init_params_"] = init

    # Attributes the model class now computes (read-only properties) cannot be set back.
    for name in list(attr):
        prop = inspect.getattr_static(cls, name, None)
        if isinstance(prop, property) and prop.fset is None:
            del attr[name]
            saved.changes.append(f"dropped the saved attribute {name!r} (read-only here)")


def _normalise_state_dict(cls, saved: SavedModel) -> None:
    # scvi-tools >= 1.3 stores pyro's global parameter store with every model (whatever pyro
    # parameters the session held). Non-pyro modules (VAE, LDVAE, SCANVAE) ignore it; pyro
    # modules need it in on_load, so it stays for them (scvi-tools' load pops it itself).
    from scvi.module.base import PyroBaseModuleClass

    module_cls = getattr(cls, "_module_cls", None)
    is_pyro = inspect.isclass(module_cls) and issubclass(module_cls, PyroBaseModuleClass)
    if "pyro_param_store" in saved.state_dict and not is_pyro:
        saved.state_dict.pop("pyro_param_store")
        saved.changes.append("removed pyro_param_store from the state dict")
    if cls.__name__ == "TOTALVI" and "log_per_batch_efficiency" not in saved.state_dict:
        # saved before TOTALVAE had it (scvi-tools 1.4's load fails on it): zeros, as
        # TOTALVI.convert_legacy_save fills it (an efficiency of 1 in every batch)
        fr = saved.registry["field_registries"]
        n_proteins = int(fr["proteins"]["summary_stats"]["n_proteins"])
        n_batch = int(fr["batch"]["summary_stats"]["n_batch"])
        saved.state_dict["log_per_batch_efficiency"] = torch.zeros(n_proteins, n_batch)
        saved.changes.append("added log_per_batch_efficiency = 0 (as convert_legacy_save)")


def normalise(saved: SavedModel) -> SavedModel:
    """Rewrite ``saved`` in place into what the installed scvi-tools loads."""
    cls = _model_cls(saved.model_name)
    _normalise_registry(cls, saved)
    _normalise_init_params(cls, saved)
    return saved


# ----------------------------------------------------------------------------- stand-in data
def _stand_in_adata(registry: dict, var_names: np.ndarray):
    """An AnnData with the saved genes and every saved category, to run setup_anndata on."""
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    categorical: dict[str, np.ndarray] = {}
    numeric: list[str] = []
    layers: list[str] = []
    for key, fr in registry["field_registries"].items():
        st = fr.get("state_registry") or {}
        dr = fr.get("data_registry") or {}
        if "categorical_mapping" in st:
            col = st.get("original_key")
            if col is not None and not str(col).startswith("_scvi_"):
                categorical[str(col)] = np.asarray(st["categorical_mapping"])
        elif "mappings" in st and "field_keys" in st:
            for k in st["field_keys"]:
                categorical[str(k)] = np.asarray(st["mappings"][k])
        elif "columns" in st:
            numeric += [str(c) for c in np.asarray(st["columns"]).ravel()]
        elif key == "proteins":
            pass  # _stand_in_proteins
        elif dr.get("attr_name") == "obs" and dr.get("attr_key"):
            numeric.append(str(dr["attr_key"]))
        if key == "X" and dr.get("attr_name") == "layers" and dr.get("attr_key"):
            layers.append(str(dr["attr_key"]))
    layer = registry["setup_args"].get("layer")
    if layer:
        layers.append(str(layer))
    n_obs = max([2, *(len(v) for v in categorical.values())])
    obs = pd.DataFrame(index=[f"stand_in_{i}" for i in range(n_obs)])
    for col, cats in categorical.items():
        if len(cats) == 0:
            raise UnsupportedModelError(f"the saved registry has no categories for {col!r}")
        obs[col] = cats[np.arange(n_obs) % len(cats)]
    for col in numeric:
        obs[col] = np.float32(1.0)
    # Counts of one: no zero library (log(0)) anywhere in the classes' own initialisation.
    x = sp.csr_matrix(np.ones((n_obs, len(var_names)), dtype=np.float32))
    var = pd.DataFrame(index=pd.Index(list(var_names), dtype=object))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate gene names: AnnData's warning only
        adata = anndata.AnnData(X=x, obs=obs, var=var)
        for name in layers:
            adata.layers[name] = x.copy()
    proteins = _stand_in_proteins(registry, n_obs)
    if proteins is not None:
        adata.obsm[proteins["obsm_key"]] = proteins["obsm"](adata.obs_names)
        if proteins["uns_key"]:
            adata.uns[proteins["uns_key"]] = proteins["names"]
    return adata


def _stand_in_proteins(registry: dict, n_obs: int) -> dict | None:
    """TOTALVI's protein counts for a stand-in: ones, in the registered form (a DataFrame
    named by the saved proteins, or an array numbered by scvi-tools or named in uns)."""
    import pandas as pd

    fr = registry["field_registries"].get("proteins")
    if not fr:
        return None
    st, dr = fr.get("state_registry") or {}, fr.get("data_registry") or {}
    names = list(st.get("column_names", []))
    values = np.ones((n_obs, len(names)), dtype=np.float32)
    uns_key = registry["setup_args"].get("protein_names_uns_key")
    numbered = all(isinstance(n, (int, np.integer)) for n in names)
    if numbered or uns_key:
        obsm = lambda index: values  # noqa: E731
    else:
        obsm = lambda index: pd.DataFrame(values, index=index, columns=names)  # noqa: E731
    return {
        "obsm_key": dr.get("attr_key"),
        "obsm": obsm,
        "values": values,
        "names": np.asarray(names),
        "uns_key": uns_key,
    }


def _stand_in_mudata(registry: dict, var_names: dict):
    """A MuData with the saved modalities (each field in the modality it was registered in,
    the genes and proteins of the saved var names), to run setup_mudata on."""
    import anndata
    import mudata
    import pandas as pd

    fields = registry["field_registries"]
    mods = {k: (fr.get("data_registry") or {}).get("mod_key") for k, fr in fields.items()}
    rna_names = var_names.get(mods.get("X"))
    if rna_names is None:
        rna_names = np.asarray(fields["X"]["state_registry"]["column_names"], dtype=object)
    flat = _stand_in_adata(
        {**registry, "field_registries": {k: v for k, v in fields.items() if k != "proteins"}},
        rna_names,
    )
    n_obs = flat.n_obs
    proteins = _stand_in_proteins(registry, n_obs)
    modalities: dict[str, Any] = {}
    names = dict(var_names)
    if proteins is not None and mods.get("proteins"):
        names.setdefault(mods["proteins"], proteins["names"])
    names.setdefault(mods["X"], rna_names)
    for mod, mod_names in names.items():
        if mod == mods["X"]:
            a = flat.copy()
            a.obs = a.obs[[]]
        else:
            a = anndata.AnnData(
                X=np.ones((n_obs, len(mod_names)), dtype=np.float32),
                obs=pd.DataFrame(index=flat.obs_names),
                var=pd.DataFrame(index=pd.Index(list(mod_names), dtype=object)),
            )
            if mod == mods.get("proteins"):
                key = (fields["proteins"].get("data_registry") or {}).get("attr_key")
                if key:
                    a.layers[key] = a.X.copy()
        modalities[mod] = a
    # each obs column in the modality its field was registered in (None: the MuData's obs)
    where: dict[str, str | None] = {}
    for key, fr in fields.items():
        st = fr.get("state_registry") or {}
        cols = []
        if "original_key" in st:
            cols = [st["original_key"]]
        elif "field_keys" in st:
            cols = list(st["field_keys"])
        elif "columns" in st:
            cols = [str(c) for c in np.asarray(st["columns"]).ravel()]
        elif (fr.get("data_registry") or {}).get("attr_name") == "obs":
            cols = [fr["data_registry"].get("attr_key")]
        for c in cols:
            if c is not None and str(c) in flat.obs.columns:
                where[str(c)] = mods.get(key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mdata = mudata.MuData(modalities)
        for col, mod in where.items():
            if mod is None:
                mdata.obs[col] = flat.obs[col].values
            else:
                modalities[mod].obs[col] = flat.obs[col].values
        mdata.update()
    return mdata


def _init_param_home(saved: SavedModel, name: str) -> dict:
    """The dict of the normalised ``init_params_`` that holds (or would hold) ``name``: the
    named parameters, or the ``**kwargs`` dict where the saving version passed it."""
    init = saved.attr_dict["init_params_"]
    for d in init["kwargs"].values():
        if isinstance(d, dict) and name in d:
            return d
    return init["non_kwargs"]


def _restore_protein_mask(model, saved: SavedModel, stand_in: bool) -> None:
    """The protein_batch_mask TOTALVI was trained with, from the saved registry.

    ``TOTALVI.load`` recomputes the mask from the data it is given: a stand-in (every protein
    observed) gives none, and an AnnData other than the training data (query cells, a subset,
    one panel) gives another mask or none, which would change every protein likelihood of the
    exported model. The saved registry holds the trained one (none with
    ``override_missing_proteins``); it is restored, with a warning where the data's differed.
    """
    st = saved.registry["field_registries"].get("proteins", {}).get("state_registry") or {}
    # scvi-tools' ProteinObsmField writes the key only where some protein is missing in some
    # batch: no key is no mask (a query AnnData with a protein all zero in one batch would
    # otherwise give the bundle a mask the model never had)
    override = _init_param_home(saved, "override_missing_proteins").get(
        "override_missing_proteins", False
    )
    mask = None if override else st.get("protein_batch_mask")
    if mask is not None:
        items = mask.items() if hasattr(mask, "items") else enumerate(mask)
        mask = {str(k): np.asarray(v, dtype=bool) for k, v in items}
    loaded = model.module.protein_batch_mask
    if _same_mask(loaded, mask):
        return
    model.module.protein_batch_mask = mask
    saved.changes.append("restored protein_batch_mask from the saved registry")
    if not stand_in:
        warnings.warn(
            "the AnnData given to load the model gives another protein panel mask "
            f"(protein_batch_mask: {_mask_text(loaded)}) than the one the model was trained "
            f"with ({_mask_text(mask)}, in its saved registry); the bundle keeps the trained "
            "one. scvi-tools' TOTALVI.load(folder, adata=...) would use the AnnData's",
            UserWarning,
            stacklevel=4,
        )


def _same_mask(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    a = {str(k): np.asarray(v, dtype=bool) for k, v in a.items()}
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _mask_text(mask) -> str:
    if mask is None:
        return "none"
    return ", ".join(f"batch {k}: {int(np.sum(v))} proteins" for k, v in mask.items())


def _detach(model, adata) -> None:
    """Leave ``model`` as scvi-tools leaves a model loaded from its registry alone."""
    manager = model.adata_manager
    if manager is not None:
        uuid = manager.adata_uuid
        type(model)._setup_adata_manager_store.pop(uuid, None)
        type(model)._per_instance_manager_store.get(model.id, {}).pop(uuid, None)
    model._adata = None
    model._adata_manager = None


# ----------------------------------------------------------------------------- loading
def _library_prior_from(cls, adata, registry: dict, state_dict: dict) -> None:
    """Library-size priors that scvi-tools < 0.14 recomputed from the data instead of saving.

    scvi-tools 0.8-0.13 stored each cell's prior (the mean and variance of log library size
    over the cell's batch) in the AnnData; 0.14+ stores the same per-batch numbers as module
    buffers. Recompute them from the training AnnData exactly as scvi-tools does.
    """
    from scvi.model._utils import _init_library_size

    manager = cls._get_most_recent_anndata_manager(adata, required=True)
    n_batch = registry["field_registries"]["batch"]["summary_stats"]["n_batch"]
    means, variances = _init_library_size(manager, n_batch)
    state_dict["library_log_means"] = torch.as_tensor(means).float()
    state_dict["library_log_vars"] = torch.as_tensor(variances).float()


def _is_missing_library(err: BaseException, state_dict: dict) -> bool:
    text = str(err)
    return (
        isinstance(err, RuntimeError)
        and "Missing key(s)" in text
        and "library_log_means" in text
        and "library_log_means" not in state_dict
    )


def _save(saved: SavedModel, folder: Path) -> None:
    torch.save(
        {
            "model_state_dict": saved.state_dict,
            "var_names": saved.var_names,
            "attr_dict": saved.attr_dict,
        },
        folder / MODEL_FILE,
    )


def load_saved_model(
    path: str | os.PathLike,
    adata: Any = None,
    *,
    supported: Collection[str] | None = None,
    model_class: str | None = None,
):
    """Load a model folder saved by any scvi-tools version >= 0.8 with the installed one.

    Parameters
    ----------
    path
        The folder written by ``model.save()`` (``model.pt``, or for scvi-tools < 0.15
        ``model_params.pt`` + ``attr.pkl`` + ``var_names.csv``), with or without
        ``adata.h5ad``. It is read only; conversions happen in a temporary copy.
    adata
        The AnnData to load with (as in ``Model.load``). Default: the folder's ``adata.h5ad``,
        or none (the model is then loaded from its saved registry, as ``Model.load`` does).
    supported
        Model class names to accept (refused before anything is loaded).
    model_class
        The model class, for scvi-tools < 0.15 folders whose weights do not tell it.

    Returns
    -------
    The loaded model, on the CPU, in eval mode.
    """
    saved = read_saved_model(path, model_class=model_class)
    if supported is not None and saved.model_name not in supported:
        raise UnsupportedModelError(
            f"{saved.path} holds a {saved.model_name} model; this exporter handles "
            f"{sorted(supported)}"
        )
    cls = _model_cls(saved.model_name)
    if getattr(cls, "setup_anndata", None) is None:
        raise UnsupportedModelError(f"{saved.model_name} models cannot be loaded from AnnData")
    normalise(saved)
    _normalise_state_dict(cls, saved)

    if adata is None:
        for name in (ADATA_FILE, MDATA_FILE):
            file = saved.path / f"{saved.prefix}{name}"
            if file.is_file():
                if name == MDATA_FILE:
                    import mudata

                    adata = mudata.read_h5mu(file)
                else:
                    import anndata

                    adata = anndata.read_h5ad(file)
                break
    stand_in = adata is None
    if stand_in:
        if saved.registry.get("setup_method_name") == "setup_mudata":
            adata = _stand_in_mudata(saved.registry, saved.var_names)
        else:
            adata = _stand_in_adata(saved.registry, saved.var_names)
        if saved.model_name == "TOTALVI":
            # TOTALVI fits its empirical background prior (a GMM per cell) on the data it is
            # built with: on the stand-in's counts it means nothing, and the saved weights
            # replace it (same shape either way), so it is not fitted
            key = "empirical_protein_background_prior"
            kwargs = _init_param_home(saved, key)
            if kwargs.get(key) is not False:
                kwargs[key] = False
                saved.changes.append(f"stand-in: {key}=False")

    if saved.changes:
        logger.info(
            "%s (saved by scvi-tools %s): %s",
            saved.path,
            saved.scvi_version,
            "; ".join(saved.changes),
        )
    tmp = Path(tempfile.mkdtemp(prefix="scvi_onnx_load_"))
    try:
        for attempt in range(2):
            _save(saved, tmp)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = cls.load(str(tmp), adata=adata, accelerator="cpu")
                break
            except Exception as e:
                if attempt == 0 and _is_missing_library(e, saved.state_dict):
                    if stand_in:
                        raise UnsupportedModelError(
                            f"{saved.path} (scvi-tools {saved.scvi_version}) has a learned "
                            "library size whose prior scvi-tools < 0.14 did not save (it "
                            "recomputed it from the training data): pass the training AnnData "
                            "(adata=...) to rebuild it"
                        ) from e
                    _library_prior_from(cls, adata, saved.registry, saved.state_dict)
                    saved.changes.append("recomputed library_log_means/vars from the AnnData")
                    continue
                raise UnsupportedModelError(
                    f"scvi-tools could not load {saved.path} as {saved.model_name} (saved by "
                    f"scvi-tools {saved.scvi_version}"
                    + (f"; converted: {'; '.join(saved.changes)}" if saved.changes else "")
                    + f"): {type(e).__name__}: {e}"
                ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if saved.model_name == "TOTALVI":
        _restore_protein_mask(model, saved, stand_in)
    if stand_in:
        _detach(model, adata)
    if saved.scvi_version != "unknown":
        # the version that trained the weights, not the installed one that loaded them (as
        # TOTALVAE.on_load keeps it for folders saved before 1.2): what the export reproduces
        model.registry_["scvi_version"] = saved.scvi_version
    model.module.eval()
    return model
