"""Model folders saved by older scvi-tools versions: loaded, exported and compared, or refused.

Real folders are saved with the installed scvi-tools, then rewritten field by field the way older
versions wrote them (see each ``as_*`` helper for which version and which fields). Each variant
is exported from its folder and compared with the unmodified folder: the latent mean against
scvi-tools' own, the per-cell ELBO (same seed) against the bundle of the unmodified folder.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from ..conftest import require

torch = require("torch")
scvi = require("scvi")
require("onnx")

import scvi_onnx  # noqa: E402
from scvi_onnx import bundle as B  # noqa: E402
from scvi_onnx.errors import UnsupportedModelError  # noqa: E402
from scvi_onnx.exporter import SUPPORTED_MODELS, export_model  # noqa: E402
from scvi_onnx.exporter.legacy import load_saved_model  # noqa: E402
from scvi_onnx.exporter.parity import QUIET_TRAINING  # noqa: E402

TRAIN = dict(max_epochs=1, **QUIET_TRAINING)


def _save(cls, adata, folder: Path, setup: dict, **kw) -> Path:
    adata = adata.copy()
    cls.setup_anndata(adata, **setup)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(adata, n_hidden=16, n_latent=4, **kw)
        model.train(**TRAIN)
    model.save(str(folder), save_anndata=True)
    return folder


@pytest.fixture(scope="module")
def data(pbmc_small):
    a = pbmc_small[:, :100].copy()
    a.obs["cell_type"] = np.where(np.arange(a.n_obs) % 5 == 0, "unknown", a.obs["cell_type"])
    return a


@pytest.fixture(scope="module")
def folders(data, tmp_path_factory):
    """Folders saved by the installed scvi-tools (1.4.2 layout, with adata.h5ad)."""
    root = tmp_path_factory.mktemp("saved")
    return {
        # learned library size, batch, one categorical and one continuous covariate
        "scvi": _save(
            scvi.model.SCVI,
            data,
            root / "scvi",
            {
                "batch_key": "batch",
                "categorical_covariate_keys": ["donor"],
                "continuous_covariate_keys": ["pct"],
            },
            use_observed_lib_size=False,
        ),
        # observed library size, batch only: what scvi-tools 0.8 could train
        "scvi_obs": _save(scvi.model.SCVI, data, root / "scvi_obs", {"batch_key": "batch"}),
        "linear": _save(scvi.model.LinearSCVI, data, root / "linear", {"batch_key": "batch"}),
        "scanvi": _save(
            scvi.model.SCANVI,
            data,
            root / "scanvi",
            {"batch_key": "batch", "labels_key": "cell_type", "unlabeled_category": "unknown"},
        ),
    }


def _reference(cls, folder: Path, data):
    """scvi-tools' own model, loaded from the unmodified folder with the training AnnData."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.load(str(folder), adata=data.copy(), accelerator="cpu")


@pytest.fixture(scope="module")
def scvi_ref(folders, data, tmp_path_factory):
    model = _reference(scvi.model.SCVI, folders["scvi"], data)
    bundle = export_model(folders["scvi"], tmp_path_factory.mktemp("b") / "b0")
    om = scvi_onnx.load(bundle, device="cpu")
    return {
        "latent": model.get_latent_representation(data.copy()),
        "elbo": om.get_elbo(data, return_mean=False, seed=3),
        "manifest": json.loads((bundle / B.MANIFEST_FILE).read_text()),
        "arrays": dict(np.load(bundle / B.ARRAYS_FILE)),
    }


# ----------------------------------------------------------------------------- old layouts
def _load_pt(folder: Path) -> dict:
    return torch.load(folder / "model.pt", map_location="cpu", weights_only=False)


def _write_pt(saved: dict, src: Path, dst: Path, adata: bool) -> Path:
    dst.mkdir()
    torch.save(saved, dst / "model.pt")
    if adata:
        shutil.copy(src / "adata.h5ad", dst / "adata.h5ad")
    return dst


def _strip_new_attrs(attr: dict) -> None:
    """Attributes scvi-tools 1.x added to the saved attr_dict."""
    for k in ("run_name_", "run_id_", "get_normalized_function_name_"):
        attr.pop(k, None)
    attr["init_params_"]["non_kwargs"].pop("datamodule", None)


