"""Reference mapping: query cells from batches the reference never saw, against scvi-tools'
own query models (``load_query_data`` + ``is_trained = True``, zero-shot; and fine-tuned).

- Where the encoder does not take the batch (``encode_covariates=False``, the default), the
  latent space of cells of an unseen batch (or without the batch column) is computed, and equals
  scvi-tools' zero-shot query model's within 1e-4; SCANVI's ``predict`` too.
- Where the encoder takes it, the latent space of unseen batches is refused (the encoder has no
  weights for them), naming the way out.
- The scoring methods refuse unseen batches unless ``unseen_as`` maps them to a training batch,
  and then equal the same cells labelled with that batch.
- A fine-tuned query model (scArches: ``load_query_data`` + ``train``) exports and matches.
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest

from ..conftest import require, same_noise

torch = require("torch")
scvi = require("scvi")

import scvi_onnx  # noqa: E402
from scvi_onnx.errors import MissingColumnError, UnknownCategoryError  # noqa: E402
from scvi_onnx.exporter import export_model  # noqa: E402

from ..conftest import EXAMPLE_H5AD, MODELS, SHIPPED_BUNDLE, train_kw  # noqa: E402

REFERENCE = MODELS / "pbmc_scvi_torch"


@pytest.fixture(scope="module")
def om():
    return scvi_onnx.load(SHIPPED_BUNDLE, device="cpu")


@pytest.fixture(scope="module")
def new_sample():
    """The example query as one new sample: every cell of a batch the reference never saw."""
    q = ad.read_h5ad(EXAMPLE_H5AD)
    q.obs["batch"] = "clinic_sample_7"
    return q


def _query_model(query, reference):
    """scvi-tools' zero-shot query model: the reference's weights, the query's new batch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scvi.model.SCVI.prepare_query_anndata(query, reference)
        qm = scvi.model.SCVI.load_query_data(query, reference, accelerator="cpu")
    qm.is_trained = True
    return qm


def test_unseen_batch_latent_equals_zero_shot_query_model(om, new_sample):
    ordered = new_sample[:, list(om.genes)].copy()
    qm = _query_model(ordered, str(REFERENCE))
    assert set(qm.adata.obs["_scvi_batch"]) == {2}  # a new batch code, after the two known
    want = qm.get_latent_representation()
    got = om.get_latent_representation(new_sample)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    m, v = om.get_latent_representation(new_sample, return_dist=True)
    wm, wv = qm.get_latent_representation(return_dist=True)
    np.testing.assert_allclose(m, wm, atol=1e-4, rtol=0)
    np.testing.assert_allclose(v, wv, atol=1e-4, rtol=1e-4)


def test_absent_batch_column_latent_is_the_same(om, new_sample):
    absent = new_sample.copy()
    del absent.obs["batch"]
    np.testing.assert_array_equal(
        om.get_latent_representation(absent), om.get_latent_representation(new_sample)
    )


def test_scoring_refuses_unseen_batch_and_maps_it_on_request(om, new_sample):
    with pytest.raises(UnknownCategoryError) as e:
        om.get_elbo(new_sample)
    msg = str(e.value)
    for needle in (
        "'batch'",
        "clinic_sample_7",
        "200 cells",
        "decoder",
        "unseen_as",
        "load_query_data",
    ):
        assert needle in msg, (needle, msg)
    absent = new_sample.copy()
    del absent.obs["batch"]
    with pytest.raises(MissingColumnError, match="pbmc_5k"):
        om.get_marginal_ll(absent, n_mc_samples=5)
    as_10k = new_sample.copy()
    as_10k.obs["batch"] = "pbmc_10k"
    for method, kw in (
        ("get_elbo", {"return_mean": False}),
        ("get_reconstruction_error", {"return_mean": False}),
        ("get_marginal_ll", {"return_mean": False, "n_mc_samples": 10}),
    ):
        got = getattr(om, method)(new_sample, unseen_as={"batch": "pbmc_10k"}, **kw)
        want = getattr(om, method)(as_10k, **kw)
        if isinstance(got, dict):
            got, want = got["reconstruction_loss"], want["reconstruction_loss"]
        np.testing.assert_array_equal(got, want)


