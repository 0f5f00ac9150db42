"""CUDA checks and measurements on a GPU machine (benchmarks/gpu/run.sh runs them there).

    python benchmarks/gpu_probe.py smoke  -o smoke.json          # every shipped graph on CUDA
    python benchmarks/gpu_probe.py agree  -o agree.json          # CUDA vs CPU, shipped bundles
    python benchmarks/gpu_probe.py sizes  -o sizes.json          # graph calls of growing size
    python benchmarks/gpu_probe.py profile --data cells.h5ad -o profile.json

- ``smoke``: every shipped graph on CUDA against the CPU provider on random inputs, with
  onnxruntime alone (the first check on a fresh machine, before the wheels arrive).
- ``agree``: every shipped bundle (SCVI, TOTALVI, PEAKVI), every method, on CUDA (scoring graph
  and host scoring) against the CPU provider: the largest differences per method.
- ``sizes``: the decoder graph alone on 2^12.. rows, and the scoring graph on 1,024 cells x
  8..1,000 samples (inputs bound on the device, outputs left there): seconds per row and the
  device's memory in use at the peak (NVML), up to the first failure or ~60 GB of outputs.
- ``profile``: what bounds the latent space, the ELBO and the marginal LL on the GPU: the same
  calls on a backed h5ad, in-memory CSR and dense input; the host's densifying alone; the
  encoder graph with host inputs (transfers) and with bound inputs (kernels); the engine's task
  size and threads; ``batch_size`` up to every cell; the marginal LL's samples per pass.

Device memory is the whole GPU's use (one process at a time), and ONNX Runtime's arena keeps
what it took, so within one process the peak only grows: each figure is the peak so far.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from worker import DeviceMemory  # noqa: E402

SHIPPED = [
    ("pbmc_scvi", "pbmc_query.h5ad"),
    ("pbmc_totalvi", "pbmc_cite.h5ad"),
    ("pbmc_peakvi", "pbmc_peaks.h5ad"),
]


def _median_time(fn, repeats: int = 3, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _diff(a, b, tiny: float = 1e-12) -> dict:
    """Largest absolute and relative difference of ``a`` (CUDA) from ``b`` (CPU); relative to
    ``|b|``, at least ``tiny``."""
    if isinstance(b, dict):
        return {k: _diff(a[k], b[k], tiny) for k in b}
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = np.abs(a - b)
    return {
        "max_abs": float(d.max()),
        "max_rel": float((d / np.maximum(np.abs(b), tiny)).max()),
    }


def smoke(args) -> dict:
    """Every shipped graph (``models/*/*.onnx``) on CUDA against ONNX Runtime's CPU provider, on
    random inputs (1,000 cells, 4 samples): onnxruntime alone, before anything else is there."""
    import onnxruntime as ort

    out = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers()}
    dims = {"n_cells": 1000, "n_samples": 4, "n_lib_samples": 1}
    rng = np.random.default_rng(0)
    for path in sorted((ROOT / "models").glob("*/*.onnx")):
        key = f"{path.parent.name}/{path.name}"
        try:
            cpu = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            gpu = ort.InferenceSession(
                str(path), providers=[("CUDAExecutionProvider", {"use_tf32": 0})]
            )
            feeds = {}
            for i in cpu.get_inputs():
                shape = [d if isinstance(d, int) else dims.get(d, 1) for d in i.shape]
                feeds[i.name] = (
                    np.zeros(shape, np.int64)
                    if "int64" in i.type
                    else rng.random(shape, dtype=np.float32)
                )
            want = cpu.run(None, feeds)
            gpu.run(None, feeds)  # warm-up
            t = time.perf_counter()
            got = gpu.run(None, feeds)
            res = {
                "providers": gpu.get_providers(),
                "s": time.perf_counter() - t,
                # random inputs give outputs near 0: relative to at least 1e-6
                "max_rel": max(
                    _diff(g, w, 1e-6)["max_rel"] for g, w in zip(got, want, strict=True)
                ),
            }
        except Exception as e:  # recorded, the other graphs go on
            res = {"error": f"{type(e).__name__}: {e}"[:1000]}
        out[key] = res
        print(key, json.dumps(res), flush=True)
    return out


def agree(args) -> dict:
    import anndata as ad

    import scvi_onnx

    out = {}
    for bundle, data in SHIPPED:
        a = ad.read_h5ad(ROOT / "models" / "example" / data)
        cpu = scvi_onnx.load(ROOT / "models" / bundle, device="cpu")
        first = np.arange(64)

        def results(m, a=a, first=first):
            return {
                "latent": m.get_latent_representation(a),
                "elbo": m.get_elbo(a, return_mean=False, seed=5),
                "rec": m.get_reconstruction_error(a, return_mean=False, seed=5),
                "mll": m.get_marginal_ll(
                    a, indices=first, n_mc_samples=50, return_mean=False, seed=5
                ),
            }

        ref = results(cpu)
        res = {}
        for label, kw in (
            ("auto_scoring", {}),
            ("host_scoring", {"scoring": "host"}),
        ):
            try:
                gpu = scvi_onnx.load(ROOT / "models" / bundle, device=args.device, **kw)
                got = results(gpu)
            except Exception as e:  # recorded, the other checks go on
                res[label] = {"error": f"{type(e).__name__}: {e}"[:2000]}
                continue
            res[label] = {
                "provider": gpu.provider,
                "scores_on_graph": bool(gpu.module.scores_on_graph),
                **{k: _diff(got[k], ref[k]) for k in ref},
            }
        try:
            report = scvi_onnx.verify(ROOT / "models" / bundle, device=args.device)
            res["verify"] = {"ok": bool(report.ok), "provider": report.provider}
        except Exception as e:
            res["verify"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        out[bundle] = res
        print(bundle, json.dumps(res), flush=True)
    return out


def _feeds(graph, rows: int, samples: int = 1, cells: int | None = None, n_genes: int = 0):
    """Inputs for a decoder or scoring graph: ``samples`` x ``cells`` (``rows`` cells when
    ``cells`` is None), on the device."""
    cells = rows if cells is None else cells
    rng = np.random.default_rng(0)
    feeds = {}
    for i in graph.session.get_inputs():
        if i.name == "z":
            feeds[i.name] = rng.standard_normal((samples, cells, i.shape[-1]), np.float32)
        elif i.name == "library":
            feeds[i.name] = np.full((1, cells, 1), np.log(2000.0), np.float32)
        elif i.name == "counts":
            feeds[i.name] = rng.poisson(0.5, (cells, i.shape[-1])).astype(np.float32)
        elif "int64" in i.type:
            feeds[i.name] = np.zeros((cells, 1), np.int64)
        else:  # continuous covariates and the like
            feeds[i.name] = np.zeros((cells, i.shape[-1]), np.float32)
    return {k: graph.to_device(v) for k, v in feeds.items()}


def _bound_run(graph, feeds, device: str = "cuda"):
    binding = graph.session.io_binding()
    for name, v in feeds.items():
        binding.bind_ortvalue_input(name, v)
    for o in graph.outputs:
        binding.bind_output(o, device)  # left on the device: kernels, not transfers
    return lambda: graph.session.run_with_iobinding(binding)


def sizes(args) -> dict:
    from scvi_onnx.sessions import Graph

    bundle = ROOT / "models" / args.bundle
    mem = DeviceMemory()
    out = {"decoder": [], "scorer": []}
    dec = Graph(bundle / "decoder.onnx", args.device)
    G = dec.session.get_outputs()[0].shape[-1]
    for k in range(12, args.max_log2_rows + 1):
        rows = 1 << k
        if rows * G * 4 * len(dec.outputs) > 60e9:
            break
        try:
            t = _median_time(_bound_run(dec, _feeds(dec, rows), args.device), repeats=3)
            row = {"rows": rows, "s": t, "ns_per_row": t / rows * 1e9}
        except Exception as e:
            out["decoder"].append({"rows": rows, "error": f"{type(e).__name__}: {e}"[:500]})
            break
        row["gpu_peak_mb"] = mem.peak_mb
        out["decoder"].append(row)
        print("decoder", json.dumps(row), flush=True)
    if (bundle / "scorer.onnx").exists():
        sc = Graph(bundle / "scorer.onnx", args.device)
        for samples in [s for s in (8, 16, 32, 64, 128, 256, 512, 1000) if s <= args.max_samples]:
            try:
                t = _median_time(
                    _bound_run(sc, _feeds(sc, 0, samples, 1024), args.device), repeats=3
                )
                row = {"cells": 1024, "samples": samples, "s": t}
                row["ns_per_sample_cell"] = t / (samples * 1024) * 1e9
            except Exception as e:
                out["scorer"].append(
                    {"samples": samples, "error": f"{type(e).__name__}: {e}"[:500]}
                )
                break
            row["gpu_peak_mb"] = mem.peak_mb
            out["scorer"].append(row)
            print("scorer", json.dumps(row), flush=True)
    return out


def profile(args) -> dict:
    import anndata as ad

    import scvi_onnx

    mem = DeviceMemory()
    out: dict = {}
    backed = ad.read_h5ad(args.data, backed="r")
    t = time.perf_counter()
    csr = ad.read_h5ad(args.data)
    out["read_h5ad_s"] = time.perf_counter() - t
    dense = ad.AnnData(X=csr.X.toarray(), obs=csr.obs, var=csr.var)
    n = csr.n_obs
    m = scvi_onnx.load(ROOT / "models" / args.bundle, device=args.device)
    out["provider"] = m.provider
    out["engine"] = dataclasses.asdict(m.engine)
    bs = args.batch_size

    def note(key, value):  # written as it goes: a run cut short keeps what it measured
        out[key] = value
        print(key, json.dumps(value), flush=True)
        Path(args.out).write_text(json.dumps(out, indent=1))

    # the methods on three kinds of input: the host's data path is the difference
    for label, data in (("backed", backed), ("csr", csr), ("dense", dense)):
        note(
            f"{label}",
            {
                "latent_s": _median_time(
                    lambda d=data: m.get_latent_representation(d, batch_size=bs), 2
                ),
                "elbo_s": _median_time(lambda d=data: m.get_elbo(d, batch_size=bs), 2),
                "gpu_peak_mb": mem.peak_mb,
            },
        )
    # densifying alone, one thread, in the engine's read size
    step = m.engine.read_cells(csr.n_vars)

    def densify(x):
        for i in range(0, n, step):
            block = x[i : i + step]
            if hasattr(block, "toarray"):
                block.toarray()

    note(
        "densify_one_thread_s",
        {
            "rows_per_read": step,
            "backed": _median_time(lambda: densify(backed.X), 1, 0),
            "csr": _median_time(lambda: densify(csr.X), 2, 0),
        },
    )
    # the encoder alone over the dense cells: host inputs (transfers) vs bound (kernels)
    enc = m.module.encoder
    step = max(1, m.engine.task_elements // csr.n_vars)
    x = np.log1p(dense.X)
    chunks = [np.ascontiguousarray(x[i : i + step]) for i in range(0, n, step)]
    name = enc.inputs[0]

    def host_runs():
        for c in chunks:
            enc.session.run(None, {name: c})

    bound = [_bound_run(enc, {name: enc.to_device(c)}, args.device) for c in chunks[:8]]
    t_bound = _median_time(lambda: [b() for b in bound], 3) / len(bound) * len(chunks)
    note(
        "encoder_graph",
        {
            "cells_per_call": step,
            "calls": len(chunks),
            "host_inputs_s": _median_time(host_runs, 2),
            "bound_inputs_s (scaled from 8 calls)": t_bound,
        },
    )
    chunks = bound = x = None  # freed before the sweeps
    # the engine's task size and threads, dense input
    base = m.engine
    for task in (1 << 21, 1 << 23, 1 << 25):
        for workers in (1, 8, 16):
            m.engine = dataclasses.replace(
                base,
                task_elements=task,
                n_workers=workers,
                read_elements=max(base.read_elements, task),
                prefetch=max(1, workers // 2),
                latent_prefetch=max(1, workers // 2),
            )
            note(
                f"engine_task{task}_workers{workers}",
                {
                    "latent_s": _median_time(
                        lambda: m.get_latent_representation(dense, batch_size=bs), 1, 0
                    ),
                    "elbo_s": _median_time(lambda: m.get_elbo(dense, batch_size=bs), 1, 0),
                },
            )
    m.engine = base
    # batch_size up to every cell: memory stays bounded (tasks are cut by the engine)
    for b in (1024, 16384, n):
        note(
            f"batch_size_{b}",
            {
                "elbo_s": _median_time(lambda b=b: m.get_elbo(backed, batch_size=b), 1),
                "gpu_peak_mb": mem.peak_mb,
            },
        )
    # the marginal LL: samples per pass (None: the engine's chunk)
    idx = np.arange(min(1024, n))
    for per_pass in args.per_pass:
        kw = {} if per_pass is None else {"n_mc_samples_per_pass": per_pass}
        try:
            t = _median_time(
                lambda kw=kw: m.get_marginal_ll(
                    csr, indices=idx, n_mc_samples=1000, batch_size=len(idx), **kw
                ),
                2,
            )
            note(f"mll_per_pass_{per_pass}", {"s": t, "gpu_peak_mb": mem.peak_mb})
        except Exception as e:
            note(f"mll_per_pass_{per_pass}", {"error": f"{type(e).__name__}: {e}"[:500]})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", choices=["smoke", "agree", "sizes", "profile"])
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--bundle", default="pbmc_scvi")
    p.add_argument("--data", help="h5ad of the profile (benchmarks/make_data.py)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument(
        "--per-pass",
        type=lambda v: None if v == "auto" else int(v),
        nargs="+",
        default=[None, 16, 64, 256, 1000],
        help="marginal LL samples per pass",
    )
    p.add_argument("--max-log2-rows", type=int, default=22)
    p.add_argument("--max-samples", type=int, default=1000)
    p.add_argument("--device", default="cuda", help="cpu: a dry run of the script here")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    res = {"smoke": smoke, "agree": agree, "sizes": sizes, "profile": profile}[args.what](args)
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