def as_1_3(saved: dict) -> None:
    """scvi-tools 1.3: pyro's global parameter store saved with every model, here non-empty
    (a pyro model trained earlier in the same session leaves its parameters there)."""
    from pyro.distributions import constraints

    saved["attr_dict"]["registry_"]["scvi_version"] = "1.3.3"
    saved["model_state_dict"]["pyro_param_store"] = {
        "params": {"AutoNormal.locs.z": torch.zeros(3)},
        "constraints": {"AutoNormal.locs.z": constraints.real},
    }


def as_1_2(saved: dict) -> None:
    """scvi-tools 1.0-1.2: no pyro_param_store, no datamodule init parameter."""
    saved["attr_dict"]["registry_"]["scvi_version"] = "1.2.2"
    saved["model_state_dict"].pop("pyro_param_store")
    _strip_new_attrs(saved["attr_dict"])


def as_0_16(saved: dict) -> None:
    """scvi-tools 0.15-0.16: registry without setup_method_name, X state registry of
    {n_cells, n_vars} (no column_names, no n_obs), use_observed_lib_size passed through
    **model_kwargs (SCVI.__init__ had no such parameter), no pyro_param_store."""
    attr = saved["attr_dict"]
    reg = attr["registry_"]
    reg["scvi_version"] = "0.16.4"
    reg.pop("setup_method_name")
    x = reg["field_registries"]["X"]
    n_vars, n_obs = x["state_registry"]["n_vars"], x["state_registry"]["n_obs"]
    x["state_registry"] = {"n_cells": n_obs, "n_vars": n_vars}
    x["summary_stats"] = {"n_cells": n_obs, "n_vars": n_vars}
    saved["model_state_dict"].pop("pyro_param_store")
    _strip_new_attrs(attr)
    init = attr["init_params_"]
    kwargs = {k: v for d in init["kwargs"].values() for k, v in d.items()}
    if "use_observed_lib_size" in init["non_kwargs"]:
        kwargs["use_observed_lib_size"] = init["non_kwargs"].pop("use_observed_lib_size")
    init["kwargs"] = {"model_kwargs": kwargs}  # SCVI(adata, ..., **model_kwargs) in 0.x


def as_converted_0_8(saved: dict) -> None:
    """A scvi-tools 0.8 folder after ``convert_legacy_save``: flat ``init_params_`` with
    ``use_cuda`` (scvi-tools 1.4 loads this form only because it pops ``use_cuda``)."""
    as_0_16(saved)
    init = saved["attr_dict"]["init_params_"]
    saved["attr_dict"]["init_params_"] = {**init["non_kwargs"], "use_cuda": True, **init["kwargs"]}


def as_flat_without_use_cuda(saved: dict) -> None:
    """Flat ``init_params_`` without ``use_cuda`` (scvi-tools 1.4's own load: KeyError)."""
    as_converted_0_8(saved)
    del saved["attr_dict"]["init_params_"]["use_cuda"]


def _setup_dict(registry: dict, version: str, local_l: bool) -> dict:
    """The ``adata.uns["_scvi"]`` dictionary scvi-tools < 0.15 saved as ``scvi_setup_dict_``."""
    fr = registry["field_registries"]
    x = fr["X"]["data_registry"]
    dr = {
        "X": {"attr_name": x["attr_name"], "attr_key": x["attr_key"]},
        "batch_indices": {"attr_name": "obs", "attr_key": "_scvi_batch"},
        "labels": {"attr_name": "obs", "attr_key": "_scvi_labels"},
    }
    if local_l:  # scvi-tools <= 0.13: the per-cell library-size prior lived in the AnnData
        dr["local_l_mean"] = {"attr_name": "obs", "attr_key": "_scvi_local_l_mean"}
        dr["local_l_var"] = {"attr_name": "obs", "attr_key": "_scvi_local_l_var"}
    args = registry["setup_args"]
    mappings = {
        f"_scvi_{k}": {
            "original_key": args.get(f"{k}_key") or f"_scvi_{k}",
            "mapping": np.asarray(fr[k]["state_registry"]["categorical_mapping"]),
        }
        for k in ("batch", "labels")
    }
    out = {
        "scvi_version": version,
        "data_registry": dr,
        "categorical_mappings": mappings,
        "summary_stats": {
            "n_batch": len(mappings["_scvi_batch"]["mapping"]),
            "n_cells": fr["X"]["summary_stats"]["n_cells"],
            "n_vars": fr["X"]["summary_stats"]["n_vars"],
            "n_labels": len(mappings["_scvi_labels"]["mapping"]),
            "n_proteins": 0,
            "n_continuous_covs": 0,
        },
    }
    cat = fr["extra_categorical_covs"]["state_registry"]
    if cat:
        dr["cat_covs"] = {"attr_name": "obsm", "attr_key": "_scvi_extra_categoricals"}
        out["extra_categoricals"] = {
            "mappings": {k: np.asarray(v) for k, v in cat["mappings"].items()},
            "keys": list(cat["field_keys"]),
            "n_cats_per_key": list(cat["n_cats_per_key"]),
        }
    cont = fr["extra_continuous_covs"]["state_registry"]
    if cont:
        dr["cont_covs"] = {"attr_name": "obsm", "attr_key": "_scvi_extra_continuous"}
        out["extra_continuous_keys"] = np.asarray(cont["columns"])
        out["summary_stats"]["n_continuous_covs"] = len(cont["columns"])
    return out


