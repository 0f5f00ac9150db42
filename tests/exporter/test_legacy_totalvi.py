"""TOTALVI folders saved by older scvi-tools versions (and on a GPU): loaded, exported, compared.

A TOTALVI is saved by the installed scvi-tools (1.4.2 layout), then rewritten the way older
versions wrote it (the ``as_*`` helpers of ``test_legacy.py``, plus what TOTALVI adds): no
``log_per_batch_efficiency`` before it existed, the pre-1.2 background activation (``exp``,
which scvi-tools' own ``TOTALVAE.on_load`` restores for folders saved before 1.2), the
scvi-tools < 0.15 setup dictionary with ``protein_names`` and ``totalvi_batch_mask``. Each
variant's bundle is compared with what scvi-tools computes for the same weights: the original
model with the activation and efficiency the old version had.

These weights were trained by 1.4.2, whose encoder scales its input (since 1.3.1): the layouts
are exported with ``reproduce="installed"`` and compared with 1.4.2's computation. What the
default export does for models that older versions trained is checked on folders those
versions wrote themselves (``test_old_versions.py``).
"""

from __future__ import annotations

import io
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
from scvi_onnx.errors import UnsupportedModelError  # noqa: E402
from scvi_onnx.exporter import export_model  # noqa: E402
from scvi_onnx.exporter.legacy import load_saved_model  # noqa: E402

from ..parity.test_totalvi import TRAIN, same_noise  # noqa: E402
from .test_legacy import _digest, _load_pt, _setup_dict, _write_pt, as_0_16, as_1_2, as_1_3  # noqa: E402

MODEL = dict(n_hidden=16, n_latent=4)


@pytest.fixture(scope="module")
def cite_data():
    import anndata as ad

    from ..conftest import MODELS

    a = ad.read_h5ad(MODELS / "example" / "pbmc_cite.h5ad")[:, :100].copy()
    a.layers["counts"] = a.X.copy()
    return a


def _train(adata, mudata: bool = False):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if mudata:
            scvi.model.TOTALVI.setup_mudata(
                adata,
                rna_layer="counts",
                batch_key="batch",
                modalities={"rna_layer": "rna", "protein_layer": "prot", "batch_key": "rna"},
            )
        else:
            scvi.model.TOTALVI.setup_anndata(
                adata, protein_expression_obsm_key="protein_expression", batch_key="batch"
            )
        scvi.settings.seed = 0
        model = scvi.model.TOTALVI(adata, **MODEL)
        model.train(max_epochs=1, **TRAIN)
    return model


@pytest.fixture(scope="module")
def saved(cite_data, tmp_path_factory):
    """A 1.4.2 folder (with its protein_batch_mask: 15 antibodies missing in pbmc_10k)."""
    folder = tmp_path_factory.mktemp("totalvi") / "orig"
    model = _train(cite_data.copy())
    assert model.module.protein_batch_mask is not None
    model.save(str(folder), save_anndata=True)
    return folder


_REFERENCES: dict = {}


def _reference(folder: Path, data, *, exp: bool = False, zero_efficiency: bool = False):
    """scvi-tools' model from the unmodified folder, as an older version computed it (one load
    per kind: TOTALVI fits its empirical prior on every load)."""
    key = (str(folder), exp, zero_efficiency)
    if key not in _REFERENCES:
        _REFERENCES[key] = _load_reference(folder, data, exp, zero_efficiency)
    return _REFERENCES[key]


def _load_reference(folder: Path, data, exp: bool, zero_efficiency: bool):
    from scvi.nn._utils import ExpActivation

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = scvi.model.TOTALVI.load(str(folder), adata=data.copy(), accelerator="cpu")
    if exp:
        model.module.decoder.activation_function_bg = ExpActivation()
    if zero_efficiency:
        with torch.no_grad():
            model.module.log_per_batch_efficiency.zero_()
    return model


