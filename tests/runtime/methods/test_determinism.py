"""Determinism: each cell's draws are keyed by (seed, its row), so the numbers are bit-identical
on repeat, for any batch size or sample chunking, across threads, reader threads and fresh
loads; a different seed gives different numbers."""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import gc
import os
import threading
from pathlib import Path

import numpy as np
import pytest

import scvi_onnx

from ...conftest import MODELS, SHIPPED_BUNDLE
from ..helpers import assert_same_results


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


def test_concurrent_calls_equal_serial(model, query):
    serial = [model.get_elbo(query, return_mean=False, seed=s) for s in range(4)]
    with cf.ThreadPoolExecutor(4) as ex:
        futs = [ex.submit(model.get_elbo, query, return_mean=False, seed=s) for s in range(4)]
        parallel = [f.result() for f in futs]
    for a, b in zip(serial, parallel, strict=True):
        assert np.array_equal(a, b)


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


# ---- repeats, batch sizes, fresh loads, devices ----------------------------------------------
def test_same_seed_bit_identical_on_repeat_and_any_batch_size(model, query):
    def run(bs):
        return {
            "latent": model.get_latent_representation(query, batch_size=bs),
            "elbo": model.get_elbo(query, return_mean=False, seed=11, batch_size=bs),
            "mll": model.get_marginal_ll(
                query, n_mc_samples=20, return_mean=False, seed=11, batch_size=bs
            ),
        }

    ref = run(None)
    assert_same_results(run(None), ref)
    for bs in (1, 13, 128, 200):
        assert_same_results(run(bs), ref)
    # a fresh load of the same bundle gives the same numbers too
    assert_same_results(
        {
            "latent": (
                fresh := scvi_onnx.load(SHIPPED_BUNDLE, device="cpu")
            ).get_latent_representation(query),
            "elbo": fresh.get_elbo(query, return_mean=False, seed=11),
            "mll": fresh.get_marginal_ll(query, n_mc_samples=20, return_mean=False, seed=11),
        },
        ref,
    )
    assert not np.array_equal(model.get_elbo(query, return_mean=False, seed=12), ref["elbo"])


def _cuda_usable() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover
        return False
    return (
        "CUDAExecutionProvider" in ort.get_available_providers()
        and Path("/proc/driver/nvidia/version").exists()
    )


@pytest.mark.parametrize(
    "bundle, data, scoring",
    [
        ("pbmc_scvi", "pbmc_query.h5ad", "graph"),
        ("pbmc_peakvi", "pbmc_peaks.h5ad", "graph"),
        ("pbmc_totalvi", "pbmc_cite.h5ad", "host"),  # TOTALVI has no scoring graph
    ],
)
def test_cuda_engine_on_the_cpu_provider(bundle, data, scoring):
    """What runs on CUDA, less the device: CUDA's scoring (the graph; TOTALVI's on the host),
    task and chunk sizes (one task per minibatch, every sample in one call) and reader threads
    for the latent space
    gives each cell the numbers of the CPU's engine, bit for bit."""
    import anndata as ad

    from scvi_onnx.methods.engine import Engine

    cells = ad.read_h5ad(MODELS / "example" / data)[:60]
    cpu = scvi_onnx.load(MODELS / bundle, device="cpu", scoring=scoring)
    cuda = scvi_onnx.load(MODELS / bundle, device="cpu", scoring=scoring)
    cuda.engine = Engine.for_provider("CUDAExecutionProvider", 4)
    assert cuda.engine.latent_prefetch > 0 and cuda.engine.task_elements > cpu.engine.task_elements

    def results(m):
        return {
            "latent": m.get_latent_representation(cells, batch_size=25),
            "elbo": m.get_elbo(cells, return_mean=False, seed=3, batch_size=25),
            **m.get_reconstruction_error(cells, return_mean=False, seed=3),
            "mll": m.get_marginal_ll(cells, n_mc_samples=40, return_mean=False, batch_size=25),
        }

    want, got = results(cpu), results(cuda)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_usable(), reason="needs onnxruntime-gpu and an NVIDIA GPU")