def as_pre_0_15(src: Path, dst: Path, version: str, adata: bool) -> Path:
    """scvi-tools < 0.15: model_params.pt (state dict), attr.pkl (attributes with
    ``scvi_setup_dict_`` instead of ``registry_``), var_names.csv (one gene per line).
    0.9-0.14 split ``init_params_`` into non_kwargs/kwargs; 0.8 wrote it flat with ``use_cuda``;
    before 0.14 there were no library-size buffers (the prior lived in the AnnData)."""
    saved = _load_pt(src)
    as_0_16(saved)
    attr = saved["attr_dict"]
    registry = attr.pop("registry_")
    old = tuple(int(p) for p in version.split(".")[:2])
    attr["scvi_setup_dict_"] = _setup_dict(registry, version, local_l=old < (0, 14))
    if old < (0, 9):
        attr["scvi_setup_dict_"]["data_registry"]["X"]["attr_key"] = "None"  # as 0.8.1 wrote it
        init = attr["init_params_"]
        attr["init_params_"] = {**init["non_kwargs"], "use_cuda": True, **init["kwargs"]}
    state = saved["model_state_dict"]
    if old < (0, 14):
        state.pop("library_log_means", None)
        state.pop("library_log_vars", None)
    dst.mkdir()
    torch.save(state, dst / "model_params.pt")
    with open(dst / "attr.pkl", "wb") as f:
        pickle.dump(attr, f)
    np.savetxt(dst / "var_names.csv", np.asarray(saved["var_names"]).astype(str), fmt="%s")
    if adata:
        shutil.copy(src / "adata.h5ad", dst / "adata.h5ad")
    return dst


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _check_bundle(bundle: Path, ref: dict, data) -> None:
    man = json.loads((bundle / B.MANIFEST_FILE).read_text())
    assert man["config"] == ref["manifest"]["config"]
    assert man["registry"] == ref["manifest"]["registry"]
    assert man["genes"] == ref["manifest"]["genes"]
    arrays = dict(np.load(bundle / B.ARRAYS_FILE))
    assert sorted(arrays) == sorted(ref["arrays"])
    for k, v in arrays.items():
        np.testing.assert_array_equal(v, ref["arrays"][k], err_msg=k)
    assert scvi_onnx.verify(bundle).ok
    om = scvi_onnx.load(bundle, device="cpu")
    np.testing.assert_allclose(om.get_latent_representation(data), ref["latent"], atol=1e-4)
    elbo = om.get_elbo(data, return_mean=False, seed=3)
    np.testing.assert_allclose(elbo, ref["elbo"], rtol=1e-5, atol=1e-3)


# ----------------------------------------------------------------------------- SCVI exports
PT_VARIANTS = {
    "1.4.2": None,
    "1.3 with pyro_param_store": as_1_3,
    "1.0-1.2 without pyro_param_store": as_1_2,
    "0.15-0.16 registry": as_0_16,
    "0.8 after convert_legacy_save": as_converted_0_8,
    "flat init_params_ without use_cuda": as_flat_without_use_cuda,
}


