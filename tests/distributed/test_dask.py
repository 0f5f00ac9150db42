"""The methods over a real Dask LocalCluster (worker processes on the loopback) against the
in-memory run on the same cells: per-cell outputs bit-identical, means to float rounding
(the marginal LL's exactly), h5ad / zarr / SOMA inputs read lazily, typed errors from workers,
a worker killed mid-run, and the CLI with --scheduler into a zarr store.

One cluster for the module (two single-threaded worker processes).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pandas as pd
import pytest

from ..conftest import require

dask = require("dask")
da = require("dask.array")
distributed = require("distributed")
ad = require("anndata")

import h5py  # noqa: E402
from anndata.experimental import read_elem_lazy, read_lazy  # noqa: E402

import scvi_onnx  # noqa: E402
from scvi_onnx.cli import main  # noqa: E402
from scvi_onnx.distributed import WORKER_CONFIG, cache  # noqa: E402

from ..conftest import EXAMPLE_H5AD, SHIPPED_BUNDLE  # noqa: E402

BS = 32  # minibatch of these tests: chunks of 48 rows are not aligned to it (rechunked)


@pytest.fixture(scope="module")
def client():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with dask.config.set(WORKER_CONFIG):
            cluster = distributed.LocalCluster(
                n_workers=2,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
            )
        c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


@pytest.fixture(autouse=True)
def every_chunk_a_task():
    """These tests' inputs are a few hundred cells in chunks of 8-64 rows: one task per
    chunk (by default tasks group chunks up to 8,192 rows: test_small_chunks_grouped)."""
    with dask.config.set({"scvi-onnx.min-chunk-rows": 1}):
        yield


@pytest.fixture(scope="module")
def model():
    return scvi_onnx.load(SHIPPED_BUNDLE, device="cpu", seed=3)


@pytest.fixture(scope="module")
def mem():
    return ad.read_h5ad(EXAMPLE_H5AD)


@pytest.fixture(scope="module")
def lazy_h5ad():
    """The held-out cells read lazily from .h5ad: CSR chunks of 48 rows."""
    a = read_lazy(EXAMPLE_H5AD)
    f = h5py.File(EXAMPLE_H5AD, "r")
    a.X = read_elem_lazy(f["X"], chunks=(48, a.n_vars))
    yield a
    f.close()


@pytest.fixture(scope="module")
def lazy_zarr(mem, tmp_path_factory):
    """The same cells as a dense AnnData .zarr store, read lazily (chunked by rows and
    genes)."""
    import zarr

    path = tmp_path_factory.mktemp("zarr") / "cells.zarr"
    dense = mem.copy()
    dense.X = dense.X.toarray()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense.write_zarr(path)
    a = read_lazy(path)
    a.X = read_elem_lazy(zarr.open_group(path, mode="r")["X"], chunks=(64, 1000))
    return a


def _eq(x, y):
    assert np.array_equal(np.asarray(x), np.asarray(y)), np.max(np.abs(x - y))


# ============================================================================================
# bit-identity with the in-memory run
# ============================================================================================
@pytest.mark.parametrize("source", ["lazy_h5ad", "lazy_zarr"])
def test_latent_is_lazy_and_bit_identical(client, model, mem, source, request):
    lazy = request.getfixturevalue(source)
    z = model.get_latent_representation(lazy, batch_size=BS)
    assert isinstance(z, da.Array)
    assert z.chunks == (lazy.X.chunks[0], (model.n_latent,))
    assert z.dtype == np.float32 and isinstance(z._meta, np.ndarray)
    _eq(z.compute(), model.get_latent_representation(mem, batch_size=BS))
    m, v = model.get_latent_representation(lazy, return_dist=True)
    m0, v0 = model.get_latent_representation(mem, return_dist=True)
    _eq(m.compute(), m0)
    _eq(v.compute(), v0)
    draw = model.get_latent_representation(lazy, give_mean=False, seed=11)
    _eq(draw.compute(), model.get_latent_representation(mem, give_mean=False, seed=11))


def test_scoring_methods_bit_identical(client, model, mem, lazy_h5ad):
    e = model.get_elbo(lazy_h5ad, return_mean=False, batch_size=BS)
    assert isinstance(e, da.Array) and e.dtype == np.float64 and e.chunks == lazy_h5ad.X.chunks[:1]
    e0 = model.get_elbo(mem, return_mean=False, batch_size=BS)
    _eq(e.compute(), e0)
    r = model.get_reconstruction_error(lazy_h5ad, return_mean=False)
    r0 = model.get_reconstruction_error(mem, return_mean=False)
    assert set(r) == set(r0)
    for k in r0:
        _eq(r[k].compute(), r0[k])
    ll = model.get_marginal_ll(lazy_h5ad, n_mc_samples=30, return_mean=False, batch_size=BS)
    _eq(ll.compute(), model.get_marginal_ll(mem, n_mc_samples=30, return_mean=False, batch_size=BS))


def test_means(client, model, mem, lazy_h5ad):
    # ELBO / reconstruction: chunk sums added with fsum vs numpy's pairwise mean: rounding
    e, e0 = model.get_elbo(lazy_h5ad), model.get_elbo(mem)
    assert isinstance(e, float) and e == pytest.approx(e0, rel=1e-13, abs=0)
    r, r0 = model.get_reconstruction_error(lazy_h5ad), model.get_reconstruction_error(mem)
    assert r.keys() == r0.keys()
    assert all(r[k] == pytest.approx(r0[k], rel=1e-13, abs=0) for k in r0)
    # the marginal LL: scvi-tools' mean of per-minibatch means, minibatches of 32 cells that
    # straddle the input's 48-row chunks; bit-identical
    for bs in (BS, None):
        ll = model.get_marginal_ll(lazy_h5ad, n_mc_samples=30, batch_size=bs)
        assert ll == model.get_marginal_ll(mem, n_mc_samples=30, batch_size=bs)


def _task_keys(arr) -> list[str]:
    """The keys of an array's tasks once Dask has optimized its graph."""
    (optimized,) = dask.optimize(arr)
    return [str(k) for k in optimized.__dask_graph__()]


def test_aligned_root_reads_run_inside_the_chunk_tasks(client, model, mem):
    """Blocks read by one task each (read_elem_lazy's), on the minibatch grid: each block is
    read inside its chunk's task (no read task is left in the graph), with the same numbers;
    an ``indices=`` selection gathers rows from several reads and keeps them as tasks."""
    a = read_lazy(EXAMPLE_H5AD)
    with h5py.File(EXAMPLE_H5AD, "r") as f:
        a.X = read_elem_lazy(f["X"], chunks=(64, a.n_vars))
        read_layer = a.X.name
        z = model.get_latent_representation(a, batch_size=BS)
        keys = _task_keys(z)
        assert not any(read_layer in k for k in keys), keys
        _eq(z.compute(), model.get_latent_representation(mem, batch_size=BS))
        e = model.get_elbo(a, return_mean=False, batch_size=BS)
        _eq(e.compute(), model.get_elbo(mem, return_mean=False, batch_size=BS))
        assert model.get_marginal_ll(a, n_mc_samples=20, batch_size=BS) == model.get_marginal_ll(
            mem, n_mc_samples=20, batch_size=BS
        )
        idx = np.array([150, 3, 99, 4, 5])
        sel = model.get_latent_representation(a, indices=idx, batch_size=BS)
        assert any(read_layer in k for k in _task_keys(sel))
        _eq(sel.compute(), model.get_latent_representation(mem, indices=idx, batch_size=BS))