def test_cpu_and_cuda_agree(model, query):
    gpu = scvi_onnx.load(SHIPPED_BUNDLE, device="cuda")
    assert gpu.provider == "CUDAExecutionProvider"
    assert gpu.module.scores_on_graph  # on CUDA the likelihood is reduced on the device
    np.testing.assert_allclose(
        gpu.get_latent_representation(query), model.get_latent_representation(query), atol=1e-4
    )
    np.testing.assert_allclose(
        gpu.get_elbo(query, return_mean=False, seed=5),
        model.get_elbo(query, return_mean=False, seed=5),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        gpu.get_marginal_ll(query[:64], n_mc_samples=50, return_mean=False, seed=5),
        model.get_marginal_ll(query[:64], n_mc_samples=50, return_mean=False, seed=5),
        rtol=1e-5,
    )
    host = scvi_onnx.load(SHIPPED_BUNDLE, device="cuda", scoring="host")
    np.testing.assert_allclose(
        host.get_elbo(query, return_mean=False, seed=5),
        model.get_elbo(query, return_mean=False, seed=5),
        rtol=1e-5,
    )
    report = scvi_onnx.verify(SHIPPED_BUNDLE, device="cuda")
    assert report.ok and report.provider == "CUDAExecutionProvider"


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_usable(), reason="needs onnxruntime-gpu and an NVIDIA GPU")
@pytest.mark.parametrize(
    "bundle, data", [("pbmc_totalvi", "pbmc_cite.h5ad"), ("pbmc_peakvi", "pbmc_peaks.h5ad")]
)
def test_cpu_and_cuda_agree_totalvi_peakvi(bundle, data):
    import anndata as ad

    cells = ad.read_h5ad(MODELS / "example" / data)
    cpu = scvi_onnx.load(MODELS / bundle, device="cpu")
    gpu = scvi_onnx.load(MODELS / bundle, device="cuda")
    assert gpu.provider == "CUDAExecutionProvider"
    np.testing.assert_allclose(
        gpu.get_latent_representation(cells), cpu.get_latent_representation(cells), atol=1e-4
    )
    for method, kw in (
        (lambda m: m.get_elbo, {}),
        (lambda m: m.get_marginal_ll, {"n_mc_samples": 50, "indices": np.arange(64)}),
    ):
        np.testing.assert_allclose(
            method(gpu)(cells, return_mean=False, seed=5, **kw),
            method(cpu)(cells, return_mean=False, seed=5, **kw),
            rtol=1e-5,
        )
    got = gpu.get_reconstruction_error(cells, return_mean=False, seed=5)
    want = cpu.get_reconstruction_error(cells, return_mean=False, seed=5)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, err_msg=k)
    assert scvi_onnx.verify(MODELS / bundle, device="cuda").ok


# ---- threads and memory ----------------------------------------------------------------------
def test_eight_threads_mixed_calls_equal_serial(model, query):
    tasks = [
        (model.get_latent_representation, {}),
        (model.get_latent_representation, {"give_mean": False, "seed": 4}),
        (model.get_elbo, {"return_mean": False, "seed": 1}),
        (model.get_elbo, {"return_mean": False, "seed": 2, "batch_size": 13}),
        (model.get_reconstruction_error, {"return_mean": False, "seed": 3}),
        (model.get_marginal_ll, {"n_mc_samples": 10, "return_mean": False, "seed": 5}),
        (model.get_marginal_ll, {"n_mc_samples": 10, "return_mean": False, "seed": 6}),
        (model.get_latent_representation, {"return_dist": True, "indices": np.arange(0, 200, 3)}),
    ]

    def flat(res):
        if isinstance(res, dict):
            return [res["reconstruction_loss"]]
        return list(res) if isinstance(res, tuple) else [res]

    serial = [flat(fn(query, **kw)) for fn, kw in tasks]
    barrier = threading.Barrier(len(tasks))

    def call(fn, kw):
        barrier.wait()
        return flat(fn(query, **kw))

    for _ in range(2):
        with cf.ThreadPoolExecutor(len(tasks)) as ex:
            futures = [ex.submit(call, fn, kw) for fn, kw in tasks]
            parallel = [f.result(timeout=60) for f in futures]
        for want, got in zip(serial, parallel, strict=True):
            for a, b in zip(want, got, strict=True):
                np.testing.assert_array_equal(a, b)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc (Linux)")