@pytest.mark.parametrize(
    "variant, adata_file",
    [(v, False) for v in PT_VARIANTS] + [("1.4.2", True), ("0.15-0.16 registry", True)],
    ids=[f"{v}-no-adata" for v in PT_VARIANTS] + ["1.4.2-adata.h5ad", "0.15-0.16-adata.h5ad"],
)
def test_model_pt_variants_export(variant, adata_file, folders, scvi_ref, data, tmp_path):
    saved = _load_pt(folders["scvi"])
    if PT_VARIANTS[variant] is not None:
        PT_VARIANTS[variant](saved)
    folder = _write_pt(saved, folders["scvi"], tmp_path / "f", adata=adata_file)
    before = _digest(folder)
    bundle = export_model(folder, tmp_path / "b")
    assert _digest(folder) == before  # the user's folder is read only
    _check_bundle(bundle, scvi_ref, data)


@pytest.mark.parametrize("adata_file", [False, True], ids=["no-adata", "adata.h5ad"])
def test_pre_0_15_layout_export(adata_file, folders, scvi_ref, data, tmp_path):
    folder = as_pre_0_15(folders["scvi"], tmp_path / "f", "0.14.6", adata=adata_file)
    before = _digest(folder)
    bundle = export_model(folder, tmp_path / "b")
    assert _digest(folder) == before
    assert not (folder / "model.pt").exists()
    _check_bundle(bundle, scvi_ref, data)


@pytest.mark.parametrize("adata", [False, True], ids=["no-adata", "adata"])
def test_convert_legacy_save_output_export(adata, folders, scvi_ref, data, tmp_path):
    """scvi-tools' own convert_legacy_save reads the mimicked < 0.15 folder. scvi-tools 1.4.2
    cannot load its output (no setup_args["size_factor_key"] without an AnnData; with one, the
    labels_key "_scvi_labels" it carries over is looked up in the AnnData); the exporter can."""
    old = as_pre_0_15(folders["scvi"], tmp_path / "old", "0.14.6", adata=False)
    new = tmp_path / "new"
    scvi.model.SCVI.convert_legacy_save(str(old), str(new))
    with pytest.raises(KeyError), warnings.catch_warnings():  # scvi-tools' own load
        warnings.simplefilter("ignore")
        scvi.model.SCVI.load(str(new), adata=data.copy() if adata else None, accelerator="cpu")
    bundle = export_model(new, tmp_path / "b", adata=data.copy() if adata else None)
    _check_bundle(bundle, scvi_ref, data)


def test_pre_0_14_library_prior_rebuilt_from_adata(folders, scvi_ref, data, tmp_path):
    folder = as_pre_0_15(folders["scvi"], tmp_path / "f", "0.13.0", adata=False)
    with pytest.raises(UnsupportedModelError, match="library size.*adata="):
        export_model(folder, tmp_path / "b")
    bundle = export_model(folder, tmp_path / "b", adata=data.copy())
    _check_bundle(bundle, scvi_ref, data)


def test_0_8_layout_export(folders, data, tmp_path):
    ref = _reference(scvi.model.SCVI, folders["scvi_obs"], data)
    folder = as_pre_0_15(folders["scvi_obs"], tmp_path / "f", "0.8.1", adata=False)
    attr = pickle.loads((folder / "attr.pkl").read_bytes())
    assert "use_cuda" in attr["init_params_"] and "non_kwargs" not in attr["init_params_"]
    bundle = export_model(folder, tmp_path / "b")
    assert scvi_onnx.verify(bundle).ok
    om = scvi_onnx.load(bundle, device="cpu")
    np.testing.assert_allclose(
        om.get_latent_representation(data), ref.get_latent_representation(data.copy()), atol=1e-4
    )


