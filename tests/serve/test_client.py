"""The library's client, ``scvi_onnx.connect``: the local model's methods, signatures and
return types, numbers equal to the local model's for the same seed, whatever the request size
and cell selection."""

from __future__ import annotations

import inspect

import numpy as np
import pandas as pd
import pytest

import scvi_onnx
from scvi_onnx.errors import InvalidArgumentError, MissingGenesError, UnknownCategoryError
from scvi_onnx.serve.client import RemoteModel, RemoteSCANVI, ServerError


@pytest.fixture(scope="module")
def remote(server):
    return scvi_onnx.connect(
        f"{server.url}/v2/models/pbmc_scvi", token=server.token, chunk_cells=70
    )


@pytest.fixture(scope="module")
def remote_scanvi(server):
    return scvi_onnx.connect(server.url, model="scanvi", token=server.token)


def test_signatures_match_the_library(remote, remote_scanvi, shipped, scanvi):
    for name in (
        "get_latent_representation",
        "get_elbo",
        "get_reconstruction_error",
        "get_marginal_ll",
    ):
        assert inspect.signature(getattr(remote, name)) == inspect.signature(
            getattr(shipped, name)
        ), name
    assert inspect.signature(remote_scanvi.predict) == inspect.signature(scanvi.predict)
    assert isinstance(remote_scanvi, RemoteSCANVI) and not hasattr(remote, "predict")
    assert remote.genes == shipped.genes and remote.n_latent == shipped.n_latent
    assert remote.digest == shipped.digest
    assert remote_scanvi.labels == scanvi.labels


def test_four_methods_equal_local(remote, shipped, query):
    """Requests of 70 cells (chunk_cells): each carries its first row as first_key, so the
    numbers are the local model's on the whole AnnData, bit for bit."""
    m = shipped
    z = remote.get_latent_representation(query)
    assert z.dtype == np.float32 and z.shape == (query.n_obs, 10)
    np.testing.assert_array_equal(z, m.get_latent_representation(query))
    mean, var = remote.get_latent_representation(query, return_dist=True)
    want = m.get_latent_representation(query, return_dist=True)
    np.testing.assert_array_equal(mean, want[0])
    np.testing.assert_array_equal(var, want[1])
    np.testing.assert_array_equal(
        remote.get_latent_representation(query, give_mean=False, seed=4),
        m.get_latent_representation(query, give_mean=False, seed=4),
    )
    assert remote.get_elbo(query) == m.get_elbo(query)
    np.testing.assert_array_equal(
        remote.get_elbo(query, return_mean=False, seed=9),
        m.get_elbo(query, return_mean=False, seed=9),
    )
    rec = remote.get_reconstruction_error(query)
    assert rec == m.get_reconstruction_error(query) and isinstance(
        rec["reconstruction_loss"], float
    )
    assert remote.get_marginal_ll(query, n_mc_samples=25, batch_size=60) == m.get_marginal_ll(
        query, n_mc_samples=25, batch_size=60
    )
    cells = remote.get_marginal_ll(query, n_mc_samples=25, return_mean=False)
    assert cells.dtype == np.float64
    np.testing.assert_array_equal(
        cells, m.get_marginal_ll(query, n_mc_samples=25, return_mean=False)
    )


def test_concurrent_requests_keep_the_order(server, shipped, query):
    """Requests in flight at once (concurrency=3, 23 cells each, over three connections)
    come back into the selection's order: the local model's numbers, bit for bit."""
    with scvi_onnx.connect(
        server.url, model="pbmc_scvi", token=server.token, chunk_cells=23, concurrency=3
    ) as remote:
        assert remote.concurrency == 3
        rows = np.random.default_rng(5).permutation(query.n_obs)[:150]
        np.testing.assert_array_equal(
            remote.get_latent_representation(query, indices=rows),
            shipped.get_latent_representation(query, indices=rows),
        )
        np.testing.assert_array_equal(
            remote.get_elbo(query, return_mean=False, seed=2),
            shipped.get_elbo(query, return_mean=False, seed=2),
        )
    # one process serves: one request at a time unless asked
    assert scvi_onnx.connect(server.url, model="pbmc_scvi", token=server.token).concurrency == 1
    with pytest.raises(InvalidArgumentError, match="concurrency"):
        scvi_onnx.connect(server.url, model="pbmc_scvi", token=server.token, concurrency=0)


