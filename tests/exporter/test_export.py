"""The exporter: bundle contents, validation that can fail, refusals, the user's model untouched."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from ..conftest import require

torch = require("torch")
scvi = require("scvi")
onnx = require("onnx")

import scvi_onnx  # noqa: E402
from scvi_onnx import bundle as B  # noqa: E402
from scvi_onnx.errors import (  # noqa: E402
    ExportValidationError,
    InvalidArgumentError,
    UnsupportedModelError,
)
from scvi_onnx.exporter import export_model  # noqa: E402
from scvi_onnx.exporter.graphs import layers as _graphs  # noqa: E402
from scvi_onnx.exporter.parity import QUIET_TRAINING  # noqa: E402

from ..conftest import MODELS, SHIPPED_BUNDLE  # noqa: E402


def _train(adata, setup=None, **kw):
    adata = adata.copy()
    scvi.model.SCVI.setup_anndata(adata, **(setup or {"batch_key": "batch"}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = scvi.model.SCVI(adata, n_hidden=16, n_latent=4, **kw)
        m.train(max_epochs=1, **QUIET_TRAINING)
    return m, adata


@pytest.fixture(scope="module")
def small(pbmc_small):
    return _train(pbmc_small, n_layers=2)


def test_bundle_contents(small, tmp_path):
    model, adata = small
    path = export_model(model, tmp_path / "b")
    man = json.loads((path / B.MANIFEST_FILE).read_text())
    assert man["format"] == B.FORMAT_NAME and man["schema_version"] == B.SCHEMA_VERSION
    assert man["genes"] == list(adata.var_names)
    mapping = model.adata_manager.get_state_registry("batch")["categorical_mapping"]
    assert man["registry"]["batch"] == {"key": "batch", "categories": list(mapping)}
    assert man["versions"]["scvi_tools"] == scvi.__version__
    assert man["graphs"]["opset"] == B.OPSET
    for name, digest in man["files"].items():
        assert B.sha256_file(path / name) == digest
    assert all(r["ok"] for r in man["validation"]["reports"])
    assert sorted(p.name for p in path.iterdir()) == sorted([B.MANIFEST_FILE, *man["files"]])
    for f in (B.ENCODER_FILE, B.DECODER_FILE):
        proto = onnx.load(str(path / f))
        ops = {n.op_type for n in proto.graph.node}
        assert "BatchNormalization" not in ops and not any(o.startswith("Random") for o in ops)
        assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
        assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    with np.load(path / B.ARRAYS_FILE, allow_pickle=False) as a:
        assert a[B.ARR_PX_R].dtype == np.float32


def test_model_left_exactly_as_found(small, tmp_path):
    model, _ = small
    module = model.module
    module.train()  # a state a user could leave it in
    modes = {n: m.training for n, m in module.named_modules()}
    state = {k: v.clone() for k, v in module.state_dict().items()}
    rng_state = torch.random.get_rng_state()
    export_model(model, tmp_path / "b")
    assert {n: m.training for n, m in module.named_modules()} == modes
    for k, v in module.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert next(module.parameters()).device.type == "cpu"
    module.eval()


def test_overwrite(small, tmp_path):
    model, _ = small
    export_model(model, tmp_path / "b")
    with pytest.raises(FileExistsError):
        export_model(model, tmp_path / "b")
    export_model(model, tmp_path / "b", overwrite=True)
    assert scvi_onnx.load(tmp_path / "b", device="cpu")


def test_validation_failure_is_an_error(small, tmp_path, monkeypatch):
    model, _ = small
    original = _graphs.FoldedLayer.forward

    def off(self, x, cats):
        return original(self, x, cats) * 1.01

    monkeypatch.setattr(_graphs.FoldedLayer, "forward", off)
    with pytest.raises(ExportValidationError, match="do not reproduce"):
        export_model(model, tmp_path / "b")
    assert not (tmp_path / "b").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary leftovers
    # nor the folders made for a bundle in a new place
    with pytest.raises(ExportValidationError):
        export_model(model, tmp_path / "new" / "deeper" / "b")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ExportValidationError):  # "new/../b" made new, and removes it
        export_model(model, tmp_path / "new" / ".." / "b")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_only_a_bundle(small, tmp_path, monkeypatch, capsys):
    """overwrite deletes the old bundle: it refuses, before any work, paths whose deletion
    would lose what is not a bundle (the model folder, a folder holding it, the current
    folder, a file, a folder of other things). They were deleted."""
    from scvi_onnx.cli import main

    model, _ = small
    src = tmp_path / "work" / "model"
    src.mkdir(parents=True)
    (src / "model.pt").write_bytes(b"weights")
    (tmp_path / "work" / "notes.txt").write_text("keep")
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.h5ad").write_text("keep")
    a_file = tmp_path / "file.onnx"
    a_file.write_text("keep")
    monkeypatch.chdir(tmp_path / "work")
    for out, why in [
        (src, "holds\\) the model folder"),
        (tmp_path / "work", "current folder"),
        (Path("."), "current folder"),
        (tmp_path, "current folder or one above"),
        (other, "not a bundle"),
        (a_file, "not a folder"),
    ]:
        with pytest.raises(InvalidArgumentError, match=why):
            export_model(src, out, overwrite=True)
    assert main(["export", str(src), str(src), "--overwrite"]) == 2
    assert "the model folder being exported" in capsys.readouterr().err
    assert (src / "model.pt").read_bytes() == b"weights"
    assert (tmp_path / "work" / "notes.txt").read_text() == "keep"
    assert (other / "data.h5ad").read_text() == "keep" and a_file.read_text() == "keep"
    # an in-memory model into a folder of other things: refused too; an empty folder is fine
    with pytest.raises(InvalidArgumentError, match="not a bundle"):
        export_model(model, other, overwrite=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert scvi_onnx.load(export_model(model, empty, overwrite=True), device="cpu")
    # a symbolic link (to a bundle): refused before any work (rmtree refused it at the end)
    link = tmp_path / "link"
    link.symlink_to(empty)
    with pytest.raises(InvalidArgumentError, match="symbolic link"):
        export_model(model, link, overwrite=True)
    assert (empty / "manifest.json").is_file()


def test_unsupported_activation_refused(pbmc_small, tmp_path):
    model, _ = _train(pbmc_small, extra_encoder_kwargs={"activation_fn": torch.nn.Hardswish})
    with pytest.raises(UnsupportedModelError, match="Hardswish"):
        export_model(model, tmp_path / "b")


def test_softplus_var_activation_parity(pbmc_small, tmp_path):
    model, adata = _train(pbmc_small, var_activation=torch.nn.functional.softplus)
    om = scvi_onnx.load(export_model(model, tmp_path / "b"), device="cpu")
    m, v = om.get_latent_representation(adata, return_dist=True)
    rm, rv = model.get_latent_representation(adata, return_dist=True)
    np.testing.assert_allclose(m, rm, atol=1e-4)
    np.testing.assert_allclose(v, rv, atol=1e-4)
    # the encoder's Softplus runs padded: the same bits for any batch size
    assert om.module.encoder.pads_cells
    m7, v7 = om.get_latent_representation(adata, return_dist=True, batch_size=7)
    assert np.array_equal(m7, m) and np.array_equal(v7, v)
    elbo = om.get_elbo(adata, return_mean=False)
    assert np.array_equal(om.get_elbo(adata, return_mean=False, batch_size=9), elbo)


def test_not_a_model_refused(tmp_path):
    with pytest.raises(UnsupportedModelError):
        export_model(object(), tmp_path / "b")
    with pytest.raises(UnsupportedModelError, match="model.pt"):
        export_model(tmp_path, tmp_path / "b")


@pytest.mark.parametrize(
    "kw", [dict(atol=-1e-4), dict(rtol=float("nan")), dict(rtol=float("inf")), dict(atol="1e-4")]
)
def test_bad_tolerance_refused_before_loading(kw, tmp_path):
    """Checked once (``arguments.check_tolerance``, as the CLI's ``--atol`` / ``--rtol``),
    before the model loads: a negative or NaN tolerance would refuse every export."""
    from scvi_onnx.errors import InvalidArgumentError

    name = next(iter(kw))
    with pytest.raises(InvalidArgumentError, match=f"{name} must be a finite number >= 0"):
        export_model(tmp_path / "no_such_folder", tmp_path / "b", **kw)


def test_export_from_saved_folder_without_adata(tmp_path):
    path = export_model(MODELS / "pbmc_scvi_torch", tmp_path / "b")
    shipped = json.loads((SHIPPED_BUNDLE / B.MANIFEST_FILE).read_text())
    fresh = json.loads((path / B.MANIFEST_FILE).read_text())
    assert fresh["config"] == shipped["config"] and fresh["registry"] == shipped["registry"]
    r = scvi_onnx.verify(path)
    assert r.ok


def test_dynamic_cell_and_sample_axes(small, tmp_path):
    model, adata = small
    om = scvi_onnx.load(export_model(model, tmp_path / "b"), device="cpu")
    for n in (1, 5, 333):
        idx = np.arange(n) % adata.n_obs
        assert om.get_marginal_ll(adata[idx].copy(), n_mc_samples=3, return_mean=False).shape == (
            n,
        )


def _encoder_with_log1p_inside(path):
    """Rewrite a bundle's encoder as exporters before 0.2 wrote it: input ``x`` (counts) and
    ``Log(x + 1)`` in the graph, instead of the runtime-computed input ``x_log1p``."""
    proto = onnx.load(str(path / B.ENCODER_FILE))
    inp = proto.graph.input[0]
    assert inp.name == B.IN_X_LOG1P
    inp.name = B.IN_X
    one = onnx.helper.make_tensor("one", onnx.TensorProto.FLOAT, [], [1.0])
    proto.graph.initializer.append(one)
    proto.graph.node.insert(0, onnx.helper.make_node("Log", ["x_plus_1"], [B.IN_X_LOG1P]))
    proto.graph.node.insert(0, onnx.helper.make_node("Add", [B.IN_X, "one"], ["x_plus_1"]))
    onnx.save(proto, str(path / B.ENCODER_FILE))
    with np.load(path / B.PROBES_FILE, allow_pickle=False) as f:
        probes = dict(f)
    probes["enc_in." + B.IN_X] = np.expm1(probes.pop("enc_in." + B.IN_X_LOG1P))
    np.savez_compressed(path / B.PROBES_FILE, **probes)
    man = json.loads((path / B.MANIFEST_FILE).read_text())
    man["graphs"]["encoder"]["inputs"][0] = B.IN_X
    for name in (B.ENCODER_FILE, B.PROBES_FILE):
        man["files"][name] = B.sha256_file(path / name)
    (path / B.MANIFEST_FILE).write_text(json.dumps(man))


def test_encoder_takes_log1p_from_the_runtime_and_old_bundles_still_load(small, tmp_path):
    """The encoder's input is log1p(counts), computed in numpy (ONNX Runtime's Log kernel is
    slow); a bundle whose encoder applies log1p itself gives the same numbers."""
    import shutil

    model, adata = small
    new = export_model(model, tmp_path / "new")
    proto = onnx.load(str(new / B.ENCODER_FILE))
    assert [i.name for i in proto.graph.input][0] == B.IN_X_LOG1P
    assert "Log" not in {n.op_type for n in proto.graph.node}
    old = tmp_path / "old"
    shutil.copytree(new, old)
    _encoder_with_log1p_inside(old)
    assert scvi_onnx.verify(old).ok
    m_new, m_old = scvi_onnx.load(new), scvi_onnx.load(old)
    np.testing.assert_allclose(
        m_old.get_latent_representation(adata),
        m_new.get_latent_representation(adata),
        rtol=1e-5,
        atol=1e-6,
    )
    want = model.get_latent_representation(adata)
    np.testing.assert_allclose(m_new.get_latent_representation(adata), want, atol=1e-4)


def test_decoder_overflow_on_probe_cells_is_reproduced_not_refused(pbmc_small, tmp_path):
    """A learned library read from raw counts (``log_variational=False``) overflows
    ``exp(library)`` for the synthetic probe cells with the largest libraries, in torch as in
    ONNX: ``px_rate`` is inf at the same entries. The export reproduces that (equal non-finite
    entries agree) and warns, instead of refusing a model scvi-tools runs; on the real cells
    the numbers are scvi-tools' under the same noise. (Found by scripts/fuzz_parity.py.)"""
    from ..conftest import same_noise

    adata = pbmc_small.copy()
    scvi.model.SCVI.setup_anndata(adata, continuous_covariate_keys=["pct"])
    scvi.settings.seed = 1
    opts = dict(
        gene_likelihood="nb",
        use_observed_lib_size=False,
        log_variational=False,
        use_batch_norm="decoder",
        n_layers=2,
        n_hidden=32,
        n_latent=10,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = scvi.model.SCVI(adata, **opts)
        model.train(max_epochs=3, **QUIET_TRAINING)
    with pytest.warns(UserWarning, match="non-finite values on some probe cells"):
        path = export_model(model, tmp_path / "b")
    reports = json.loads((path / B.MANIFEST_FILE).read_text())["validation"]["reports"]
    odd = [r for r in reports if r["reason"]]
    assert odd and all(r["ok"] and "equal in both" in r["reason"] for r in odd), odd
    assert scvi_onnx.verify(path).ok
    om = scvi_onnx.load(path, device="cpu", seed=3)
    n = adata.n_obs
    with same_noise(model, om, n, 1):
        ref = model.get_elbo(adata, batch_size=n, return_mean=False).numpy()
    assert np.isfinite(ref).all()
    np.testing.assert_allclose(om.get_elbo(adata, return_mean=False), ref, rtol=2e-5, atol=2e-3)