def _chunk_tasks(arr) -> list[str]:
    return [k for k in _task_keys(arr) if "scvi-onnx-" in k]


def test_small_chunks_grouped_into_tasks_that_read_their_blocks(client, model, mem, monkeypatch):
    """Chunks smaller than ``scvi-onnx.min-chunk-rows`` (default 8,192) are grouped into
    tasks on the minibatch grid; each task reads the blocks it spans itself (no rechunk, no
    read tasks); outputs keep the input's chunks and the in-memory numbers."""
    a = read_lazy(EXAMPLE_H5AD)
    with h5py.File(EXAMPLE_H5AD, "r") as f:
        a.X = read_elem_lazy(f["X"], chunks=(48, a.n_vars))  # not on the grid of 32
        read_layer = a.X.name
        with dask.config.set({"scvi-onnx.min-chunk-rows": 64}):
            z = model.get_latent_representation(a, batch_size=BS)
            e = model.get_elbo(a, return_mean=False, batch_size=BS)
            ll = model.get_marginal_ll(a, n_mc_samples=20, batch_size=BS)
        # tasks [0, 64), [64, 128), [128, 192), [192, 200): each spans two 48-row blocks
        assert len(_chunk_tasks(z)) == 4
        assert not any(read_layer in k for k in _task_keys(z))
        assert z.chunks[0] == a.X.chunks[0] and e.chunks[0] == a.X.chunks[0]
        _eq(z.compute(), model.get_latent_representation(mem, batch_size=BS))
        _eq(e.compute(), model.get_elbo(mem, return_mean=False, batch_size=BS))
        assert ll == model.get_marginal_ll(mem, n_mc_samples=20, batch_size=BS)
        # the default (no config; this module's fixture set one): 200 cells are one task
        monkeypatch.delitem(dask.config.config, "scvi-onnx")
        assert dask.config.get("scvi-onnx.min-chunk-rows", None) is None
        z = model.get_latent_representation(a, batch_size=BS)
        assert len(_chunk_tasks(z)) == 1
        _eq(z.compute(), model.get_latent_representation(mem, batch_size=BS))
        with dask.config.set({"scvi-onnx.min-chunk-rows": 0}):
            with pytest.raises(scvi_onnx.InvalidArgumentError, match="min-chunk-rows"):
                model.get_latent_representation(a, batch_size=BS)


def test_blocks_cut_into_slivers_are_rechunked(client, model, mem):
    """50-row blocks on the grid of 32, one task per chunk: tasks [0, 64), [64, 96),
    [96, 160), [160, 200) would read 350 rows for 200 (blocks cut by task boundaries are read
    by both tasks), over MAX_SPAN_READS: the input is rechunked (each block read once, by its
    own task) and the numbers are the same."""
    from scvi_onnx.distributed import methods

    a = read_lazy(EXAMPLE_H5AD)
    with h5py.File(EXAMPLE_H5AD, "r") as f:
        a.X = read_elem_lazy(f["X"], chunks=(50, a.n_vars))
        nodes = methods.root_nodes(a.X)
        assert nodes is not None
        chunks = methods._task_chunks(a.X.chunks[0], BS, 1)
        assert chunks == (64, 32, 64, 40)
        assert methods._spans(nodes, a.X.chunks[0], chunks) is None
        e = model.get_elbo(a, return_mean=False, batch_size=BS)
        assert any(a.X.name in k for k in _task_keys(e))
        _eq(e.compute(), model.get_elbo(mem, return_mean=False, batch_size=BS))


def test_indices_key_cells_by_their_rows(client, model, mem, lazy_h5ad):
    idx = np.array([150, 3, 99, 4, 5, 6, 120, 0, 199])
    e = model.get_elbo(lazy_h5ad, indices=idx, return_mean=False, batch_size=4)
    _eq(e.compute(), model.get_elbo(mem, indices=idx, return_mean=False, batch_size=4))
    sl = np.arange(40, 160)  # a contiguous selection: chunks keyed from their first row
    _eq(
        model.get_latent_representation(lazy_h5ad, indices=sl, give_mean=False).compute(),
        model.get_latent_representation(mem, indices=sl, give_mean=False),
    )


def test_chunk_obs_encoded_as_whole(client, model, mem):
    """Chunks holding one batch category each encode it by name, as the whole AnnData does (a
    chunk of 'pbmc_10k' cells alone is code 1, not its first category): the decoder reads the
    batch, so identical ELBOs mean identical codes."""
    sub = mem.copy()
    sub.obs["batch"] = np.where(np.arange(sub.n_obs) < 100, "pbmc_10k", "pbmc_5k")
    X = da.from_array(sub.X.toarray(), chunks=(50, -1))
    lazy = ad.AnnData(X=X, obs=sub.obs[["batch"]], var=sub.var[[]])
    e = model.get_elbo(lazy, return_mean=False).compute()
    _eq(e, model.get_elbo(sub, return_mean=False))
    assert not np.array_equal(e, model.get_elbo(mem, return_mean=False))  # the batch matters


def test_workers_load_the_bundle_once(client, model, lazy_h5ad):
    model.get_latent_representation(lazy_h5ad).compute()
    refs = client.run(cache.cached_refs)
    for worker_refs in refs.values():
        assert len(worker_refs) == 1
        assert worker_refs[0].digest == cache.manifest_digest(SHIPPED_BUNDLE)


def test_worker_config_sets_glibc_thresholds(client):
    """WORKER_CONFIG reaches the worker processes' environment (glibc reads it at start)."""
    env = client.run(
        lambda: (os.environ.get("MALLOC_MMAP_THRESHOLD_"), os.environ.get("MALLOC_TRIM_THRESHOLD_"))
    )
    assert set(env.values()) == {(str(32 << 20), str(64 << 20))}


def test_worker_refuses_another_bundle(client):
    ref = cache.ModelRef(path=str(SHIPPED_BUNDLE.resolve()), digest="0" * 64, device="cpu")
    with pytest.raises(scvi_onnx.BundleIntegrityError, match="not the client's"):
        client.submit(cache.cached_model, ref, pure=False).result()


# ============================================================================================
# errors: the in-memory error, from whichever worker found it
# ============================================================================================
def _bad(mem, row, value):
    X = mem.X.toarray()
    X[row, 7] = value
    bad = ad.AnnData(X=X, obs=mem.obs, var=mem.var)
    lazy = ad.AnnData(X=da.from_array(X, chunks=(48, -1)), obs=mem.obs, var=mem.var)
    return bad, lazy


