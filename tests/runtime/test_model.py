"""Runtime behaviour on the shipped bundle: determinism, batching, arguments, threads."""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses

import anndata as ad
import numpy as np
import pytest

import scvi_onnx
from scvi_onnx.errors import InvalidArgumentError

from ..conftest import EXAMPLE_H5AD, SHIPPED_BUNDLE


@pytest.fixture(scope="module")
def model():
    return scvi_onnx.load(SHIPPED_BUNDLE, device="cpu")


@pytest.fixture(scope="module")
def query():
    return ad.read_h5ad(EXAMPLE_H5AD)


def test_load_reports_provider_and_repr(model):
    assert model.provider == "CPUExecutionProvider"
    assert "genes=2000" in repr(model)


def test_same_seed_bit_identical_any_batch_size(model, query):
    ref = model.get_elbo(query, return_mean=False, seed=7)
    for bs in (1, 7, 47, 128, 200):
        assert np.array_equal(model.get_elbo(query, return_mean=False, seed=7, batch_size=bs), ref)
    z = model.get_latent_representation(query)
    for bs in (3, 47, 243):
        assert np.array_equal(model.get_latent_representation(query, batch_size=bs), z)


def test_cell_result_independent_of_minibatch_mates(model, query):
    full = model.get_marginal_ll(query, n_mc_samples=30, return_mean=False)
    idx = np.array([150, 3, 77])
    part = model.get_marginal_ll(query, indices=idx, n_mc_samples=30, return_mean=False)
    assert np.array_equal(part, full[idx])
    chunked = model.get_marginal_ll(
        query, indices=idx, n_mc_samples=30, return_mean=False, n_mc_samples_per_pass=4
    )
    np.testing.assert_allclose(chunked, full[idx], rtol=1e-12)


def test_different_seed_differs(model, query):
    a = model.get_elbo(query, return_mean=False, seed=1)
    b = model.get_elbo(query, return_mean=False, seed=2)
    assert not np.array_equal(a, b)


def test_return_types_and_signs(model, query):
    elbo = model.get_elbo(query)
    rec = model.get_reconstruction_error(query)
    mll = model.get_marginal_ll(query, n_mc_samples=20)
    assert isinstance(elbo, float) and elbo < 0
    assert set(rec) == {"reconstruction_loss"} and rec["reconstruction_loss"] > 0
    assert isinstance(mll, float) and elbo < mll < 0  # the ELBO is a lower bound
    per_cell = model.get_elbo(query, return_mean=False)
    assert per_cell.shape == (query.n_obs,)
    m, v = model.get_latent_representation(query, return_dist=True)
    assert m.shape == v.shape == (query.n_obs, model.n_latent) and (v > 0).all()


def test_marginal_ll_mean_is_mean_of_minibatch_means(model, query):
    per_cell = model.get_marginal_ll(query, n_mc_samples=10, return_mean=False)
    mean = model.get_marginal_ll(query, n_mc_samples=10, batch_size=128)
    assert mean == pytest.approx(np.mean([per_cell[:128].mean(), per_cell[128:].mean()]))


def test_bound_adata_is_default(query):
    m = scvi_onnx.load(SHIPPED_BUNDLE, adata=query, device="cpu")
    np.testing.assert_array_equal(m.get_latent_representation(), m.get_latent_representation(query))


def test_dataloader_input_matches_adata(model, query):
    genes = list(model.genes)
    x = query[:, genes].X.toarray()
    codes = (query.obs["batch"] == "pbmc_10k").to_numpy().astype(np.int64)[:, None]
    dl = [{"X": x[i : i + 50], "batch": codes[i : i + 50]} for i in range(0, len(x), 50)]
    np.testing.assert_array_equal(
        model.get_latent_representation(dataloader=dl), model.get_latent_representation(query)
    )
    np.testing.assert_array_equal(
        model.get_elbo(dataloader=dl, return_mean=False),
        model.get_elbo(query, return_mean=False),
    )


@pytest.mark.parametrize(
    "kwargs",
    [dict(batch_size=0), dict(batch_size=-3), dict(n_mc_samples=0), dict(n_mc_samples=-1)],
)
def test_bad_arguments(model, query, kwargs):
    with pytest.raises(InvalidArgumentError):
        model.get_marginal_ll(query, **kwargs)


def test_no_data_is_a_clear_error(model):
    with pytest.raises(InvalidArgumentError, match="adata"):
        model.get_elbo()


