"""SCANVI on Dask's default scheduler (threads, no distributed.Client): predict (hard and soft,
at the posterior mean and at a draw) and its ELBO terms, with labels and batches per chunk,
bit-identical to the in-memory run. The same chunk code runs on a cluster's workers
(test_dask.py); this module covers the "else Dask's default" path and costs no cluster.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from ..conftest import require

da = require("dask.array")
ad = require("anndata")

import scvi_onnx  # noqa: E402

BS = 32


def _eq(x, y):
    assert np.array_equal(np.asarray(x), np.asarray(y)), np.max(np.abs(x - y))


@pytest.fixture(scope="module")
def scanvi(pbmc_small, tmp_path_factory):
    scvi = require("scvi")
    from scvi_onnx.exporter import export_model
    from scvi_onnx.exporter.parity import QUIET_TRAINING

    a = pbmc_small.copy()
    lab = a.obs["cell_type"].astype(str).to_numpy().copy()
    lab[np.random.default_rng(1).random(a.n_obs) < 0.3] = "Unknown"
    a.obs["ct_unk"] = lab
    scvi.settings.seed = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scvi.model.SCANVI.setup_anndata(
            a, labels_key="ct_unk", unlabeled_category="Unknown", batch_key="batch"
        )
        model = scvi.model.SCANVI(a, n_hidden=16, n_latent=4)
        model.train(max_epochs=2, **QUIET_TRAINING)
        path = export_model(model, tmp_path_factory.mktemp("scanvi") / "bundle")
    return scvi_onnx.load(path, device="cpu", seed=5), a


def test_scanvi_predict_on_the_default_scheduler(scanvi):
    import sys

    assert "distributed" not in sys.modules or _no_client()
    om, a = scanvi
    X = np.asarray(a.X.toarray() if hasattr(a.X, "toarray") else a.X, dtype=np.float32)
    mem = ad.AnnData(X=X, obs=a.obs, var=a.var)
    lazy = ad.AnnData(X=da.from_array(X, chunks=(72, -1)), obs=a.obs, var=a.var)
    labels = om.predict(lazy, batch_size=BS)
    assert isinstance(labels, da.Array) and labels.chunks == ((72,) * 5 + (40,),)
    assert list(labels.compute()) == list(om.predict(mem, batch_size=BS))
    soft = om.predict(lazy, soft=True)
    _eq(soft.compute(), om.predict(mem, soft=True).to_numpy())
    drawn = om.predict(lazy, soft=True, use_posterior_mean=False, seed=2)
    _eq(drawn.compute(), om.predict(mem, soft=True, use_posterior_mean=False, seed=2).to_numpy())
    _eq(
        om.get_elbo(lazy, return_mean=False).compute(),
        om.get_elbo(mem, return_mean=False),
    )


def _no_client() -> bool:
    from distributed import default_client

    try:
        default_client()
    except ValueError:
        return True
    return False