@pytest.mark.parametrize(
    ("row", "value", "error"),
    [
        (150, np.nan, scvi_onnx.InvalidValuesError),
        (20, -3.0, scvi_onnx.InvalidValuesError),
    ],
)
def test_bad_chunk_raises_the_in_memory_error(client, model, mem, row, value, error):
    bad, lazy = _bad(mem, row, value)
    with pytest.raises(error) as want:
        model.get_elbo(bad, batch_size=BS)
    with pytest.raises(error) as got:
        model.get_elbo(lazy, batch_size=BS)
    assert str(got.value) == str(want.value)
    assert mem.obs_names[row] in str(got.value)
    with pytest.raises(error) as got_lazy:
        model.get_latent_representation(lazy, batch_size=BS).compute()
    with pytest.raises(error) as want_latent:
        model.get_latent_representation(bad, batch_size=BS)
    assert str(got_lazy.value) == str(want_latent.value)


def test_zero_library_cell(client, model, mem):
    X = mem.X.toarray()
    X[130] = 0
    bad = ad.AnnData(X=X, obs=mem.obs, var=mem.var)
    lazy = ad.AnnData(X=da.from_array(X, chunks=(48, -1)), obs=mem.obs, var=mem.var)
    with pytest.raises(scvi_onnx.ZeroLibrarySizeError) as want:
        model.get_marginal_ll(bad, n_mc_samples=5)
    with pytest.raises(scvi_onnx.ZeroLibrarySizeError) as got:
        model.get_marginal_ll(lazy, n_mc_samples=5)
    assert str(got.value) == str(want.value)


def test_input_errors_on_the_client(client, model, mem, lazy_h5ad):
    obs = mem.obs.copy()
    obs["batch"] = obs["batch"].astype(str)
    obs.iloc[5, obs.columns.get_loc("batch")] = "unseen"
    X = da.from_array(mem.X.toarray(), chunks=(48, -1))
    with pytest.raises(scvi_onnx.UnknownCategoryError) as want:
        model.get_elbo(ad.AnnData(X=mem.X, obs=obs, var=mem.var))
    with pytest.raises(scvi_onnx.UnknownCategoryError) as got:
        model.get_elbo(ad.AnnData(X=X, obs=obs, var=mem.var))
    assert str(got.value) == str(want.value)
    with pytest.raises(scvi_onnx.MissingGenesError):
        model.get_latent_representation(ad.AnnData(X=X[:, 5:], obs=mem.obs, var=mem.var.iloc[5:]))
    with pytest.raises(scvi_onnx.InvalidArgumentError, match="batch_size"):
        model.get_elbo(lazy_h5ad, batch_size=0)


def test_non_integer_counts_warn_once_with_totals(client, model, mem):
    X = mem.X.toarray()
    X[[3, 100, 170], 9] = 0.5
    half = ad.AnnData(X=X, obs=mem.obs, var=mem.var)
    lazy = ad.AnnData(X=da.from_array(X, chunks=(48, -1)), obs=mem.obs, var=mem.var)
    with pytest.warns(scvi_onnx.NonIntegerCountsWarning) as want:
        model.get_elbo(half)
    with pytest.warns(scvi_onnx.NonIntegerCountsWarning) as got:
        model.get_elbo(lazy)
    assert [str(w.message) for w in got] == [str(w.message) for w in want]


# ============================================================================================
# faults: a worker killed mid-run costs a retry, not the run
# ============================================================================================
def _executing(dask_worker):
    return [str(ts.key) for ts in dask_worker.state.executing]


def test_killed_worker_costs_a_retry(client, model, mem):
    cells = mem[:96].copy()
    X = da.from_array(cells.X.toarray(), chunks=(8, -1))  # 12 chunks of ~0.1 s
    lazy = ad.AnnData(X=X, obs=cells.obs, var=cells.var)
    want = model.get_marginal_ll(cells, n_mc_samples=150, return_mean=False, batch_size=8)
    ll = model.get_marginal_ll(lazy, n_mc_samples=150, return_mean=False, batch_size=8)
    before = set(client.scheduler_info()["workers"])
    future = client.compute(ll)
    victim = None
    deadline = time.monotonic() + 60
    while victim is None and time.monotonic() < deadline and not future.done():
        # a worker in the middle of a chunk (not the instant from_array tasks)
        for w, keys in client.run(_executing).items():
            if any(not k.startswith("('array-") for k in keys):
                victim = w
                break
    assert victim is not None, "no chunk task was seen running"
    pid = client.run(os.getpid, workers=[victim])[victim]
    os.kill(pid, signal.SIGKILL)
    assert not future.done()
    got = future.result(timeout=120)
    _eq(got, want)
    client.wait_for_workers(2, timeout=60)
    after = set(client.scheduler_info()["workers"])
    assert victim not in after and after != before  # the nanny started a new worker


