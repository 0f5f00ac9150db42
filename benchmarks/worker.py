"""One benchmark job in its own process: one side (scvi-tools or scvi-onnx), one method.

Prints one JSON line: timings of each repeat, and the process's peak RSS.

The scvi-tools side loads the model with its own class (the bundle's ``model_class``) and calls
its method. scvi-tools 1.4.2 has no ``get_marginal_ll`` for PEAKVI: its marginal-LL reference is
:func:`peakvi_marginal_ll`, the same importance-sampling estimate written in torch over
scvi-tools' own PEAKVAE (its inference, generative and ``get_reconstruction_loss``), samples
batched per forward pass as the runtime batches them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import time
import warnings


def _likelihood_kernel() -> str:
    """Which likelihood kernel (NB / ZINB, PEAKVI's Bernoulli) the scvi-onnx side runs:
    "compiled" or "numpy" ("numpy" for versions before the compiled one)."""
    try:
        from scvi_onnx.maths import native
    except ImportError:
        return "numpy"
    return "compiled" if native.available() else "numpy"


def _peak_rss_mb() -> float:
    """Peak RSS of this process image (VmHWM resets at exec; ru_maxrss does not)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _reset_peak_rss() -> None:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux: ``clear_refs`` 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class DeviceMemory:
    """Peak memory in use on GPU 0 while this process runs (NVML, polled every 2 ms in a
    thread): the whole device's use, so one job at a time. ``peak_mb`` is None without NVML."""

    def __init__(self):
        self.peak_mb = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no NVML (nvidia-ml-py) or no GPU: nothing to report
            return
        import threading

        self.peak_mb = self._used()
        threading.Thread(target=self._poll, daemon=True).start()  # until the process ends

    def _used(self) -> float:
        return self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used / 2**20

    def _poll(self) -> None:
        while True:
            time.sleep(0.002)
            self.peak_mb = max(self.peak_mb, self._used())


def peakvi_marginal_ll(model, adata, indices, n_mc: int, batch_size: int, per_pass=None):
    """Mean over cells of ``log mean_s exp(log N(u_s; 0, I) + log p(x | z_s) - log q(u_s | x))``
    with scvi-tools' PEAKVAE in torch (``per_pass`` samples per decoder call; default: about
    2^24 decoder outputs per call)."""
    import math

    import torch

    m = model.module
    prior = torch.distributions.Normal(0.0, 1.0)
    out = []
    with torch.inference_mode():
        for tensors in model._make_data_loader(adata=adata, indices=indices, batch_size=batch_size):
            inf = m.inference(**m._get_inference_input(tensors))
            qz, d = inf["qz"], inf["d"]
            f = torch.sigmoid(m.region_factors) if m.region_factors is not None else 1
            x = tensors["X"].to(qz.loc.device)
            n, R = x.shape
            step = per_pass or max(1, (1 << 24) // (n * R))
            log_w = []
            for s0 in range(0, n_mc, step):
                u = qz.sample((min(step, n_mc - s0),))
                z = m.z_encoder.z_transformation(u)
                px = m.generative(**m._get_generative_input(tensors, {"z": z, "qz": qz}))["px"]
                # torch's BCE wants the target in the input's shape
                rl = m.get_reconstruction_loss(px, d, f, x.expand(px.shape[0], -1, -1))
                log_w.append(prior.log_prob(u).sum(-1) - qz.log_prob(u).sum(-1) - rl)
            log_w = torch.cat(log_w)
            out.append(torch.logsumexp(log_w, 0) - math.log(n_mc))
    return float(torch.cat(out).mean())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--side", choices=["scvi", "onnx"], required=True)
    p.add_argument("--task", choices=["latent", "elbo", "rec", "mll"], required=True)
    p.add_argument("--model", required=True, help="benchmark model folder (torch/, bundle/)")
    p.add_argument("--data", required=True)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mll-cells", type=int, default=256)
    p.add_argument("--n-mc", type=int, default=1000)
    p.add_argument("--per-pass", type=int, default=None)
    p.add_argument("--backed", action="store_true")
    p.add_argument("--dense", action="store_true", help="densify X after reading (in memory)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = p.parse_args()
    gpu_memory = DeviceMemory() if args.device == "cuda" else None
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    t0 = time.perf_counter()
    import anndata as ad
    import numpy as np

    manifest = json.loads(open(f"{args.model}/bundle/manifest.json").read())
    model_class = manifest["model_class"]
    if args.side == "scvi":
        import scvi
        import torch

        adata = ad.read_h5ad(args.data)
        if args.dense:
            adata.X = adata.X.toarray()
        accelerator = "gpu" if args.device == "cuda" else "cpu"
        cls = getattr(scvi.model, model_class)
        model = cls.load(f"{args.model}/torch", adata=adata, accelerator=accelerator)
        info = {
            "engine": f"scvi-tools {scvi.__version__}",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "provider": f"torch {accelerator}",
        }
    else:
        import onnxruntime as ort

        import scvi_onnx

        adata = ad.read_h5ad(args.data, backed="r" if args.backed else None)
        if args.dense:
            adata.X = adata.X.toarray()
        model = scvi_onnx.load(f"{args.model}/bundle", device=args.device)
        info = {
            "engine": f"scvi-onnx {scvi_onnx.__version__}",
            "onnxruntime": ort.__version__,
            # (_n_workers: scvi-onnx 0.2, for benchmarks/versions.py)
            "threads": getattr(getattr(model, "engine", None), "n_workers", None)
            or getattr(model, "_n_workers", None),
            "provider": model.provider,
            "likelihood_kernel": _likelihood_kernel(),
        }
    setup_s = time.perf_counter() - t0
    bs = args.batch_size
    mll_idx = np.arange(min(args.mll_cells, adata.n_obs))

    def job():
        if args.task == "latent":
            return model.get_latent_representation(adata, batch_size=bs)
        if args.task == "elbo":
            return model.get_elbo(adata, batch_size=bs)
        if args.task == "rec":
            return model.get_reconstruction_error(adata, batch_size=bs)
        if args.side == "scvi" and model_class == "PEAKVI":
            return peakvi_marginal_ll(
                model, adata, mll_idx, args.n_mc, len(mll_idx), per_pass=args.per_pass
            )
        kw = {} if args.per_pass is None else {"n_mc_samples_per_pass": args.per_pass}
        return model.get_marginal_ll(
            adata, indices=mll_idx, n_mc_samples=args.n_mc, batch_size=len(mll_idx), **kw
        )

    # the marginal LL's matmul floor, timed after each repeat in this process (floor.py)
    floor_config = None
    # (where the peak RSS cannot be reset, the orchestrator times the floor: run.py)
    if (
        args.task == "mll"
        and args.side == "onnx"
        and args.device == "cpu"
        and os.access("/proc/self/clear_refs", os.W_OK)
    ):
        from floor import matmul_floor

        floor_config = manifest["config"]
    times, floor_times, peaks = [], [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        job()
        times.append(time.perf_counter() - t)
        if floor_config is not None:
            # the floor's product (8192 x n_input floats: 517 MB for 15,792 regions) must not
            # count in the job's peak: read the peak now, reset it after the floor
            peaks.append(_peak_rss_mb())
            floor_times.append(matmul_floor(floor_config, len(mll_idx) * args.n_mc)["floor_s"])
            _reset_peak_rss()
    print(
        json.dumps(
            {
                "side": args.side,
                "task": args.task,
                "times": times,
                "median": float(np.median(times)),
                "setup_s": setup_s,
                "peak_rss_mb": max([*peaks, _peak_rss_mb()]),
                "n_cells": int(adata.n_obs),
                "batch_size": bs,
                "model_class": model_class,
                **({"floor_times": floor_times} if floor_times else {}),
                **({"gpu_peak_mb": gpu_memory.peak_mb} if gpu_memory else {}),
                **info,
            }
        )
    )


if __name__ == "__main__":
    main()