@pytest.mark.parametrize(
    "values, datatype",
    [
        ([0, 3, 255], "UINT8"),
        ([0, 256, 65535], "UINT16"),
        ([0, 65536], "FP32"),  # too large for UINT16
        ([0, 1.5], "FP32"),  # not an integer
        ([-1, 2], "FP32"),  # negative: the server refuses it with the library's message
        ([np.nan, 2], "FP32"),
        ([np.inf, 2], "FP32"),
    ],
)
def test_counts_travel_in_the_narrowest_exact_datatype(values, datatype):
    from scvi_onnx.serve.client import _counts_tensor
    from scvi_onnx.serve.protocol import DATATYPES

    x = np.array([values], dtype=np.float32)
    dt, arr = _counts_tensor(x)
    assert dt == datatype and arr.dtype == DATATYPES[datatype]
    np.testing.assert_array_equal(arr.astype(np.float32), x)  # the same numbers, NaN included


@pytest.mark.parametrize(
    "accepted, values, datatype",
    [
        (("FP32", "FP64", "INT32", "INT64"), [0, 3], "FP32"),  # a server from before UINT*
        (("FP32", "UINT16"), [0, 3], "UINT16"),  # no UINT8: the next narrowest
        (("FP32", "UINT8"), [0, 300], "FP32"),  # UINT8 only, and a count that does not fit
    ],
)
def test_counts_datatype_is_one_the_server_lists(accepted, values, datatype):
    from scvi_onnx.serve.client import _counts_tensor

    dt, arr = _counts_tensor(np.array([values], dtype=np.float32), accepted)
    assert dt == datatype
    np.testing.assert_array_equal(arr, np.array([values], dtype=np.float32))


def test_client_sends_what_the_served_model_lists(remote):
    assert {"UINT8", "UINT16"} <= remote._count_datatypes


def test_indices_backed_and_bound_adata(server, remote, shipped, query, tmp_path):
    """A cell selection in any order (cells keyed by their row, as locally), a boolean mask,
    a backed file, and an AnnData bound at connect."""
    import anndata as ad

    m = shipped
    idx = np.random.default_rng(1).permutation(query.n_obs)[:57]
    np.testing.assert_array_equal(
        remote.get_elbo(query, indices=idx, return_mean=False),
        m.get_elbo(query, indices=idx, return_mean=False),
    )
    mask = np.arange(query.n_obs) % 3 == 0
    np.testing.assert_array_equal(
        remote.get_latent_representation(query, indices=mask),
        m.get_latent_representation(query, indices=mask),
    )
    path = tmp_path / "q.h5ad"
    query.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    np.testing.assert_array_equal(
        remote.get_elbo(backed, return_mean=False), m.get_elbo(query, return_mean=False)
    )
    backed.file.close()
    bound = scvi_onnx.connect(
        f"{server.url}/v2/models/pbmc_scvi", token=server.token, adata=query, seed=3
    )
    assert bound.get_elbo() == m.get_elbo(query, seed=3)


def test_scanvi_predict_and_covariates(remote_scanvi, scanvi, scanvi_bundle):
    _, q = scanvi_bundle
    labels = remote_scanvi.predict(q)
    assert isinstance(labels, np.ndarray)
    np.testing.assert_array_equal(labels, scanvi.predict(q))
    soft = remote_scanvi.predict(q, soft=True)
    assert isinstance(soft, pd.DataFrame)
    pd.testing.assert_frame_equal(soft, scanvi.predict(q, soft=True))
    np.testing.assert_array_equal(
        remote_scanvi.predict(q, soft=True, use_posterior_mean=False, seed=2).to_numpy(),
        scanvi.predict(q, soft=True, use_posterior_mean=False, seed=2).to_numpy(),
    )
    np.testing.assert_array_equal(
        remote_scanvi.get_elbo(q, return_mean=False), scanvi.get_elbo(q, return_mean=False)
    )


