"""Parity with scvi-tools 1.4.2 for LinearSCVI (LDVAE) and SCANVI (SCANVAE).

As ``test_parity.py``: tiny models on real PBMC cells (tests/conftest.py: ``LINEAR_CONFIGS``,
``SCANVI_CONFIGS``), exported, compared on
- the latent mean and ``return_dist`` within 1e-4;
- per-cell ELBO, reconstruction error and marginal log-likelihood *exactly* (float32 rounding)
  under the same noise: scvi-tools gets the runtime's draws through torch's patched
  ``_standard_normal``, in its draw order per forward pass: z (N, L), the library (N, 1) when
  learned, then for SCANVI z2 (K * N, L) in ``SCANVAE.loss`` (rows label-major, ``k * N + i``);
- SCANVI's ``predict`` (hard labels identical, probabilities within 1e-5);
- LinearSCVI's ``get_loadings`` (a DataFrame equal within 1e-5).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from ..conftest import LINEAR_CONFIGS, SCANVI_CONFIGS, require, same_noise
from ..conftest import train_tiny as _make

torch = require("torch")
scvi = require("scvi")

import scvi_onnx  # noqa: E402
from scvi_onnx.errors import UnsupportedModelError  # noqa: E402
from scvi_onnx.exporter import export_model  # noqa: E402


@pytest.fixture(scope="module")
def cells(tiny_cells):
    """Real PBMC cells with ``ct_unk``: 30% of the labels "Unknown" (tests/conftest.py)."""
    return tiny_cells


@pytest.fixture(scope="module", params=sorted(LINEAR_CONFIGS) + sorted(SCANVI_CONFIGS))
def trained(request, tiny_models):
    model, adata = tiny_models.model(request.param)
    path = tiny_models.bundle(request.param)
    om = scvi_onnx.load(path, device="cpu", seed=7)
    return request.param, model, adata, om, path


def _close(got, ref, rtol=2e-5, atol=2e-3):
    ref = ref.numpy() if hasattr(ref, "numpy") else np.asarray(ref)
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol)
    return float(np.abs(got - ref).max())


def test_bundle_and_verify(trained):
    name, model, adata, om, path = trained
    cls = type(model).__name__
    assert om.manifest.model_class == cls and type(om).__name__ == f"Onnx{cls}"
    report = scvi_onnx.verify(path)
    assert report.ok
    outputs = {r.output for r in report.rows}
    if cls == "SCANVI":
        assert {"classifier.probs", "z2_encoder.qz2_m", "z1_decoder.pz1_v"} <= outputs
        assert om.labels == tuple(model._label_mapping[: model.module.n_labels])
        assert om.unlabeled_category == "Unknown"


def test_every_listed_file_is_checked(trained, tmp_path):
    """Every file the manifest lists (SCANVI's classifier and z graphs too) is refused when
    altered, whether or not the CPU path runs it."""
    import json
    import shutil

    from scvi_onnx.errors import BundleIntegrityError

    name, model, adata, om, path = trained
    listed = json.loads((path / "manifest.json").read_text())["files"]
    assert set(listed) == {p.name for p in path.iterdir()} - {"manifest.json"}
    for file in listed:
        copy = tmp_path / file
        shutil.copytree(path, copy)
        data = bytearray((copy / file).read_bytes())
        data[len(data) // 2] ^= 0x01
        (copy / file).write_bytes(bytes(data))
        with pytest.raises(BundleIntegrityError, match=file):
            scvi_onnx.load(copy, device="cpu")


def test_latent(trained):
    name, model, adata, om, _ = trained
    if model.module.latent_distribution != "ln":
        np.testing.assert_allclose(
            om.get_latent_representation(adata), model.get_latent_representation(adata), atol=1e-4
        )
    rm, rv = model.get_latent_representation(adata, return_dist=True)
    gm, gv = om.get_latent_representation(adata, return_dist=True)
    np.testing.assert_allclose(gm, rm, atol=1e-4, rtol=0)
    np.testing.assert_allclose(gv, rv, atol=1e-4, rtol=1e-4)


def test_elbo_and_reconstruction_same_noise(trained):
    name, model, adata, om, _ = trained
    n = adata.n_obs
    with same_noise(model, om, n, 1):
        ref = model.get_elbo(adata, batch_size=n, return_mean=False)
    _close(om.get_elbo(adata, return_mean=False, batch_size=53), ref)
    with same_noise(model, om, n, 1):
        ref_rec = model.get_reconstruction_error(adata, batch_size=n, return_mean=False)
    got_rec = om.get_reconstruction_error(adata, return_mean=False)
    _close(got_rec["reconstruction_loss"], ref_rec["reconstruction_loss"])
    with same_noise(model, om, n, 1):
        ref_mean = float(model.get_elbo(adata, batch_size=n))
    assert om.get_elbo(adata) == pytest.approx(ref_mean, rel=2e-6)


def test_marginal_ll_same_noise(trained):
    name, model, adata, om, _ = trained
    n, s = 64, 12
    sub = adata[:n].copy()
    with same_noise(model, om, n, s):
        ref = model.get_marginal_ll(sub, n_mc_samples=s, batch_size=n, return_mean=False)
    _close(om.get_marginal_ll(sub, n_mc_samples=s, return_mean=False, n_mc_samples_per_pass=5), ref)


def test_predict(trained):
    name, model, adata, om, _ = trained
    if not isinstance(model, scvi.model.SCANVI):
        pytest.skip("SCANVI only")
    ref = model.predict(adata)
    got = om.predict(adata, batch_size=61)
    assert got.dtype == ref.dtype and (got == ref).all()
    idx = np.arange(5, 300, 3)
    ref_soft = model.predict(adata, indices=idx, soft=True)
    got_soft = om.predict(adata, indices=idx, soft=True)
    assert list(got_soft.columns) == list(ref_soft.columns)
    assert got_soft.index.equals(ref_soft.index)
    np.testing.assert_allclose(got_soft.to_numpy(), ref_soft.to_numpy(), atol=1e-5, rtol=0)
    assert got_soft.dtypes.tolist() == ref_soft.dtypes.tolist()
    # one posterior draw instead of the mean: the same draw as scvi-tools' z_encoder sample
    n = adata.n_obs
    with same_noise(model, om, n, 1, library=False, z2=False):
        ref_draw = model.predict(adata, soft=True, use_posterior_mean=False, batch_size=n)
    got_draw = om.predict(adata, soft=True, use_posterior_mean=False)
    np.testing.assert_allclose(got_draw.to_numpy(), ref_draw.to_numpy(), atol=1e-5, rtol=0)


def test_loadings(trained):
    name, model, adata, om, _ = trained
    if not isinstance(model, scvi.model.LinearSCVI):
        pytest.skip("LinearSCVI only")
    ref = model.get_loadings()
    got = om.get_loadings()
    pd.testing.assert_frame_equal(got, ref, check_exact=False, atol=1e-5, rtol=0)


def test_scanvi_elbo_ignores_labels(trained):
    """As in scvi-tools' get_elbo, every cell takes SCANVAE's unlabelled path."""
    name, model, adata, om, _ = trained
    if not isinstance(model, scvi.model.SCANVI):
        pytest.skip("SCANVI only")
    unknown = adata.copy()
    unknown.obs["ct_unk"] = "Unknown"
    np.testing.assert_array_equal(
        om.get_elbo(unknown, return_mean=False), om.get_elbo(adata, return_mean=False)
    )


def test_scanvi_graph_validation_can_fail(cells, tmp_path, monkeypatch):
    from scvi_onnx.errors import ExportValidationError
    from scvi_onnx.exporter.graphs import scanvae as _graphs

    model, _ = _make("scanvi-zinb-from-scvi-2batch", cells)
    original = _graphs.Z1DecoderGraph.forward
    monkeypatch.setattr(
        _graphs.Z1DecoderGraph,
        "forward",
        lambda self, z2: tuple(1.01 * o for o in original(self, z2)),
    )
    with pytest.raises(ExportValidationError, match="z1_decoder"):
        export_model(model, tmp_path / "b")


def test_refusals(cells, tmp_path):
    adata = cells.copy()
    scvi.model.SCANVI.setup_anndata(adata, labels_key="ct_unk", unlabeled_category="Unknown")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = scvi.model.SCANVI(adata, n_hidden=8, n_latent=3, dispersion="gene-label")
    with pytest.raises(UnsupportedModelError, match="gene-label"):
        export_model(model, tmp_path / "a")
    adata = cells.copy()
    scvi.model.LinearSCVI.setup_anndata(adata)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = scvi.model.LinearSCVI(adata, n_hidden=8, n_latent=3, dispersion="gene-cell")
    with pytest.raises(UnsupportedModelError, match="gene-cell"):
        export_model(model, tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_export_from_saved_folders(cells, tmp_path):
    """Saved LinearSCVI / SCANVI folders export; without an AnnData, loadings come from the
    module (scvi-tools' get_loadings needs ``adata.var_names``) and still match."""
    for name in ("linear-nb-bn-learnedlib-2batch", "scanvi-zinb-from-scvi-2batch"):
        model, adata = _make(name, cells)
        model.save(tmp_path / name, overwrite=True)
        om = scvi_onnx.load(export_model(tmp_path / name, tmp_path / f"{name}.b"), device="cpu")
        assert type(om).__name__ == f"Onnx{type(model).__name__}"
        np.testing.assert_allclose(
            om.get_latent_representation(adata), model.get_latent_representation(adata), atol=1e-4
        )
        if isinstance(model, scvi.model.LinearSCVI):
            ref = model.get_loadings()
            np.testing.assert_allclose(om.get_loadings().to_numpy(), ref.to_numpy(), atol=1e-5)
            assert list(om.get_loadings().columns) == list(ref.columns)
        else:
            assert (om.predict(adata) == model.predict(adata)).all()


def test_predict_cli(trained, tmp_path, capsys):
    """`scvi-onnx predict` writes scvi-tools' predictions (csv and h5ad), refuses non-SCANVI."""
    import pandas as pd

    from scvi_onnx.cli import main

    name, model, adata, om, path = trained
    query = tmp_path / "q.h5ad"
    adata.write_h5ad(query)
    if not isinstance(model, scvi.model.SCANVI):
        assert main(["predict", str(path), str(query), "-o", str(tmp_path / "p.csv")]) == 2
        assert "predict needs a SCANVI bundle" in capsys.readouterr().err
        assert not (tmp_path / "p.csv").exists()
        return
    ref = model.predict(adata)
    assert main(["predict", str(path), str(query), "-o", str(tmp_path / "p.csv"), "--soft"]) == 0
    table = pd.read_csv(tmp_path / "p.csv", index_col=0)
    assert (table["prediction"].astype(str).to_numpy() == ref.astype(str)).all()
    soft = model.predict(adata, soft=True)
    np.testing.assert_allclose(table[list(map(str, soft.columns))].to_numpy(), soft, atol=1e-5)
    assert main(["predict", str(path), str(query), "-o", str(tmp_path / "p.h5ad")]) == 0
    import anndata as ad

    out = ad.read_h5ad(tmp_path / "p.h5ad")
    assert (out.obs["scanvi_prediction"].astype(str).to_numpy() == ref.astype(str)).all()


def test_scanvi_query_without_labels_column(trained):
    """Query cells without the labels column count as unlabeled: same numbers as with it."""
    name, model, adata, om, _ = trained
    if not isinstance(model, scvi.model.SCANVI):
        pytest.skip("SCANVI only")
    key = om.manifest.registry.labels.key
    bare = adata.copy()
    del bare.obs[key]
    assert (om.predict(bare) == om.predict(adata)).all()
    np.testing.assert_array_equal(
        om.get_latent_representation(bare), om.get_latent_representation(adata)
    )
    np.testing.assert_array_equal(
        om.get_elbo(bare, return_mean=False), om.get_elbo(adata, return_mean=False)
    )
    np.testing.assert_array_equal(
        om.get_marginal_ll(bare[:40], n_mc_samples=5, return_mean=False),
        om.get_marginal_ll(adata[:40], n_mc_samples=5, return_mean=False),
    )
    # a dataloader's minibatches without a "labels" entry, the same (they were refused)
    reg = om.manifest.registry
    x = adata[:, list(om.genes)].X
    x = np.asarray(x.todense() if hasattr(x, "todense") else x, dtype=np.float32)
    codes = {}
    for field, key in ((reg.batch, "batch"), *((f, None) for f in reg.categorical_covariates)):
        if field.key is not None and key is not None:
            cats = list(field.categories)
            codes[key] = np.array([cats.index(v) for v in adata.obs[field.key]])[:, None]
    if reg.categorical_covariates or reg.continuous_covariates or reg.size_factor_key:
        return  # the dataloader would need those too: the AnnData checks above suffice
    loader = [{"X": x[i : i + 64], **{k: v[i : i + 64] for k, v in codes.items()}}
              for i in range(0, len(x), 64)]  # fmt: skip
    np.testing.assert_array_equal(
        om.get_elbo(dataloader=loader, return_mean=False), om.get_elbo(adata, return_mean=False)
    )
    soft = om.predict(dataloader=loader, soft=True)
    np.testing.assert_array_equal(soft.to_numpy(), om.predict(adata, soft=True).to_numpy())