@pytest.fixture(scope="module")
def encoded(pbmc_small, tmp_path_factory):
    """A model whose encoder takes the batch (encode_covariates=True), exported."""
    adata = pbmc_small.copy()
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    scvi.settings.seed = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = scvi.model.SCVI(adata, n_hidden=16, n_latent=4, encode_covariates=True)
        model.train(max_epochs=2, **train_kw())
    path = export_model(model, tmp_path_factory.mktemp("encoded") / "bundle")
    return model, adata, scvi_onnx.load(path, device="cpu", seed=3)


def test_encoder_covariate_refuses_unseen_latent_naming_the_way_out(encoded):
    _, adata, om = encoded
    q = adata.copy()
    q.obs["batch"] = "new"
    with pytest.raises(UnknownCategoryError) as e:
        om.get_latent_representation(q)
    msg = str(e.value)
    for needle in ("latent space", "encoder takes it", "load_query_data", "train"):
        assert needle in msg, (needle, msg)


def test_fine_tuned_query_model_exports_and_matches(encoded, tmp_path):
    """scArches: the reference's query model, trained a little on the new sample, exports;
    its latent space and per-cell ELBO equal scvi-tools' (the ELBO under the same noise)."""
    model, adata, _ = encoded
    ref_dir = tmp_path / "ref"
    model.save(str(ref_dir), save_anndata=False)
    q = adata[:120].copy()
    q.obs["batch"] = "new_sample"
    scvi.settings.seed = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = scvi.model.SCVI.load_query_data(q, str(ref_dir), accelerator="cpu")
        qm.train(max_epochs=2, plan_kwargs={"weight_decay": 0.0}, **train_kw())
    om = scvi_onnx.load(export_model(qm, tmp_path / "query_bundle"), device="cpu", seed=5)
    assert "new_sample" in om.manifest.registry.batch.categories
    np.testing.assert_allclose(
        om.get_latent_representation(qm.adata), qm.get_latent_representation(), atol=1e-4
    )
    n = qm.adata.n_obs
    with same_noise(qm, om, n, 1):
        want = qm.get_elbo(qm.adata, batch_size=n, return_mean=False).numpy()
    np.testing.assert_allclose(om.get_elbo(qm.adata, return_mean=False), want, rtol=2e-5, atol=2e-3)


def test_scanvi_predict_of_unseen_batch_equals_zero_shot_query_model(pbmc_small, tmp_path):
    """SCANVI's classifier takes the latent only: labels of cells from an unseen batch (and
    without a labels column) are predicted, as scvi-tools' zero-shot SCANVI query model does."""
    adata = pbmc_small.copy()
    lab = adata.obs["cell_type"].astype(str).to_numpy().copy()
    lab[np.random.default_rng(1).random(adata.n_obs) < 0.3] = "Unknown"
    adata.obs["ct"] = lab
    scvi.model.SCANVI.setup_anndata(
        adata, batch_key="batch", labels_key="ct", unlabeled_category="Unknown"
    )
    scvi.settings.seed = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = scvi.model.SCANVI(adata, n_hidden=16, n_latent=4)
        model.train(max_epochs=2, **train_kw())
    ref_dir = tmp_path / "ref"
    model.save(str(ref_dir), save_anndata=False)
    om = scvi_onnx.load(export_model(model, tmp_path / "bundle"), device="cpu")
    q = adata[:100].copy()
    q.obs["batch"] = "unseen_run"
    q.obs["ct"] = "Unknown"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = scvi.model.SCANVI.load_query_data(q, str(ref_dir), accelerator="cpu")
    qm.is_trained = True
    want = qm.predict(soft=True)
    no_labels = q.copy()
    del no_labels.obs["ct"]
    for data in (q, no_labels):
        got = om.predict(data, soft=True)
        np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), atol=1e-5)
        assert list(om.predict(data)) == list(qm.predict())
    np.testing.assert_allclose(
        om.get_latent_representation(q), qm.get_latent_representation(), atol=1e-4
    )