def _compare(bundle: Path, ref, data) -> None:
    """Latent, and per-cell ELBO and reconstruction under the same noise, against ``ref``."""
    assert scvi_onnx.verify(bundle).ok
    om = scvi_onnx.load(bundle, device="cpu", seed=7)
    np.testing.assert_allclose(
        om.get_latent_representation(data), ref.get_latent_representation(data.copy()), atol=1e-4
    )
    n = data.n_obs
    with same_noise(ref, om, np.arange(n), 1):
        want = ref.get_elbo(data.copy(), batch_size=n, return_mean=False).numpy()
    np.testing.assert_allclose(om.get_elbo(data, return_mean=False), want, rtol=2e-5, atol=2e-3)


def as_1_1(saved: dict) -> None:
    """scvi-tools 1.0-1.1: as 1.2, saved before the background activation became softplus."""
    as_1_2(saved)
    saved["attr_dict"]["registry_"]["scvi_version"] = "1.1.6"


def as_without_efficiency(saved: dict) -> None:
    """A 1.x folder from before ``log_per_batch_efficiency`` (scvi-tools 1.4's load fails)."""
    as_1_1(saved)
    saved["model_state_dict"].pop("log_per_batch_efficiency")


PT_VARIANTS = {
    # variant: (rewrite, exp activation, efficiency zeroed)
    "1.4.2": (None, False, False),
    "1.3 with pyro_param_store": (as_1_3, False, False),
    "1.2": (as_1_2, False, False),
    "1.1 exp background": (as_1_1, True, False),
    "1.1 without log_per_batch_efficiency": (as_without_efficiency, True, True),
    "0.16 registry": (as_0_16, True, False),
}


def test_default_export_reproduces_the_saving_version(saved, tmp_path):
    """By default a folder that scvi-tools < 1.3.1 saved exports with that version's encoder
    input (the counts, not scaled by their mean); 1.3.1 and later scale."""
    for version, scaled in (("1.3.0", False), ("1.3.1", True), ("1.2.2", False)):
        content = _load_pt(saved)
        content["attr_dict"]["registry_"]["scvi_version"] = version
        folder = _write_pt(content, saved, tmp_path / version, adata=False)
        om = scvi_onnx.load(export_model(folder, tmp_path / f"b{version}"), device="cpu")
        assert om.config.encoder_input_scaling is scaled, version
        assert om.manifest.extra["provenance"]["trained_with"] == f"scvi-tools {version}"


@pytest.mark.parametrize("variant", list(PT_VARIANTS))
def test_model_pt_variants(variant, saved, cite_data, tmp_path):
    rewrite, exp, zero = PT_VARIANTS[variant]
    content = _load_pt(saved)
    if rewrite is not None:
        rewrite(content)
    folder = _write_pt(content, saved, tmp_path / "f", adata=False)
    before = _digest(folder)
    bundle = export_model(folder, tmp_path / "b", reproduce="installed")
    assert _digest(folder) == before
    # the mask the model was trained with, though the stand-in data has no missing protein
    assert scvi_onnx.load(bundle, device="cpu").config.protein_batch_mask
    _compare(bundle, _reference(saved, cite_data, exp=exp, zero_efficiency=zero), cite_data)


def test_mask_of_the_trained_model_whatever_the_adata(saved, cite_data, tmp_path):
    """An AnnData given at export whose proteins are all observed (query cells, another
    panel): TOTALVI.load computes no mask from it, which would change every protein
    likelihood of pbmc_10k's cells. The bundle keeps the trained mask (saved registry), with
    a warning, and gives the trained model's numbers."""
    other = cite_data.copy()
    prot = other.obsm["protein_expression"].copy()
    prot[prot == 0] = 1.0  # nothing missing anywhere: no mask from these cells
    other.obsm["protein_expression"] = prot
    with pytest.warns(UserWarning, match="another protein panel mask.*keeps the trained one"):
        bundle = export_model(saved, tmp_path / "b", adata=other)
    om = scvi_onnx.load(bundle, device="cpu")
    assert om.config.protein_batch_mask
    stand_in = scvi_onnx.load(export_model(saved, tmp_path / "s"), device="cpu")
    np.testing.assert_array_equal(om.module._mask, stand_in.module._mask)
    _compare(bundle, _reference(saved, cite_data), cite_data)
    # the training data itself: the same mask, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        export_model(saved, tmp_path / "t", adata=cite_data.copy())


