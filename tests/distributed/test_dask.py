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


def test_peakvi_through_dask(client):
    """PEAKVI (regions as genes, a depth encoder, no library size): per-cell latent, ELBO and
    marginal LL bit-identical to the in-memory run."""
    from ..conftest import ROOT

    peakvi = scvi_onnx.load(ROOT / "models" / "pbmc_peakvi", device="cpu")
    cells = ad.read_h5ad(ROOT / "models" / "example" / "pbmc_peaks.h5ad")[:150].copy()
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


def test_totalvi_refused_with_a_reason(client):
    from scvi_onnx.errors import InvalidArgumentError

    from ..conftest import ROOT

    totalvi = scvi_onnx.load(ROOT / "models" / "pbmc_totalvi", device="cpu")
    cells = ad.read_h5ad(ROOT / "models" / "example" / "pbmc_cite.h5ad")[:64].copy()
    cells.X = da.from_array(cells.X, chunks=(32, cells.n_vars))
    with pytest.raises(InvalidArgumentError, match="protein counts"):
        totalvi.get_latent_representation(cells)
