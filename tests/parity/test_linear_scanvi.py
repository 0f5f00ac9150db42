"""Parity with scvi-tools 1.4.2 for LinearSCVI (LDVAE) and SCANVI (SCANVAE).

As ``test_parity.py``: tiny models on real PBMC cells, exported, compared on
- the latent mean and ``return_dist`` within 1e-4;
- per-cell ELBO, reconstruction error and marginal log-likelihood *exactly* (float32 rounding)
  under the same noise: scvi-tools gets the runtime's draws through torch's patched
  ``_standard_normal``, in its draw order per forward pass: z (N, L), the library (N, 1) when
  learned, then for SCANVI z2 (K * N, L) in ``SCANVAE.loss`` (rows label-major, ``k * N + i``);
- SCANVI's ``predict`` (hard labels identical, probabilities within 1e-5);
- LinearSCVI's ``get_loadings`` (a DataFrame equal within 1e-5).
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
scvi = pytest.importorskip("scvi")
pd = pytest.importorskip("pandas")

import scvi_onnx  # noqa: E402
from scvi_onnx.errors import UnsupportedModelError  # noqa: E402
from scvi_onnx.exporter import export_model  # noqa: E402
from scvi_onnx.maths import rng  # noqa: E402

STREAM_Z2 = rng.STREAM_Z2

TRAIN = dict(
    accelerator="cpu",
    enable_progress_bar=False,
    enable_model_summary=False,
    logger=False,
    enable_checkpointing=False,
)

LINEAR = {
    "linear-nb-bn-learnedlib-2batch": dict(setup=dict(batch_key="batch"), model=dict()),
    "linear-zinb-nobn-bias-genebatch-observedlib": dict(
        setup=dict(batch_key="batch", labels_key="cell_type", layer="counts"),
        model=dict(
            gene_likelihood="zinb",
            use_batch_norm=False,
            bias=True,
            dispersion="gene-batch",
            use_observed_lib_size=True,
        ),
    ),
    "linear-poisson-ln-2layers-manybatches": dict(
        setup=dict(batch_key="many"),
        model=dict(gene_likelihood="poisson", latent_distribution="ln", n_layers=2),
    ),
}

SCANVI = {
    "scanvi-zinb-from-scvi-2batch": dict(
        setup=dict(batch_key="batch"), model=dict(), from_scvi=True
    ),
    "scanvi-nb-covariates-learnedlib-2layers": dict(
        setup=dict(
            batch_key="batch",
            categorical_covariate_keys=["donor"],
            continuous_covariate_keys=["pct"],
        ),
        model=dict(
            gene_likelihood="nb",
            dispersion="gene-batch",
            use_observed_lib_size=False,
            encode_covariates=True,
            n_layers=2,
        ),
    ),
    "scanvi-zinb-ln-layernorm-linear-softmax-classifier": dict(
        setup=dict(batch_key="batch"),
        model=dict(
            latent_distribution="ln",
            linear_classifier=True,
            classifier_parameters={"logits": False},
            use_batch_norm="none",
            use_layer_norm="both",
        ),
    ),
}


@pytest.fixture(scope="module")
def cells(pbmc_small):
    a = pbmc_small.copy()
    lab = a.obs["cell_type"].astype(str).to_numpy().copy()
    lab[np.random.default_rng(1).random(a.n_obs) < 0.3] = "Unknown"
    a.obs["ct_unk"] = lab
    return a


def _fit(model, epochs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=epochs, **TRAIN)
    return model


_CACHE: dict = {}


def _make(name, cells):
    """Train (once per module) the model of one configuration."""
    if name not in _CACHE:
        _CACHE[name] = _train(name, cells)
    return _CACHE[name]


def _train(name, cells):
    adata = cells.copy()
    scvi.settings.seed = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name in LINEAR:
            cfg = LINEAR[name]
            scvi.model.LinearSCVI.setup_anndata(adata, **cfg["setup"])
            return _fit(
                scvi.model.LinearSCVI(adata, n_hidden=16, n_latent=4, **cfg["model"]), 3
            ), adata
        cfg = SCANVI[name]
        kw = dict(n_hidden=16, n_latent=4) | cfg["model"]
        if cfg.get("from_scvi"):
            scvi.model.SCVI.setup_anndata(adata, labels_key="ct_unk", **cfg["setup"])
            vae = _fit(scvi.model.SCVI(adata, **kw), 2)
            model = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category="Unknown")
        else:
            scvi.model.SCANVI.setup_anndata(
                adata, labels_key="ct_unk", unlabeled_category="Unknown", **cfg["setup"]
            )
            model = scvi.model.SCANVI(adata, **kw)
        return _fit(model, 2), adata


@pytest.fixture(scope="module", params=sorted(LINEAR) + sorted(SCANVI))
def trained(request, cells, tmp_path_factory):
    model, adata = _make(request.param, cells)
    path = export_model(model, tmp_path_factory.mktemp(request.param) / "bundle")
    om = scvi_onnx.load(path, device="cpu", seed=7)
    return request.param, model, adata, om, path


@contextlib.contextmanager
def same_noise(model, om, n_obs: int, n_samples: int, *, library=True, z2=True):
    """scvi-tools' Normal.rsample gets the runtime's draws for cells 0..n_obs-1.

    One minibatch of all cells; per forward pass scvi-tools draws z (N, L), then with a learned
    library l (N, 1), then for SCANVI (in ``loss``) z2 (K * N, L), row ``k * N + i``.
    """
    import torch.distributions.normal as tdn

    cells = np.arange(n_obs)
    L = model.module.n_latent
    seed = om.seed
    ez = rng.normals(seed, rng.STREAM_Z, cells, n_samples * L).reshape(n_obs, n_samples, L)
    el = rng.normals(seed, rng.STREAM_L, cells, n_samples)
    learned = library and not model.module.use_observed_lib_size
    scanvi = z2 and isinstance(model, scvi.model.SCANVI)
    if scanvi:
        K = model.module.n_labels
        ez2 = rng.normals(seed, STREAM_Z2, cells, n_samples * K * L)
        ez2 = ez2.reshape(n_obs, n_samples, K, L)
    queue = []
    for s in range(n_samples):
        queue.append(ez[:, s])
        if learned:
            queue.append(el[:, s : s + 1])
        if scanvi:
            queue.append(ez2[:, s].transpose(1, 0, 2).reshape(K * n_obs, L))
    queue.reverse()
    original = tdn._standard_normal

    def fake(shape, dtype, device):
        arr = queue.pop()
        assert tuple(shape) == arr.shape, (tuple(shape), arr.shape)
        return torch.as_tensor(arr, dtype=dtype, device=device)

    tdn._standard_normal = fake
    try:
        yield
        assert not queue, f"{len(queue)} noise draws unused"
    finally:
        tdn._standard_normal = original


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