# ----------------------------------------------------------------------------- other classes
def test_linear_scvi_without_adata(folders, data, tmp_path):
    """scvi-tools 1.4 cannot build a LinearSCVI without AnnData; the loader can."""
    ref = _reference(scvi.model.LinearSCVI, folders["linear"], data)
    saved = _load_pt(folders["linear"])
    as_0_16(saved)
    folder = _write_pt(saved, folders["linear"], tmp_path / "f", adata=False)
    model = load_saved_model(folder)
    assert type(model).__name__ == "LinearSCVI" and model.adata is None
    for k, v in ref.module.state_dict().items():
        assert torch.equal(model.module.state_dict()[k], v), k
    if "LinearSCVI" in SUPPORTED_MODELS:
        bundle = export_model(folder, tmp_path / "b")
        assert scvi_onnx.verify(bundle).ok
        om = scvi_onnx.load(bundle, device="cpu")
        np.testing.assert_allclose(
            om.get_latent_representation(data),
            ref.get_latent_representation(data.copy()),
            atol=1e-4,
        )


@pytest.mark.parametrize("version", ["1.0.4", "0.14.6"])
def test_scanvi_pre_1_1_classifier(version, folders, data, tmp_path):
    """Before 1.1 the SCANVI classifier ended with a Softmax (probabilities); scvi-tools 1.4's
    on_load restores that (it needs the AnnData manager, which the stand-in provides)."""
    ref = _reference(scvi.model.SCANVI, folders["scanvi"], data)
    assert ref.module.classifier.logits
    if version == "0.14.6":
        folder = as_pre_0_15(folders["scanvi"], tmp_path / "f", version, adata=False)
    else:
        saved = _load_pt(folders["scanvi"])
        as_1_2(saved)
        saved["attr_dict"]["registry_"]["scvi_version"] = version
        folder = _write_pt(saved, folders["scanvi"], tmp_path / "f", adata=False)
    model = load_saved_model(folder)
    assert model.adata is None
    assert model.module.classifier.logits is False
    assert isinstance(model.module.classifier.classifier[-1], torch.nn.Softmax)
    mapping = model.registry_["field_registries"]["labels"]["state_registry"]
    assert list(mapping["categorical_mapping"])[-1] == "unknown"
    z = torch.as_tensor(ref.get_latent_representation(data.copy()))
    with torch.no_grad():
        want = torch.softmax(ref.module.classifier(z), -1)
        got = model.module.classifier(z)
    torch.testing.assert_close(got, want)
    if "SCANVI" in SUPPORTED_MODELS:
        bundle = export_model(folder, tmp_path / "b")
        assert scvi_onnx.verify(bundle).ok
        om = scvi_onnx.load(bundle, device="cpu")
        np.testing.assert_allclose(om.get_latent_representation(data), z.numpy(), atol=1e-4)


# ----------------------------------------------------------------------------- refusals
def test_pre_0_15_unknown_class_refused(folders, tmp_path):
    folder = as_pre_0_15(folders["scvi_obs"], tmp_path / "f", "0.14.6", adata=False)
    state = torch.load(folder / "model_params.pt", weights_only=False)
    state["background_pro_alpha"] = torch.zeros(3)  # TOTALVI's
    torch.save(state, folder / "model_params.pt")
    with pytest.raises(UnsupportedModelError, match="convert_legacy_save"):
        export_model(folder, tmp_path / "b")


def test_unsupported_setups_refused(folders, tmp_path):
    saved = _load_pt(folders["scvi_obs"])
    saved["attr_dict"]["registry_"]["setup_method_name"] = "setup_mudata"
    folder = _write_pt(saved, folders["scvi_obs"], tmp_path / "mudata", adata=False)
    with pytest.raises(UnsupportedModelError, match="setup_mudata"):
        export_model(folder, tmp_path / "b")

    saved = _load_pt(folders["scvi_obs"])
    saved["attr_dict"]["registry_"]["setup_args"]["new_option"] = "x"
    folder = _write_pt(saved, folders["scvi_obs"], tmp_path / "arg", adata=False)
    with pytest.raises(UnsupportedModelError, match="new_option"):
        export_model(folder, tmp_path / "b")

    saved = _load_pt(folders["scvi_obs"])
    saved["model_state_dict"]["decoder.extra.weight"] = torch.zeros(2)
    folder = _write_pt(saved, folders["scvi_obs"], tmp_path / "keys", adata=False)
    with pytest.raises(UnsupportedModelError, match="decoder.extra.weight"):
        export_model(folder, tmp_path / "b")

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "attr.pkl").write_bytes(b"")
    with pytest.raises(UnsupportedModelError, match="model.pt.*model_params.pt"):
        export_model(tmp_path / "empty", tmp_path / "b")
