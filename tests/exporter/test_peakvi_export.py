"""PEAKVI export: activations beyond ReLU, refusals, and folders saved by older scvi-tools
versions (rewritten field by field as in test_legacy.py)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from ..conftest import require

torch = require("torch")
scvi = require("scvi")
require("onnx")

import scvi_onnx  # noqa: E402
from scvi_onnx import bundle as B  # noqa: E402
from scvi_onnx.errors import DegeneratePosteriorError, UnsupportedModelError  # noqa: E402
from scvi_onnx.exporter import SUPPORTED_MODELS, export_model  # noqa: E402
from scvi_onnx.exporter.graphs.layers import ACTIVATIONS  # noqa: E402
from scvi_onnx.exporter.legacy import load_saved_model  # noqa: E402

from ..peaks import peaks  # noqa: E402
from .test_legacy import (  # noqa: E402
    TRAIN,
    _digest,
    _load_pt,
    _write_pt,
    as_0_16,
    as_1_2,
    as_1_3,
    as_pre_0_15,
)


def _peakvi(adata, setup: dict, **kw):
    adata = adata.copy()
    scvi.model.PEAKVI.setup_anndata(adata, **setup)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = scvi.model.PEAKVI(adata, n_hidden=16, n_latent=4, **kw)
        m.train(**TRAIN)
    return m, adata


def test_peakvi_is_supported():
    assert SUPPORTED_MODELS["PEAKVI"] == "PEAKVAE"


# ----------------------------------------------------------------------------- activations
@pytest.mark.parametrize("act", [torch.nn.LeakyReLU, torch.nn.ELU, torch.nn.GELU, torch.nn.Tanh])
def test_scvi_activations_beyond_relu(pbmc_small, tmp_path, act):
    """FCLayers' activation_fn is traced as the module's own (LeakyReLU is PEAKVI's)."""
    adata = pbmc_small.copy()
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = scvi.model.SCVI(
            adata, n_hidden=16, n_latent=4, extra_encoder_kwargs={"activation_fn": act}
        )
        model.train(**TRAIN)
    om = scvi_onnx.load(export_model(model, tmp_path / "b"), device="cpu")
    m, v = om.get_latent_representation(adata, return_dist=True)
    rm, rv = model.get_latent_representation(adata, return_dist=True)
    np.testing.assert_allclose(m, rm, atol=1e-4)
    np.testing.assert_allclose(v, rv, atol=1e-4, rtol=1e-4)


class _Swish(torch.nn.Module):  # not in ACTIVATIONS: an unknown computation
    def forward(self, x):
        return x * torch.sigmoid(2 * x)


def test_unknown_activation_refused(tmp_path):
    model, _ = _peakvi(peaks(200), {"batch_key": "batch"})
    seq = model.module.z_decoder.px_decoder.fc_layers[0]
    seq[3] = _Swish()
    with pytest.raises(UnsupportedModelError, match="_Swish.*LeakyReLU"):
        export_model(model, tmp_path / "b")
    assert torch.nn.LeakyReLU in ACTIVATIONS and not (tmp_path / "b").exists()


def test_unknown_latent_distribution_refused(tmp_path):
    model, _ = _peakvi(peaks(200), {"batch_key": "batch"}, latent_distribution="normal")
    model.module.latent_distribution = "gamma"
    with pytest.raises(UnsupportedModelError, match="latent_distribution='gamma'"):
        export_model(model, tmp_path / "b")


def test_affine_layer_norm_refused(tmp_path):
    model, _ = _peakvi(peaks(200), {"batch_key": "batch"})
    seq = model.module.z_encoder.encoder.fc_layers[0]
    seq[2] = torch.nn.LayerNorm(16, elementwise_affine=True)
    with pytest.raises(UnsupportedModelError, match="layer norm"):
        export_model(model, tmp_path / "b")


def test_posterior_variance_underflowing_to_zero_exports(tmp_path):
    """PEAKVAE's encoder has no variance floor (var_eps=0): a trained model's q_v can
    underflow to 0 (a PEAKVI trained 191 epochs did on the synthetic probe cells), which
    torch's ``Normal(q_m, q_v.sqrt())`` refuses when it checks its arguments. The export
    computes its references without those checks (and restores them); the graphs give the
    zeros as the module does, and the user's model still checks its arguments."""
    from torch.distributions import Distribution

    model, adata = _peakvi(peaks(200), {"batch_key": "batch"})
    with torch.no_grad():  # one latent dimension's log-variance far below float32's range
        model.module.z_encoder.var_encoder.bias[0] = -500.0
    checking = Distribution._validate_args
    om = scvi_onnx.load(export_model(model, tmp_path / "b"), device="cpu")
    assert Distribution._validate_args == checking
    m, v = om.get_latent_representation(adata, return_dist=True)
    assert (v[:, 0] == 0).all() and (v[:, 1:] > 0).all()
    Distribution.set_default_validate_args(False)
    try:
        rm, rv = model.get_latent_representation(adata, return_dist=True)
    finally:
        Distribution.set_default_validate_args(checking)
    np.testing.assert_allclose(m, rm, atol=1e-4)
    np.testing.assert_array_equal(v[:, 0], rv[:, 0])
    np.testing.assert_allclose(v, rv, atol=1e-4, rtol=1e-4)

    # The scoring methods refuse these cells, naming them, as scvi-tools does (checks on):
    # a point-mass posterior has an infinite KL term and no importance-sampling estimate.
    sub = adata[:7].copy()
    for method in ("get_elbo", "get_reconstruction_error", "get_marginal_ll"):
        with pytest.raises(DegeneratePosteriorError, match=r"qz_v.*exactly 0.*7 cells") as e:
            getattr(om, method)(sub)
        assert repr(sub.obs_names[0]) in str(e.value)
    with pytest.raises(ValueError, match="scale"):
        model.get_elbo(sub)


# ----------------------------------------------------------------------------- old folders
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A PEAKVI with covariates, saved by the installed scvi-tools (1.4.2 layout, with
    adata.h5ad), and its bundle and reference numbers."""
    adata = peaks(300)
    setup = {
        "batch_key": "batch",
        "categorical_covariate_keys": ["donor"],
        "continuous_covariate_keys": ["pct"],
    }
    model, data = _peakvi(adata, setup, encode_covariates=True)
    folder = tmp_path_factory.mktemp("saved") / "peakvi"
    model.save(str(folder), save_anndata=True)
    bundle = export_model(folder, tmp_path_factory.mktemp("b") / "b0")
    om = scvi_onnx.load(bundle, device="cpu")
    ref = {
        "latent": model.get_latent_representation(data),
        "elbo": om.get_elbo(data, return_mean=False, seed=3),
        "manifest": json.loads((bundle / B.MANIFEST_FILE).read_text()),
        "arrays": dict(np.load(bundle / B.ARRAYS_FILE)),
    }
    return folder, data, ref


def _check(bundle, ref, data):
    man = json.loads((bundle / B.MANIFEST_FILE).read_text())
    for key in ("config", "registry", "genes"):
        assert man[key] == ref["manifest"][key], key
    arrays = dict(np.load(bundle / B.ARRAYS_FILE))
    assert sorted(arrays) == sorted(ref["arrays"])
    for k, v in arrays.items():
        np.testing.assert_array_equal(v, ref["arrays"][k], err_msg=k)
    assert scvi_onnx.verify(bundle).ok
    om = scvi_onnx.load(bundle, device="cpu")
    np.testing.assert_allclose(om.get_latent_representation(data), ref["latent"], atol=1e-4)
    np.testing.assert_allclose(
        om.get_elbo(data, return_mean=False, seed=3), ref["elbo"], rtol=1e-5, atol=1e-3
    )


VARIANTS = {
    "1.4.2": None,
    "1.3 with pyro_param_store": as_1_3,
    "1.0-1.2": as_1_2,
    "0.15-0.16 registry": as_0_16,
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_model_pt_variants_export(variant, saved, tmp_path):
    folder, data, ref = saved
    pt = _load_pt(folder)
    if VARIANTS[variant] is not None:
        VARIANTS[variant](pt)
    copy = _write_pt(pt, folder, tmp_path / "f", adata=False)
    before = _digest(copy)
    bundle = export_model(copy, tmp_path / "b")
    assert _digest(copy) == before  # the user's folder is read only
    _check(bundle, ref, data)


@pytest.mark.parametrize("adata_file", [False, True], ids=["no-adata", "adata.h5ad"])
def test_pre_0_15_layout_export(adata_file, saved, tmp_path):
    """scvi-tools < 0.15 (model_params.pt, attr.pkl, var_names.csv): the files do not name
    the class; PEAKVAE's weights (z_encoder, z_decoder, d_encoder, region_factors) do."""
    folder, data, ref = saved
    old = as_pre_0_15(folder, tmp_path / "f", "0.14.6", adata=adata_file)
    model = load_saved_model(old)
    assert type(model).__name__ == "PEAKVI"
    _check(export_model(old, tmp_path / "b"), ref, data)


def test_cli_export_names_regions(capsys, tmp_path):
    """The CLI's summary line counts a PEAKVI's features as regions (they are not genes)."""
    from pathlib import Path

    from ..runtime.helpers import cli

    shipped = Path(__file__).resolve().parents[2] / "models" / "pbmc_peakvi_torch"
    out = tmp_path / "bundle"
    code, stdout, err = cli(capsys, "export", shipped, out)
    assert code == 0, err
    assert f"wrote bundle {out} (PEAKVI, 2000 regions, n_latent=" in stdout


# ----------------------------------------------------------------------------- sparse encoders
def _wide(copies: int, keep: float = 1.0):
    """The PEAKVI test cells with their regions repeated ``copies`` times (distinct names),
    each accessible region kept with probability ``keep`` (seeded)."""
    import anndata as ad
    import scipy.sparse as sp

    a = peaks()
    parts = []
    for k in range(copies):
        part = a.copy()
        part.var_names = [f"{v}-{k}" for v in a.var_names]
        parts.append(part)
    wide = ad.concat(parts, axis=1)
    wide.obs = a.obs.copy()
    x = sp.csr_matrix(wide.X, dtype=np.float32)
    x.data[np.random.default_rng(0).random(x.data.size) >= keep] = 0
    x.eliminate_zeros()
    wide.X = x
    return wide


def test_sparse_encoders_from_10000_regions(tmp_path):
    """An export of 10,000 regions or more also writes the sparse encoders: the rest of each
    encoder after its first layer, whose weight the manifest names inside the full graph
    (not stored twice) with the training data's share of non-zero values; ``verify`` checks
    the product; the CPU uses them by default when that share is at most 5% (else with
    ``input_layer="sparse"``), and the latent space equals scvi-tools'. 2,000 regions get
    none."""
    from scvi_onnx.exporter.specs.peakvae import SPARSE_MIN_REGIONS
    from scvi_onnx.models.base import SPARSE_MAX_DENSITY

    assert SPARSE_MIN_REGIONS == 10_000 and SPARSE_MAX_DENSITY == 0.05
    adata = _wide(5, keep=0.35)
    density = adata.X.nnz / (adata.n_obs * adata.n_vars)
    assert 0.02 < density < 0.05
    model, adata = _peakvi(adata, {"batch_key": "batch"})
    path = export_model(model, tmp_path / "wide")
    man = json.loads((path / B.MANIFEST_FILE).read_text())
    for name, full in (("encoder_sparse", "encoder"), ("depth_sparse", "depth")):
        layer = man["graphs"][name][B.format.INPUT_LAYER]
        assert layer["graph"] == full and layer["rows"] == 10_000
        assert layer["density"] == pytest.approx(density, abs=1e-6)
        small, big = (path / f"{name}.onnx").stat().st_size, (path / f"{full}.onnx").stat().st_size
        assert small * 20 < big, (small, big)  # the first layer's weight is not in it
    report = scvi_onnx.verify(path)
    assert report.ok and {"encoder_sparse.x_w", "depth_sparse.x_w"} <= {
        r.output for r in report.rows
    }
    om = scvi_onnx.load(path, device="cpu")
    assert om.module.sparse is not None
    m, v = om.get_latent_representation(adata, return_dist=True)
    rm, rv = model.get_latent_representation(adata, return_dist=True)
    np.testing.assert_allclose(m, rm, atol=1e-4)
    np.testing.assert_allclose(v, rv, atol=1e-4, rtol=1e-4)
    assert om.module.encoder._session is None  # the full encoder was never opened

    # the same regions without the thinning (~11% non-zero): the CPU keeps the dense
    # encoders unless asked
    dense_model, dense_data = _peakvi(_wide(5), {"batch_key": "batch"})
    path = export_model(dense_model, tmp_path / "wide-dense")
    layer = json.loads((path / B.MANIFEST_FILE).read_text())["graphs"]["encoder_sparse"]
    assert layer[B.format.INPUT_LAYER]["density"] > 0.1
    assert scvi_onnx.load(path, device="cpu").module.sparse is None
    om = scvi_onnx.load(path, device="cpu", input_layer="sparse")
    assert om.module.sparse is not None
    np.testing.assert_allclose(
        om.get_latent_representation(dense_data),
        dense_model.get_latent_representation(dense_data),
        atol=1e-4,
    )

    # from a folder saved without its data: the density is unknown (a warning says how to
    # record it); the CPU keeps the dense encoders; with the data given, it is recorded
    folder = tmp_path / "saved"
    model.save(str(folder), save_anndata=False)
    with pytest.warns(UserWarning, match="training data is not at hand"):
        path = export_model(folder, tmp_path / "from-folder")
    assert scvi_onnx.load(path, device="cpu").module.sparse is None
    from scvi_onnx.cli import main as cli_main

    assert cli_main(["info", str(path), "--json"]) == 0
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        cli_main(["info", str(path), "--json"])
    assert json.loads(buf.getvalue())["sparse_encoders"] == {"density": None, "cpu_default": False}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        path = export_model(folder, tmp_path / "from-folder-data", adata=adata)
    assert scvi_onnx.load(path, device="cpu").module.sparse is not None
    buf = io.StringIO()
    with redirect_stdout(buf):
        cli_main(["info", str(path)])
    assert "sparse encoders:" in buf.getvalue() and "the CPU's default" in buf.getvalue()

    narrow, _ = _peakvi(peaks(2000), {"batch_key": "batch"})
    man = json.loads((export_model(narrow, tmp_path / "narrow") / B.MANIFEST_FILE).read_text())
    assert "encoder_sparse" not in man["graphs"] and "depth_sparse" not in man["graphs"]


def test_non_finite_first_layer_gets_no_sparse_encoders(tmp_path, monkeypatch):
    """A product over the entries would give NaN to fewer cells than the dense one: a model
    whose first-layer weights hold NaN keeps the full encoders only (and says so)."""
    from scvi_onnx.exporter.specs import peakvae as spec

    monkeypatch.setattr(spec, "SPARSE_MIN_REGIONS", 0)
    model, _ = _peakvi(peaks(300), {"batch_key": "batch"})
    with torch.no_grad():
        model.module.z_encoder.encoder.fc_layers[0][0].weight[0, 5] = float("nan")
    with pytest.warns(UserWarning, match="non-finite values: no sparse encoders"):
        path = export_model(model, tmp_path / "b")
    man = json.loads((path / B.MANIFEST_FILE).read_text())
    assert "encoder_sparse" not in man["graphs"] and "depth_sparse" not in man["graphs"]