# ============================================================================================
# TileDB-SOMA input
# ============================================================================================
def test_soma_experiment(client, model, mem, tmp_path):
    soma_io = require("tiledbsoma.io")
    from scvi_onnx.distributed import read_soma

    uri = str(tmp_path / "exp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        soma_io.from_anndata(uri, mem, measurement_name="RNA")
    lazy = read_soma(uri, measurement="RNA", layer="data", chunk_size=64)
    assert lazy.X.chunks[0] == (64, 64, 64, 8)
    assert list(lazy.obs_names) == list(mem.obs_names)
    _eq(model.get_latent_representation(lazy).compute(), model.get_latent_representation(mem))
    _eq(
        model.get_elbo(lazy, return_mean=False).compute(),
        model.get_elbo(mem, return_mean=False),
    )
    with pytest.raises(scvi_onnx.InputDataError, match="no X layer 'raw'"):
        read_soma(uri, layer="raw")
    # Census-like names: no obs_id column (cells by soma_joinid), genes in feature_id
    census_like = str(tmp_path / "census_like")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        soma_io.from_anndata(
            census_like, mem, measurement_name="RNA", obs_id_name="cell", var_id_name="feature_id"
        )
    with pytest.raises(scvi_onnx.InputDataError, match="feature_id"):
        read_soma(census_like)
    named = read_soma(census_like, var_names="feature_id", chunk_size=128)
    assert list(named.obs_names[:2]) == ["0", "1"]
    _eq(model.get_latent_representation(named).compute(), model.get_latent_representation(mem))
    # the CLI on the experiment (its layer chosen by flag), against the running scheduler
    out = tmp_path / "rec.zarr"
    rc = main(
        ["reconstruction-error", str(SHIPPED_BUNDLE), uri, "--per-cell", str(out), "--seed", "3"]
        + ["--soma-measurement", "RNA", "--soma-layer", "data", "--chunk-size", "96"]
        + ["--scheduler", client.scheduler.address, "--no-progress"]
    )
    assert rc == 0
    _eq(
        ad.read_zarr(out).obs["reconstruction_loss"].to_numpy(),
        model.get_reconstruction_error(mem, return_mean=False)["reconstruction_loss"],
    )


# ============================================================================================
# the CLI: --scheduler local:N and a running scheduler's address, into .zarr
# ============================================================================================
def test_cli_local_cluster_into_zarr(model, mem, tmp_path, capsys):
    out = tmp_path / "latent.zarr"
    rc = main(
        ["latent", str(SHIPPED_BUNDLE), str(EXAMPLE_H5AD), "-o", str(out), "--seed", "3"]
        + ["--scheduler", "local:2", "--chunk-size", "64", "--no-progress"]
    )
    assert rc == 0, capsys.readouterr().err
    got = ad.read_zarr(out)
    assert list(got.obs_names) == list(mem.obs_names)
    _eq(got.obsm["X_scVI"], model.get_latent_representation(mem))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latent.zarr"]  # no temporary left


def test_cli_scheduler_address_metrics(client, model, mem, tmp_path, capsys):
    address = client.scheduler.address
    out = tmp_path / "mll.zarr"
    rc = main(
        ["marginal-ll", str(SHIPPED_BUNDLE), str(EXAMPLE_H5AD), "--n-mc-samples", "20"]
        + ["--seed", "3", "--per-cell", str(out), "--scheduler", address, "--chunk-size", "100"]
        + ["--no-progress"]
    )
    printed = capsys.readouterr().out
    assert rc == 0
    assert printed.strip() == f"marginal_ll: {model.get_marginal_ll(mem, n_mc_samples=20):.4f}"
    _eq(
        ad.read_zarr(out).obs["marginal_ll"].to_numpy(),
        model.get_marginal_ll(mem, n_mc_samples=20, return_mean=False),
    )


def test_cli_zarr_input_and_failure_leaves_nothing(client, model, mem, tmp_path, capsys):
    address = client.scheduler.address
    X = mem.X.toarray()
    X[120, 3] = -1
    bad = ad.AnnData(X=X, obs=mem.obs, var=mem.var)
    src = tmp_path / "bad.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bad.write_zarr(src)
    out = tmp_path / "elbo.zarr"
    rc = main(
        ["elbo", str(SHIPPED_BUNDLE), str(src), "--per-cell", str(out)]
        + ["--scheduler", address, "--chunk-size", "64", "--no-progress"]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert "negative values" in err and mem.obs_names[120] in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zarr"]
    # the good cells from a zarr store: per-cell column and the printed mean
    good = tmp_path / "good.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mem.write_zarr(good)
    rc = main(
        ["elbo", str(SHIPPED_BUNDLE), str(good), "--per-cell", str(out), "--seed", "3"]
        + ["--scheduler", address, "--no-progress"]
    )
    assert rc == 0
    assert capsys.readouterr().out.strip() == f"elbo: {model.get_elbo(mem):.4f}"
    _eq(ad.read_zarr(out).obs["elbo"].to_numpy(), model.get_elbo(mem, return_mean=False))
    # a folder input without --scheduler is refused with the hint
    assert main(["elbo", str(SHIPPED_BUNDLE), str(good)]) == 2
    assert "--scheduler" in capsys.readouterr().err
    # --overwrite replaces an earlier run's store only: not the input (it replaced the
    # counts with the results), not a folder of other things (rmtree'd), before any work
    run = ["elbo", str(SHIPPED_BUNDLE), str(good), "--seed", "3"]
    run += ["--scheduler", address, "--no-progress", "--overwrite", "--per-cell"]
    for target, why in [
        (good, "is the input"),
        (tmp_path / "good.zarr" / "sub.zarr", "is the input"),
    ]:
        assert main([*run, str(target)]) == 2
        assert why in capsys.readouterr().err
    other = tmp_path / "other.zarr"
    other.mkdir()
    (other / "keep.txt").write_text("keep")
    assert main([*run, str(other)]) == 2
    assert "not an AnnData store" in capsys.readouterr().err
    assert (other / "keep.txt").read_text() == "keep"
    _eq(ad.read_zarr(good).X.toarray() if hasattr(ad.read_zarr(good).X, "toarray")
        else ad.read_zarr(good).X, mem.X.toarray())  # fmt: skip
    assert main([*run, str(out)]) == 0  # an earlier run's store: replaced
    _eq(ad.read_zarr(out).obs["elbo"].to_numpy(), model.get_elbo(mem, return_mean=False))


def test_import_loads_no_dask():
    code = (
        "import sys, scvi_onnx, scvi_onnx.distributed, scvi_onnx.api.base; "
        "bad = [m for m in ('dask', 'distributed', 'zarr', 'tiledbsoma') if m in sys.modules]; "
        "sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ============================================================================================
# reference mapping and the user's files (issue 12's options) through Dask
# ============================================================================================
def test_reference_mapping_options_through_dask(client, model, mem):
    """A new sample's unseen batch (latent computed, scoring refused, then mapped with
    unseen_as), counts read from a layer and genes matched by a var column: the same numbers
    and the same refusals as in memory."""
    from scvi_onnx.errors import UnknownCategoryError

    new = mem.copy()
    new.obs["batch"] = "clinic_sample_7"
    new.layers["raw"] = new.X.copy()
    new.X = new.X * 0.5
    new.var["symbol"] = new.var_names.astype(str)
    new.var_names = [f"ENSG{i:011d}" for i in range(new.n_vars)]
    lazy = new.copy()
    lazy.layers["raw"] = da.from_array(new.layers["raw"], chunks=(64, new.n_vars))
    kw = {"layer": "raw", "gene_key": "symbol"}
    _eq(
        model.get_latent_representation(lazy, **kw).compute(),
        model.get_latent_representation(new, **kw),
    )
    with pytest.raises(UnknownCategoryError) as e_dask:
        model.get_elbo(lazy, **kw)
    with pytest.raises(UnknownCategoryError) as e_mem:
        model.get_elbo(new, **kw)
    assert str(e_dask.value) == str(e_mem.value)
    kw["unseen_as"] = {"batch": "pbmc_10k"}
    _eq(
        model.get_elbo(lazy, return_mean=False, **kw).compute(),
        model.get_elbo(new, return_mean=False, **kw),
    )


@pytest.fixture(scope="module", params=["shipped", "sparse encoders"])
def peakvi_bundle(request, tmp_path_factory):
    """The shipped PEAKVI, and one with the sparse encoders (x @ W from the non-zero entries
    on the CPU: the workers compute it as the client does)."""
    from ..conftest import ROOT

    if request.param == "shipped":
        return ROOT / "models" / "pbmc_peakvi", False
    require("scvi")
    from ..peaks import export_sparse_peakvi

    return export_sparse_peakvi(tmp_path_factory.mktemp("sparse") / "b")[0], True


def test_peakvi_through_dask(client, peakvi_bundle, tmp_path):
    """PEAKVI (regions as genes, a depth encoder, no library size): per-cell latent, ELBO and
    marginal LL bit-identical to the in-memory run."""
    from ..peaks import peaks

    path, sparse = peakvi_bundle
    peakvi = scvi_onnx.load(path, device="cpu", input_layer="sparse" if sparse else "auto")
    assert (peakvi.module.sparse is not None) == sparse
    every = peaks()  # the shipped cells, with the covariates the sparse bundle's model reads
    cells = every[:150].copy()
    lazy = cells.copy()
    lazy.X = da.from_array(cells.X, chunks=(64, cells.n_vars))
    _eq(
        peakvi.get_latent_representation(lazy, batch_size=BS).compute(),
        peakvi.get_latent_representation(cells, batch_size=BS),
    )
    _eq(
        peakvi.get_elbo(lazy, return_mean=False, batch_size=BS).compute(),
        peakvi.get_elbo(cells, return_mean=False, batch_size=BS),
    )
    kw = {"n_mc_samples": 20, "return_mean": False, "batch_size": BS}
    _eq(peakvi.get_marginal_ll(lazy, **kw).compute(), peakvi.get_marginal_ll(cells, **kw))
    # the depth factors too (they crashed in pandas on a lazily read file: not dispatched)
    depth = peakvi.get_library_size_factors(cells)
    _eq(peakvi.get_library_size_factors(lazy).compute(), depth)
    idx = np.array([140, 2, 77])
    _eq(peakvi.get_library_size_factors(lazy, indices=idx).compute(), depth[idx])
    from anndata.experimental import read_lazy

    path = tmp_path / "peaks.h5ad"
    every.write_h5ad(path)
    on_disk = peakvi.get_library_size_factors(read_lazy(path)).compute()
    _eq(on_disk, peakvi.get_library_size_factors(ad.read_h5ad(path)))


# ============================================================================================
# TOTALVI: the proteins in obsm travel with each chunk
# ============================================================================================
CITE_H5AD = SHIPPED_BUNDLE.parent / "example" / "pbmc_cite.h5ad"
PROT = "protein_expression"


@pytest.fixture(scope="module")
def totalvi():
    return scvi_onnx.load(SHIPPED_BUNDLE.parent / "pbmc_totalvi", device="cpu", seed=5)


@pytest.fixture(scope="module")
def cite():
    """150 CITE-seq cells of both batches (pbmc_10k misses proteins: the panel's mask), the
    proteins in obsm as a DataFrame named by protein."""
    return ad.read_h5ad(CITE_H5AD)[120:270].copy()


def _dask_x(cells, chunks=(40, 70, 40)):
    """The cells with a dense Dask X of uneven row chunks (none a multiple of BS)."""
    lazy = cells.copy()
    lazy.X = da.from_array(cells.X.toarray(), chunks=(chunks, cells.n_vars))
    return lazy


def _same_error(run, want_input, got_input):
    with pytest.raises(scvi_onnx.ScviOnnxError) as want:
        run(want_input)
    with pytest.raises(scvi_onnx.ScviOnnxError) as got:
        run(got_input)
    assert type(got.value) is type(want.value)
    assert str(got.value) == str(want.value)
    return got.value


@pytest.mark.parametrize("min_rows", [1, 64])
def test_totalvi_bit_identical(client, totalvi, cite, min_rows):
    """Latent (mean, return_dist), ELBO, both reconstruction terms and marginal LL per cell:
    bit-identical to in memory; the means to float rounding (the marginal LL's exactly).
    With ``min_rows`` 64 the tasks group the chunks and read them themselves, the proteins
    cut to the tasks' rows."""
    with dask.config.set({"scvi-onnx.min-chunk-rows": min_rows}):
        _totalvi_bit_identical(totalvi, cite)


def _totalvi_bit_identical(totalvi, cite):
    lazy = _dask_x(cite)
    z = totalvi.get_latent_representation(lazy, batch_size=BS)
    assert z.chunks == ((40, 70, 40), (totalvi.n_latent,))
    _eq(z.compute(), totalvi.get_latent_representation(cite, batch_size=BS))
    m, v = totalvi.get_latent_representation(lazy, return_dist=True)
    m0, v0 = totalvi.get_latent_representation(cite, return_dist=True)
    _eq(m.compute(), m0)
    _eq(v.compute(), v0)
    e = totalvi.get_elbo(lazy, return_mean=False, batch_size=BS)
    _eq(e.compute(), totalvi.get_elbo(cite, return_mean=False, batch_size=BS))
    r = totalvi.get_reconstruction_error(lazy, return_mean=False)
    r0 = totalvi.get_reconstruction_error(cite, return_mean=False)
    assert list(r) == list(r0) == ["reconst_loss_gene", "reconst_loss_protein"]
    for k in r0:
        _eq(r[k].compute(), r0[k])
    kw = {"n_mc_samples": 20, "batch_size": BS}
    ll = totalvi.get_marginal_ll(lazy, return_mean=False, **kw)
    _eq(ll.compute(), totalvi.get_marginal_ll(cite, return_mean=False, **kw))
    assert totalvi.get_marginal_ll(lazy, **kw) == totalvi.get_marginal_ll(cite, **kw)
    assert totalvi.get_elbo(lazy) == pytest.approx(totalvi.get_elbo(cite), rel=1e-13, abs=0)
    rm, rm0 = totalvi.get_reconstruction_error(lazy), totalvi.get_reconstruction_error(cite)
    assert rm.keys() == rm0.keys()
    assert all(rm[k] == pytest.approx(rm0[k], rel=1e-13, abs=0) for k in rm0)


def test_totalvi_proteins_as_dask_array(client, totalvi, cite):
    """Proteins as a Dask array in obsm (chunked unlike X, matched by position), and an
    indices= selection of the cells: the in-memory numbers."""
    lazy = _dask_x(cite)
    arr = cite.obsm[PROT].to_numpy()
    lazy.obsm[PROT] = da.from_array(arr, chunks=(64, 10))
    mem = cite.copy()
    mem.obsm[PROT] = arr
    _eq(
        totalvi.get_latent_representation(lazy, give_mean=False).compute(),
        totalvi.get_latent_representation(mem, give_mean=False),
    )
    idx = np.array([140, 3, 99, 4, 5, 6, 120, 0, 149, 75])
    kw = {"indices": idx, "return_mean": False, "batch_size": 4}
    _eq(totalvi.get_elbo(lazy, **kw).compute(), totalvi.get_elbo(mem, **kw))


def test_totalvi_input_errors_as_in_memory(client, totalvi, cite):
    """A missing obsm entry, proteins missing by name, the wrong width, non-numeric values
    (refused on the client, before any task), a negative count (found by a worker): the
    in-memory error, word for word."""
    lazy = _dask_x(cite)
    cite, lazy = cite.copy(), lazy.copy()
    for a in (cite, lazy):
        a.obsm["X_pca"] = np.zeros((a.n_obs, 2))

    def variant(change):
        out = []
        for a in (cite, lazy):
            b = a.copy()
            change(b)
            out.append(b)
        return out

    def drop(a):
        del a.obsm[PROT]

    err = _same_error(totalvi.get_elbo, *variant(drop))
    assert isinstance(err, scvi_onnx.MissingColumnError) and "'X_pca'" in str(err)
    no_cd4 = cite.obsm[PROT].drop(columns=["CD4_TotalSeqB"])
    mem, dsk = variant(lambda a: a.obsm.__setitem__(PROT, no_cd4))
    err = _same_error(totalvi.get_latent_representation, mem, dsk)
    assert isinstance(err, scvi_onnx.MissingGenesError) and "CD4_TotalSeqB" in str(err)
    _eq(
        totalvi.get_latent_representation(dsk, missing_genes="zero").compute(),
        totalvi.get_latent_representation(mem, missing_genes="zero"),
    )
    narrow = cite.obsm[PROT].to_numpy()[:, 1:]
    mem, dsk = variant(lambda a: a.obsm.__setitem__(PROT, narrow))
    dsk.obsm[PROT] = da.from_array(narrow, chunks=(50, -1))
    assert "by position" in str(_same_error(totalvi.get_elbo, mem, dsk))
    text = cite.obsm[PROT].to_numpy().astype(str)
    mem, dsk = variant(lambda a: a.obsm.__setitem__(PROT, text))
    dsk.obsm[PROT] = da.from_array(text, chunks=(50, -1))
    assert "must hold numbers" in str(_same_error(totalvi.get_elbo, mem, dsk))
    neg = cite.obsm[PROT].copy()
    neg.iloc[100, 2] = -1.0
    mem, dsk = variant(lambda a: a.obsm.__setitem__(PROT, neg))
    err = _same_error(lambda a: totalvi.get_elbo(a, batch_size=BS), mem, dsk)
    assert cite.obs_names[100] in str(err) and "negative" in str(err)


def test_totalvi_lazy_h5ad_and_cli(client, totalvi, cite, tmp_path, capsys):
    """An .h5ad read lazily (its obsm DataFrame comes as anndata's lazy Dataset2D): the
    in-memory numbers; a non-numeric column refused as in memory; the CLI's
    reconstruction-error with --scheduler writes one column per term and prints each mean
    and their sum, as the in-memory command does."""
    src = tmp_path / "cite.h5ad"
    cite.write_h5ad(src)
    lazy = read_lazy(src)
    with h5py.File(src, "r") as f:
        lazy.X = read_elem_lazy(f["X"], chunks=(48, lazy.n_vars))
        assert type(lazy.obsm[PROT]).__name__ == "Dataset2D"
        _eq(
            totalvi.get_latent_representation(lazy).compute(),
            totalvi.get_latent_representation(cite),
        )
        kw = {"return_mean": False, "batch_size": BS}
        _eq(totalvi.get_elbo(lazy, **kw).compute(), totalvi.get_elbo(cite, **kw))
    bad = cite.copy()
    prot = bad.obsm[PROT].copy()
    prot["CD3_TotalSeqB"] = prot["CD3_TotalSeqB"].astype(str)
    bad.obsm[PROT] = prot
    bad_src = tmp_path / "bad.h5ad"
    bad.write_h5ad(bad_src)
    lazy_bad = read_lazy(bad_src)
    with h5py.File(bad_src, "r") as f:
        lazy_bad.X = read_elem_lazy(f["X"], chunks=(48, lazy_bad.n_vars))
        err = _same_error(totalvi.get_elbo, ad.read_h5ad(bad_src), lazy_bad)
    assert "'CD3_TotalSeqB' are not numeric" in str(err)
    out = tmp_path / "rec.zarr"
    rc = main(
        ["reconstruction-error", str(SHIPPED_BUNDLE.parent / "pbmc_totalvi"), str(src)]
        + ["--per-cell", str(out), "--seed", "5", "--chunk-size", "64", "--no-progress"]
        + ["--scheduler", client.scheduler.address]
    )
    printed = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    want = totalvi.get_reconstruction_error(cite, return_mean=False)
    got = ad.read_zarr(out).obs
    assert list(got.columns) == list(want)
    for k, v in want.items():
        _eq(got[k].to_numpy(), v)
    means = {k: float(np.mean(v)) for k, v in want.items()}
    assert printed == [f"{k}: {v:.4f}" for k, v in means.items()] + [
        f"reconstruction_loss: {sum(means.values()):.4f}"
    ]
    # an AnnData .zarr store (its obsm DataFrame read lazily from zarr)
    store = tmp_path / "cite.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cite.write_zarr(store)
    out = tmp_path / "z.zarr"
    rc = main(
        ["latent", str(SHIPPED_BUNDLE.parent / "pbmc_totalvi"), str(store), "-o", str(out)]
        + ["--seed", "5", "--chunk-size", "64", "--scheduler", client.scheduler.address]
        + ["--no-progress"]
    )
    assert rc == 0
    _eq(ad.read_zarr(out).obsm["X_scVI"], totalvi.get_latent_representation(cite))


def test_totalvi_mudata_refused(client, totalvi, cite):
    """A MuData for a model set up with setup_anndata: refused with the reason and what to
    pass instead."""
    md = require("mudata")
    prot = ad.AnnData(cite.obsm[PROT].to_numpy(), obs=cite.obs[[]].copy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mdata = md.MuData({"rna": _dask_x(cite), "prot": prot})
    with pytest.raises(scvi_onnx.InputDataError, match="setup_anndata.*not setup_mudata") as e:
        totalvi.get_latent_representation(mdata)
    assert f"obsm['{PROT}']" in str(e.value)


def test_totalvi_soma_protein_measurement(client, totalvi, cite, tmp_path, capsys):
    """A TileDB-SOMA experiment with the RNA in one measurement and the antibody counts in
    another ("ADT", its proteins in another order, plus one the model does not know): the
    Python input ModelInput(read_soma(...), read_soma_proteins(...)) and the CLI with
    --soma-protein-measurement give the in-memory numbers per cell; the CLI without it
    refuses with what to pass; a protein missing from the measurement is the in-memory
    error."""
    soma_io = require("tiledbsoma.io")
    import scipy.sparse as sp

    from scvi_onnx.data.proteins import ProteinInput
    from scvi_onnx.distributed import ModelInput, read_soma, read_soma_proteins

    counts = cite.obsm[PROT]
    adt_frame = counts[list(counts.columns[::-1])].copy()
    adt_frame["not_in_the_model"] = 3.0
    uri = str(tmp_path / "exp")
    rna = ad.AnnData(X=cite.X, obs=cite.obs[["batch"]].copy(), var=cite.var[[]].copy())
    adt = ad.AnnData(
        X=sp.csr_matrix(adt_frame.to_numpy(np.float32)),
        obs=cite.obs[["batch"]].copy(),
        var=pd.DataFrame(index=adt_frame.columns),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        soma_io.from_anndata(uri, rna, measurement_name="RNA")
        soma_io.from_anndata(uri, adt, measurement_name="ADT", ingest_mode="resume")
    data = ModelInput(
        read_soma(uri, obs_columns=["batch"], chunk_size=64),
        read_soma_proteins(uri, measurement="ADT", chunk_size=64),
    )
    kw = {"return_mean": False, "batch_size": BS}
    _eq(totalvi.get_elbo(data, **kw).compute(), totalvi.get_elbo(cite, **kw))
    out = tmp_path / "z.zarr"
    bundle = str(SHIPPED_BUNDLE.parent / "pbmc_totalvi")
    cmd = ["latent", bundle, uri, "-o", str(out), "--seed", "5", "--chunk-size", "64"]
    cmd += ["--scheduler", client.scheduler.address, "--no-progress"]
    assert main(cmd) == 2
    assert "--soma-protein-measurement" in capsys.readouterr().err
    assert main([*cmd, "--soma-protein-measurement", "ADT"]) == 0, capsys.readouterr().err
    z = ad.read_zarr(out)
    assert list(z.obs_names) == list(cite.obs_names)
    _eq(z.obsm["X_scVI"], totalvi.get_latent_representation(cite))
    # a protein of the model absent from the measurement: the in-memory error
    p = data.proteins
    names = np.array(p.names, dtype=object)
    names[names == "CD4_TotalSeqB"] = "renamed"
    renamed = ModelInput(data.adata, ProteinInput(p.matrix, pd.Index(names), p.where))
    with pytest.raises(scvi_onnx.MissingGenesError, match="CD4_TotalSeqB"):
        totalvi.get_elbo(renamed)


# --------------------------------------------------------------------------------------------
# TOTALVI set up with setup_mudata: the MuData's modalities gathered on the client
# --------------------------------------------------------------------------------------------
def _mudata_bundle(folder, rna_layer=None):
    """The shipped TOTALVI with the registry TOTALVI.setup_mudata writes (RNA in modality
    "rna", in X or ``rna_layer``, proteins in layer "counts" of modality "prot", the batch
    column in the MuData's own obs; tests/parity exports a trained setup_mudata model and
    checks it against scvi-tools)."""
    import json
    import shutil

    bundle = folder / "bundle"
    shutil.copytree(SHIPPED_BUNDLE.parent / "pbmc_totalvi", bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["registry"]["proteins"].update(attr_name="layers", attr_key="counts")
    manifest["registry"]["modalities"] = {"X": "rna", "proteins": "prot", "batch": None}
    manifest["registry"]["layer"] = rna_layer
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return scvi_onnx.load(bundle, device="cpu", seed=5)


@pytest.fixture(scope="module")
def totalvi_mudata(tmp_path_factory):
    return _mudata_bundle(tmp_path_factory.mktemp("mudata"))


def _mudata(cells, rna_x, prot_counts, prot_names=None):
    md = require("mudata")
    rna = ad.AnnData(X=rna_x, obs=cells.obs[[]].copy(), var=cells.var[[]].copy())
    names = list(cells.obsm[PROT].columns) if prot_names is None else prot_names
    prot = ad.AnnData(
        obs=cells.obs[[]].copy(),
        var=pd.DataFrame(index=pd.Index(names)),
        layers={"counts": prot_counts},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mdata = md.MuData({"rna": rna, "prot": prot})
    mdata.obs["batch"] = cells.obs["batch"].to_numpy()
    return mdata


def test_totalvi_setup_mudata_bit_identical(client, totalvi_mudata, cite):
    """A MuData whose RNA modality holds a Dask array (uneven row chunks), the proteins an
    in-memory layer of another modality, in another protein order: latent, ELBO, both
    reconstruction terms and marginal LL per cell bit-identical to the in-memory MuData; the
    proteins as a Dask array and an indices= selection too. The same model's in-memory
    numbers equal the setup_anndata bundle's on the same cells (same weights)."""
    model = totalvi_mudata
    counts = cite.obsm[PROT]
    order = list(counts.columns[::-1])
    mem = _mudata(cite, cite.X.toarray(), counts[order].to_numpy(), order)
    lazy = _mudata(cite, _dask_x(cite).X, counts[order].to_numpy(), order)
    z = model.get_latent_representation(lazy, batch_size=BS)
    assert isinstance(z, da.Array) and z.chunks == ((40, 70, 40), (model.n_latent,))
    _eq(z.compute(), model.get_latent_representation(mem, batch_size=BS))
    m, v = model.get_latent_representation(lazy, return_dist=True)
    m0, v0 = model.get_latent_representation(mem, return_dist=True)
    _eq(m.compute(), m0)
    _eq(v.compute(), v0)
    kw = {"return_mean": False, "batch_size": BS}
    e0 = model.get_elbo(mem, **kw)
    _eq(model.get_elbo(lazy, **kw).compute(), e0)
    r = model.get_reconstruction_error(lazy, **kw)
    r0 = model.get_reconstruction_error(mem, **kw)
    assert list(r) == list(r0) == ["reconst_loss_gene", "reconst_loss_protein"]
    for k in r0:
        _eq(r[k].compute(), r0[k])
    kw_ll = {"n_mc_samples": 20, "batch_size": BS}
    ll = model.get_marginal_ll(lazy, return_mean=False, **kw_ll)
    _eq(ll.compute(), model.get_marginal_ll(mem, return_mean=False, **kw_ll))
    assert model.get_marginal_ll(lazy, **kw_ll) == model.get_marginal_ll(mem, **kw_ll)
    # the RNA in memory and only the proteins a Dask array: an in-memory run, as for an AnnData
    # whose X is in memory (the Dask path splits the cells by the RNA matrix's chunks)
    dask_prot = da.from_array(counts[order].to_numpy(), chunks=(64, 10))
    mixed = model.get_elbo(_mudata(cite, cite.X.toarray(), dask_prot, order), **kw)
    assert isinstance(mixed, np.ndarray)
    _eq(mixed, e0)
    # the weights are the shipped setup_anndata model's: the same numbers from its AnnData
    totalvi = scvi_onnx.load(SHIPPED_BUNDLE.parent / "pbmc_totalvi", device="cpu", seed=5)
    _eq(e0, totalvi.get_elbo(cite, **kw))
    # proteins as a Dask array (chunked unlike X), and a selection of the cells
    lazy_prot = _mudata(
        cite, _dask_x(cite).X, da.from_array(counts[order].to_numpy(), chunks=(64, 10)), order
    )
    idx = np.array([140, 3, 99, 4, 5, 6, 120, 0, 149, 75])
    kw = {"indices": idx, "return_mean": False, "batch_size": 4}
    _eq(model.get_elbo(lazy_prot, **kw).compute(), model.get_elbo(mem, **kw))


def test_totalvi_setup_mudata_errors_as_in_memory(client, totalvi_mudata, cite):
    """An AnnData for a setup_mudata model, a missing modality, a protein missing by name,
    a modality of other cells (refused on the client, before any task), a negative protein
    count (found by a worker): the in-memory error, word for word."""
    md = require("mudata")
    model = totalvi_mudata
    counts = cite.obsm[PROT]
    err = _same_error(model.get_elbo, cite, _dask_x(cite))
    assert "set up with setup_mudata" in str(err)

    def pair(prot_counts, names=None):
        return (
            _mudata(cite, cite.X.toarray(), prot_counts, names),
            _mudata(cite, _dask_x(cite).X, prot_counts, names),
        )

    mem, dsk = pair(counts.to_numpy())
    for m in (mem, dsk):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m.mod["adt"] = m.mod.pop("prot")
            m.update()
    err = _same_error(model.get_latent_representation, mem, dsk)
    assert isinstance(err, scvi_onnx.MissingColumnError) and "'prot'" in str(err)
    names = list(counts.columns)
    names[1] = "not_CD4"
    err = _same_error(model.get_elbo, *pair(counts.to_numpy(), names))
    assert isinstance(err, scvi_onnx.MissingGenesError) and "CD4_TotalSeqB" in str(err)
    neg = counts.to_numpy().copy()
    neg[100, 2] = -1.0
    err = _same_error(lambda a: model.get_elbo(a, batch_size=BS), *pair(neg))
    assert cite.obs_names[100] in str(err) and "negative" in str(err)
    mem, dsk = pair(counts.to_numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fewer = [
            md.MuData({"rna": m.mod["rna"], "prot": m.mod["prot"][10:].copy()}) for m in (mem, dsk)
        ]
    for m in fewer:
        m.obs["batch"] = cite.obs["batch"].reindex(m.obs_names).to_numpy()
    err = _same_error(model.get_elbo, *fewer)
    assert "not the MuData's" in str(err)


def test_totalvi_setup_mudata_h5mu_cli(client, totalvi_mudata, cite, tmp_path, capsys):
    """The CLI with --scheduler on an .h5mu file: its modalities read lazily (the RNA matrix
    in --chunk-size rows), the MuData's own batch column from the file; the latent and the
    per-cell reconstruction terms equal the in-memory MuData's. A setup_anndata model refuses
    the .h5mu with what to pass instead."""
    model = totalvi_mudata
    counts = cite.obsm[PROT]
    mem = _mudata(cite, cite.X, counts.to_numpy())
    src = tmp_path / "cite.h5mu"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mem.write(src)
    bundle = str(model.path)
    out = tmp_path / "z.zarr"
    rc = main(
        ["latent", bundle, str(src), "-o", str(out), "--seed", "5", "--chunk-size", "64"]
        + ["--scheduler", client.scheduler.address, "--no-progress"]
    )
    assert rc == 0, capsys.readouterr().err
    z = ad.read_zarr(out)
    assert list(z.obs_names) == list(cite.obs_names)
    _eq(z.obsm["X_scVI"], model.get_latent_representation(mem))
    out = tmp_path / "rec.zarr"
    rc = main(
        ["reconstruction-error", bundle, str(src), "--per-cell", str(out), "--seed", "5"]
        + ["--chunk-size", "64", "--scheduler", client.scheduler.address, "--no-progress"]
    )
    assert rc == 0, capsys.readouterr().err
    got = ad.read_zarr(out).obs
    for k, v in model.get_reconstruction_error(mem, return_mean=False, seed=5).items():
        _eq(got[k].to_numpy(), v)
    # --obs sets the MuData's own column, as the in-memory command does
    out = tmp_path / "z_obs.zarr"
    rc = main(
        ["latent", bundle, str(src), "-o", str(out), "--obs", "batch=pbmc_10k"]
        + ["--chunk-size", "64", "--scheduler", client.scheduler.address, "--no-progress"]
    )
    assert rc == 0, capsys.readouterr().err
    one_batch = _mudata(cite, cite.X, counts.to_numpy())
    one_batch.obs["batch"] = "pbmc_10k"
    got = ad.read_zarr(out).obsm["X_scVI"]
    _eq(got, model.get_latent_representation(one_batch))
    assert not np.array_equal(got, model.get_latent_representation(mem))
    capsys.readouterr()
    rc = main(
        ["latent", str(SHIPPED_BUNDLE.parent / "pbmc_totalvi"), str(src), "-o"]
        + [str(tmp_path / "no.zarr"), "--scheduler", client.scheduler.address, "--no-progress"]
    )
    assert rc == 2
    assert "set up with setup_anndata" in capsys.readouterr().err


def test_totalvi_setup_mudata_rna_layer(client, cite, tmp_path):
    """The RNA counts registered in a layer of their modality (``rna_layer``), a Dask array
    there, X holding something else: the layer is read, as in memory."""
    model = _mudata_bundle(tmp_path, rna_layer="raw")
    counts = cite.obsm[PROT].to_numpy()
    mem = _mudata(cite, np.zeros(cite.shape, dtype=np.float32), counts)
    lazy = _mudata(cite, np.zeros(cite.shape, dtype=np.float32), counts)
    mem.mod["rna"].layers["raw"] = cite.X.toarray()
    lazy.mod["rna"].layers["raw"] = _dask_x(cite).X
    kw = {"return_mean": False, "batch_size": BS}
    want = model.get_elbo(mem, **kw)
    _eq(model.get_elbo(lazy, **kw).compute(), want)
    totalvi = scvi_onnx.load(SHIPPED_BUNDLE.parent / "pbmc_totalvi", device="cpu", seed=5)
    _eq(want, totalvi.get_elbo(cite, **kw))


def test_totalvi_setup_mudata_trained_export(client, cite, tmp_path):
    """A TOTALVI trained with setup_mudata and exported (the registry as scvi-tools writes it:
    the RNA counts in a layer of modality "gex", the batch column in that modality's obs, the
    proteins in modality "adt"'s X): on Dask, latent and ELBO per cell bit-identical to the
    in-memory MuData; the latent within 1e-4 of scvi-tools'."""
    require("torch")
    scvi = require("scvi")
    md = require("mudata")
    from scvi_onnx.exporter import export_model
    from scvi_onnx.exporter.parity import QUIET_TRAINING

    counts = cite.obsm[PROT]
    rna = ad.AnnData(X=cite.X.copy(), obs=cite.obs[["batch"]].copy(), var=cite.var[[]].copy())
    rna.layers["counts"] = cite.X.copy()
    adt = ad.AnnData(
        X=counts.to_numpy(np.float32),
        obs=cite.obs[[]].copy(),
        var=pd.DataFrame(index=counts.columns),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mdata = md.MuData({"gex": rna, "adt": adt})
        scvi.model.TOTALVI.setup_mudata(
            mdata,
            rna_layer="counts",
            batch_key="batch",
            modalities={"rna_layer": "gex", "protein_layer": "adt", "batch_key": "gex"},
        )
        trained = scvi.model.TOTALVI(mdata, n_latent=5, n_hidden=32)
        trained.train(max_epochs=5, reduce_lr_on_plateau=False, **QUIET_TRAINING)
        model = scvi_onnx.load(export_model(trained, tmp_path / "b"), device="cpu", seed=3)
        want_z = trained.get_latent_representation(mdata)
    assert model.manifest.registry.modalities["batch"] == "gex"
    lazy_rna = ad.AnnData(obs=rna.obs.copy(), var=rna.var.copy())
    lazy_rna.layers["counts"] = da.from_array(cite.X.toarray(), chunks=((40, 70, 40), -1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lazy = md.MuData({"gex": lazy_rna, "adt": adt})
    z = model.get_latent_representation(mdata)
    np.testing.assert_allclose(z, want_z, rtol=0, atol=1e-4)
    _eq(model.get_latent_representation(lazy).compute(), z)
    kw = {"return_mean": False, "batch_size": BS}
    _eq(model.get_elbo(lazy, **kw).compute(), model.get_elbo(mdata, **kw))