def test_typed_errors(remote, query):
    """Gene problems are found here by the library's gene matching (before any request);
    data problems come back from the server as the library's typed errors."""
    with pytest.raises(MissingGenesError, match="missing_genes"):
        remote.get_latent_representation(query[:, :1000])
    new = query[:10].copy()
    new.obs["batch"] = "somewhere_else"
    with pytest.raises(UnknownCategoryError, match="somewhere_else"):
        remote.get_elbo(new)  # the decoder has no weights for an unseen batch


def test_value_problems_named_and_warned_as_in_memory(remote, shipped, query):
    """Non-integer values get the library's one NonIntegerCountsWarning (a server can only
    log it); bad values the library's error, naming the cells by obs_names (the server names
    them by their row in a request): the messages are the in-memory ones."""
    import warnings

    from scvi_onnx.errors import InvalidValuesError, NonIntegerCountsWarning

    frac = query[:40].copy()
    frac.X = frac.X.astype(np.float32) * 1.5
    said = []
    for m in (remote, shipped):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m.get_elbo(frac)
        got = [str(w.message) for w in caught if issubclass(w.category, NonIntegerCountsWarning)]
        assert len(got) == 1 and "non-integer value(s)" in got[0], got
        said.append(got[0])
    assert said[0] == said[1]
    bad = query[:40].copy()
    bad.X = bad.X.toarray() if hasattr(bad.X, "toarray") else bad.X.copy()
    bad.X[37, 5] = -2.0
    for kw in ({}, {"indices": np.arange(30, 40)}):  # where: positions in the selection
        errors = []
        for m in (remote, shipped):
            with pytest.raises(InvalidValuesError, match="negative") as e:
                m.get_elbo(bad, **kw)
            errors.append(str(e.value))
        assert errors[0] == errors[1]
        assert str(bad.obs_names[37]) in errors[0]
    assert "(of all 10 cells)" in errors[0]


def test_reference_mapping_options(remote, shipped, query):
    """The library's reference-mapping options work remotely as locally: the latent space of
    an unseen batch (this encoder does not take the batch), ``unseen_as`` for the scoring
    methods, counts in a layer, genes matched by a var column."""
    new = query[:30].copy()
    new.obs["batch"] = "clinic_sample_1"
    np.testing.assert_array_equal(
        remote.get_latent_representation(new), shipped.get_latent_representation(new)
    )
    mapping = {"batch": "pbmc_10k"}
    np.testing.assert_array_equal(
        remote.get_elbo(new, unseen_as=mapping, return_mean=False),
        shipped.get_elbo(new, unseen_as=mapping, return_mean=False),
    )
    moved = query[:30].copy()
    moved.layers["raw"] = moved.X.copy()
    moved.X = moved.X * 0
    moved.var["symbol"] = moved.var_names.to_numpy()
    moved.var_names = [f"ENSG{i:05d}" for i in range(moved.n_vars)]
    kw = {"layer": "raw", "gene_key": "symbol", "return_mean": False}
    np.testing.assert_array_equal(remote.get_elbo(moved, **kw), shipped.get_elbo(moved, **kw))
    np.testing.assert_array_equal(
        remote.get_elbo(moved, **kw), shipped.get_elbo(query[:30], return_mean=False)
    )
    with pytest.raises(InvalidArgumentError, match="dataloader"):
        remote.get_elbo(dataloader=[{"X": np.zeros((1, 2000))}])
    with pytest.raises(InvalidArgumentError, match="no data"):
        remote.get_elbo()


def test_wrong_token_and_unknown_model(server):
    with pytest.raises(ServerError) as e:
        scvi_onnx.connect(f"{server.url}/v2/models/pbmc_scvi", token="not-the-token-at-all")
    assert e.value.status == 401
    with pytest.raises(ServerError) as e:
        scvi_onnx.connect(f"{server.url}/v2/models/nope", token=server.token)
    assert e.value.status == 404
    with pytest.raises(InvalidArgumentError, match="serves 2 models"):
        scvi_onnx.connect(server.url, token=server.token)
    assert isinstance(
        scvi_onnx.connect(f"{server.url}/v2/models/pbmc_scvi", token=server.token), RemoteModel
    )
