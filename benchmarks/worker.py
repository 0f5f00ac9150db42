"""One benchmark job in its own process: one side (scvi-tools or scvi-onnx), one method.

Prints one JSON line: timings of each repeat, and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time
import warnings


def _peak_rss_mb() -> float:
    """Peak RSS of this process image (VmHWM resets at exec; ru_maxrss does not)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def model_class(model_dir: str) -> str:
    """The scvi-tools model class of a benchmark model (its bundle's manifest says)."""
    with open(f"{model_dir}/bundle/manifest.json") as f:
        return json.load(f)["model_class"]


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
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    t0 = time.perf_counter()
    import anndata as ad
    import numpy as np

    if args.side == "scvi":
        import scvi
        import torch

        adata = ad.read_h5ad(args.data)
        if args.dense:
            adata.X = adata.X.toarray()
        accelerator = "gpu" if args.device == "cuda" else "cpu"
        cls = getattr(scvi.model, model_class(args.model))
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
            "threads": model.engine.n_workers,
            "provider": model.provider,
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
        kw = {} if args.per_pass is None else {"n_mc_samples_per_pass": args.per_pass}
        return model.get_marginal_ll(
            adata, indices=mll_idx, n_mc_samples=args.n_mc, batch_size=len(mll_idx), **kw
        )

    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        job()
        times.append(time.perf_counter() - t)
    print(
        json.dumps(
            {
                "side": args.side,
                "task": args.task,
                "times": times,
                "median": float(np.median(times)),
                "setup_s": setup_s,
                "peak_rss_mb": _peak_rss_mb(),
                "n_cells": int(adata.n_obs),
                "batch_size": bs,
                **info,
            }
        )
    )


if __name__ == "__main__":
    main()