def test_no_mask_stays_no_mask_whatever_the_adata(cite_data, tmp_path):
    """A TOTALVI trained with every protein observed in every batch has no mask (its registry
    has no protein_batch_mask key); query cells with a protein all zero in one batch would
    give TOTALVI.load a mask the model never had: the export keeps none, with a warning."""
    full = cite_data.copy()
    prot = full.obsm["protein_expression"].copy()
    prot[prot == 0] = 1.0
    full.obsm["protein_expression"] = prot
    model = _train(full.copy())
    assert model.module.protein_batch_mask is None
    folder = tmp_path / "orig"
    model.save(str(folder), save_anndata=False)
    query = full.copy()
    q = query.obsm["protein_expression"].copy()
    q.loc[(query.obs["batch"] == "pbmc_10k").to_numpy(), q.columns[0]] = 0.0
    query.obsm["protein_expression"] = q
    with pytest.warns(UserWarning, match=r"another protein panel mask \(protein_batch_mask: batch"):
        bundle = export_model(folder, tmp_path / "b", adata=query)
    assert not scvi_onnx.load(bundle, device="cpu").config.protein_batch_mask


def test_without_efficiency_scvi_tools_own_load_fails(saved, cite_data, tmp_path):
    content = _load_pt(saved)
    as_without_efficiency(content)
    folder = _write_pt(content, saved, tmp_path / "f", adata=True)
    with pytest.raises(RuntimeError, match="log_per_batch_efficiency"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scvi.model.TOTALVI.load(str(folder), accelerator="cpu")
    model = load_saved_model(folder)
    assert torch.count_nonzero(model.module.log_per_batch_efficiency) == 0
    assert type(model.module.decoder.activation_function_bg).__name__ == "ExpActivation"


def as_pre_0_15_totalvi(src: Path, dst: Path, version: str) -> Path:
    """scvi-tools < 0.15: model_params.pt, attr.pkl with scvi_setup_dict_ (TOTALVI's: the
    obsm key, ``protein_names``, ``totalvi_batch_mask``), var_names.csv; no
    log_per_batch_efficiency; the exp background activation."""
    content = _load_pt(src)
    as_0_16(content)
    attr = content["attr_dict"]
    registry = attr.pop("registry_")
    fr = registry["field_registries"]
    fr["labels"]["state_registry"]["categorical_mapping"] = np.zeros(1, dtype=np.int64)
    setup = _setup_dict(registry, version, local_l=False)
    st = fr["proteins"]["state_registry"]
    setup["data_registry"]["protein_expression"] = {
        "attr_name": "obsm",
        "attr_key": "protein_expression",
    }
    setup["protein_names"] = np.asarray(st["column_names"])
    setup["totalvi_batch_mask"] = dict(st["protein_batch_mask"])
    setup["summary_stats"]["n_proteins"] = len(st["column_names"])
    attr["scvi_setup_dict_"] = setup
    state = content["model_state_dict"]
    state.pop("log_per_batch_efficiency")
    dst.mkdir()
    torch.save(state, dst / "model_params.pt")
    with open(dst / "attr.pkl", "wb") as f:
        pickle.dump(attr, f)
    np.savetxt(dst / "var_names.csv", np.asarray(content["var_names"]).astype(str), fmt="%s")
    return dst


def test_pre_0_15_layout(saved, cite_data, tmp_path):
    folder = as_pre_0_15_totalvi(saved, tmp_path / "f", "0.14.6")
    before = _digest(folder)
    # the class is inferred from the weights
    bundle = export_model(folder, tmp_path / "b", reproduce="installed")
    assert _digest(folder) == before
    om = scvi_onnx.load(bundle, device="cpu")
    assert om.manifest.model_class == "TOTALVI" and om.config.protein_batch_mask
    assert om.manifest.registry.proteins.names_uns_key == "_protein_names"
    assert om.manifest.config["activation_function_bg"] == "exp"
    _compare(bundle, _reference(saved, cite_data, exp=True, zero_efficiency=True), cite_data)


def test_saved_on_a_gpu_exported_on_a_cpu(saved, cite_data, tmp_path, monkeypatch):
    """A folder written on a CUDA machine: its tensors are tagged 'cuda:0' in model.pt.

    No CUDA here, so the folder is written with torch.save's storage location tag forced to
    'cuda:0' (the bytes torch writes for CUDA tensors, but CPU data): loading it without
    map_location fails on this machine as a real GPU folder does; the exporter maps it to
    the CPU."""
    import torch.serialization as ts

    content = _load_pt(saved)
    folder = tmp_path / "gpu"
    folder.mkdir()
    with monkeypatch.context() as mp:
        mp.setattr(ts, "location_tag", lambda storage: "cuda:0")
        torch.save(content, folder / "model.pt")
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(folder / "model.pt", weights_only=False)
    buf = io.BytesIO((folder / "model.pt").read_bytes())
    assert b"cuda:0" in buf.getvalue()
    bundle = export_model(folder, tmp_path / "b")
    _compare(bundle, _reference(saved, cite_data), cite_data)


# ----------------------------------------------------------------------------- MuData folders
@pytest.fixture(scope="module")
def mudata_saved(cite_data, tmp_path_factory):
    md = require("mudata")
    import anndata as ad

    prot = ad.AnnData(cite_data.obsm["protein_expression"].to_numpy(), obs=cite_data.obs[[]].copy())
    prot.var_names = list(cite_data.obsm["protein_expression"].columns)
    rna = cite_data.copy()
    del rna.obsm["protein_expression"]
    mdata = md.MuData({"rna": rna, "prot": prot})
    model = _train(mdata, mudata=True)
    folder = tmp_path_factory.mktemp("totalvi_mu") / "orig"
    model.save(str(folder), save_anndata=True)
    return folder, mdata


@pytest.mark.parametrize("with_mdata", [True, False], ids=["mdata.h5mu", "no-mdata"])
def test_mudata_folder(with_mdata, mudata_saved, tmp_path):
    folder, mdata = mudata_saved
    if not with_mdata:
        content = _load_pt(folder)
        assert isinstance(content["var_names"], dict)
        folder = _write_pt(content, folder, tmp_path / "f", adata=False)
    bundle = export_model(folder, tmp_path / "b")
    om = scvi_onnx.load(bundle, device="cpu", seed=7)
    assert om.manifest.registry.modalities["proteins"] == "prot"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = scvi.model.TOTALVI.load(str(mudata_saved[0]), adata=mdata, accelerator="cpu")
    np.testing.assert_allclose(
        om.get_latent_representation(mdata), ref.get_latent_representation(mdata), atol=1e-4
    )
    n = mdata.n_obs
    with same_noise(ref, om, np.arange(n), 1):
        want = ref.get_elbo(mdata, batch_size=n, return_mean=False).numpy()
    np.testing.assert_allclose(om.get_elbo(mdata, return_mean=False), want, rtol=2e-5, atol=2e-3)


def test_mudata_scvi_folder_still_refused(tmp_path, saved):
    """setup_mudata exports for TOTALVI only (the classes whose runtime reads modalities)."""
    content = _load_pt(saved)
    content["attr_dict"]["registry_"]["model_name"] = "SCVI"
    content["attr_dict"]["registry_"]["setup_method_name"] = "setup_mudata"
    folder = _write_pt(content, saved, tmp_path / "f", adata=False)
    with pytest.raises(UnsupportedModelError, match="setup_mudata"):
        export_model(folder, tmp_path / "b")
    shutil.rmtree(folder)