def test_repeated_calls_do_not_grow_memory(model, query):
    for _ in range(5):
        model.get_elbo(query, seed=1)
    gc.collect()
    before = _rss_bytes()
    for i in range(30):
        model.get_elbo(query, seed=i)
    gc.collect()
    grown = _rss_bytes() - before
    assert grown < 30 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 30 calls"


# ---- another CPU: numpy's vectorised paths of another instruction set ------------------------
_ISA_SCRIPT = """
import sys
import anndata as ad
import numpy as np
import scvi_onnx
from numpy.lib.introspect import opt_func_info

# the instruction set numpy's float32 log runs on in this process
out = {"log_target": np.array(opt_func_info(func_name="^log$")["log"]["ff"]["current"])}
for name, data in [("pbmc_scvi", "pbmc_query.h5ad"), ("pbmc_totalvi", "pbmc_cite.h5ad"),
                   ("pbmc_peakvi", "pbmc_peaks.h5ad")]:
    m = scvi_onnx.load(sys.argv[1] + "/" + name, device="cpu", seed=3)
    cells = ad.read_h5ad(sys.argv[1] + "/example/" + data)[:120]
    out[name + "/latent"] = m.get_latent_representation(cells)
    out[name + "/elbo"] = m.get_elbo(cells, return_mean=False)
    for k, v in m.get_reconstruction_error(cells, return_mean=False).items():
        out[name + "/" + k] = v
    out[name + "/mll"] = m.get_marginal_ll(cells[:40], n_mc_samples=50, return_mean=False)
np.savez(sys.argv[2], **out)
"""


def _numpy_log_target() -> str:
    """The instruction set numpy's float32 ``log`` runs on here ("" before numpy 2)."""
    try:
        from numpy.lib.introspect import opt_func_info
    except ImportError:  # pragma: no cover
        return ""
    return opt_func_info(func_name="^log$")["log"]["ff"]["current"]


@pytest.mark.skipif(
    _numpy_log_target() != "X86_V4", reason="needs numpy's AVX-512 (X86_V4) paths to switch off"
)
def test_numbers_with_numpy_restricted_to_avx2(tmp_path):
    """What moves on a CPU without AVX-512: numpy's vectorised kernels (log, exp, log1p of the
    likelihoods) take their AVX2 or scalar paths. In a fresh process with them switched off
    (``NPY_DISABLE_CPU_FEATURES=X86_V4``), the shipped models give this process's numbers
    within float32 rounding: the draws are integer arithmetic and the same bits on every CPU,
    and no step amplifies a last-bit difference. (ONNX Runtime picks its kernels by CPU too;
    they cannot be switched here.)"""
    import subprocess
    import sys

    base, avx2 = tmp_path / "base.npz", tmp_path / "avx2.npz"
    env = dict(os.environ)
    env.pop("NPY_DISABLE_CPU_FEATURES", None)
    for path, extra in ((base, {}), (avx2, {"NPY_DISABLE_CPU_FEATURES": "X86_V4"})):
        res = subprocess.run(
            [sys.executable, "-c", _ISA_SCRIPT, str(MODELS), str(path)],
            capture_output=True,
            text=True,
            env={**env, **extra},
        )
        assert res.returncode == 0, res.stderr[-3000:]
    want, got = dict(np.load(base)), dict(np.load(avx2))
    assert want.pop("log_target") == "X86_V4"
    assert got.pop("log_target") != "X86_V4"  # the switch took
    assert sorted(want) == sorted(got)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=0, err_msg=k)