def test_concurrent_calls_equal_serial(model, query):
    serial = [model.get_elbo(query, return_mean=False, seed=s) for s in range(4)]
    with cf.ThreadPoolExecutor(4) as ex:
        futs = [ex.submit(model.get_elbo, query, return_mean=False, seed=s) for s in range(4)]
        parallel = [f.result() for f in futs]
    for a, b in zip(serial, parallel, strict=True):
        assert np.array_equal(a, b)


def test_lazy_public_api_is_stable():
    # regression: a lazily imported submodule named like the function shadowed it
    for _ in range(2):
        assert callable(scvi_onnx.verify) and callable(scvi_onnx.load)
    assert scvi_onnx.verify(SHIPPED_BUNDLE).ok


@pytest.mark.parametrize("seed", [1.5, "3", True, None])
def test_seed_must_be_an_integer(model, query, seed):
    if seed is None:
        assert model.get_elbo(query, seed=None) == model.get_elbo(query)  # None = model's seed
        return
    with pytest.raises(InvalidArgumentError, match="seed"):
        model.get_elbo(query, seed=seed)
    with pytest.raises(InvalidArgumentError, match="seed"):
        scvi_onnx.load(SHIPPED_BUNDLE, device="cpu", seed=seed)


def test_wrong_array_shape_refused_at_load(tmp_path):
    import json
    import shutil

    from scvi_onnx import bundle as B

    b = tmp_path / "b"
    shutil.copytree(SHIPPED_BUNDLE, b)
    arrays = dict(np.load(b / B.ARRAYS_FILE))
    arrays[B.ARR_PX_R] = arrays[B.ARR_PX_R][:-1]
    np.savez(b / B.ARRAYS_FILE, **arrays)
    man = json.loads((b / B.MANIFEST_FILE).read_text())
    man["files"][B.ARRAYS_FILE] = B.sha256_file(b / B.ARRAYS_FILE)
    (b / B.MANIFEST_FILE).write_text(json.dumps(man))
    with pytest.raises(scvi_onnx.BundleIntegrityError, match="px_r has shape"):
        scvi_onnx.load(b, device="cpu")


def test_scoring_graph_equals_host_scoring(model, query):
    """scoring="graph" (the device path: decoder + likelihood reduction in one ONNX graph)
    gives the numpy kernel's numbers, on the CPU provider here; results stay independent of
    the batch size."""
    assert not model.module.scores_on_graph  # "auto" on the CPU scores in numpy
    graph = scvi_onnx.load(SHIPPED_BUNDLE, device="cpu", scoring="graph")
    got = graph.get_elbo(query, return_mean=False, seed=3)
    np.testing.assert_allclose(got, model.get_elbo(query, return_mean=False, seed=3), rtol=1e-6)
    np.testing.assert_array_equal(
        graph.get_elbo(query, return_mean=False, seed=3, batch_size=17), got
    )
    sub = query[:40]
    np.testing.assert_allclose(
        graph.get_marginal_ll(sub, n_mc_samples=30, return_mean=False),
        model.get_marginal_ll(sub, n_mc_samples=30, return_mean=False),
        rtol=1e-6,
    )
    with pytest.raises(InvalidArgumentError, match="scoring must be one of"):
        scvi_onnx.load(SHIPPED_BUNDLE, device="cpu", scoring="gpu")


def test_reader_threads_change_no_number(query):
    """Reader threads (n_threads // 2; the CPU latent space reads without them) change no
    number, bit for bit (backed files and other layouts: test_data's prefetch test)."""
    one = scvi_onnx.load(SHIPPED_BUNDLE, device="cpu", n_threads=1)
    assert (one.engine.prefetch, one.engine.latent_prefetch) == (0, 0)
    threaded = scvi_onnx.load(SHIPPED_BUNDLE, device="cpu", n_threads=4)
    assert (threaded.engine.prefetch, threaded.engine.latent_prefetch) == (2, 0)
    threaded.engine = dataclasses.replace(threaded.engine, prefetch=3, latent_prefetch=3)
    results = []
    for m in (one, threaded):
        results.append(
            {
                "latent": m.get_latent_representation(query, batch_size=7),
                "elbo": m.get_elbo(query, return_mean=False, seed=3, batch_size=7),
                "mll": m.get_marginal_ll(
                    query[:30], n_mc_samples=20, return_mean=False, batch_size=7
                ),
            }
        )
    for k in results[0]:
        np.testing.assert_array_equal(results[1][k], results[0][k], err_msg=k)
