"""Rows per ONNX Runtime call, side by side: no floor against ``MIN_CALL_ROWS``, alternating.

    python benchmarks/call_rows.py --model benchmarks/work/peakvi_wide \
        --data benchmarks/work/peakvi_wide_5000.h5ad

Times the latent space, the per-cell ELBO and a marginal LL (``--mll-cells`` cells x
``--n-mc`` samples) in one process, with the floor on rows per call patched to 1 (the element
bounds alone, as before the floor) and to its value, ``--repeats`` rounds alternating, and
checks that both give the same numbers bit for bit. Needs a model folder built by
``benchmarks/run.py`` (``bundle/``) and its data.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="benchmark model folder (with bundle/)")
    p.add_argument("--data", required=True, help="h5ad, read backed")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--mll-cells", type=int, default=64)
    p.add_argument("--n-mc", type=int, default=100)
    args = p.parse_args()
    import anndata as ad
    import numpy as np

    import scvi_onnx
    import scvi_onnx.methods.engine as engine
    import scvi_onnx.methods.marginal_ll as marginal_ll

    floor = engine.MIN_CALL_ROWS
    model = scvi_onnx.load(Path(args.model) / "bundle")
    adata = ad.read_h5ad(args.data, backed="r")
    idx = np.arange(min(args.mll_cells, adata.n_obs))
    jobs = {
        "latent": lambda: model.get_latent_representation(adata),
        "elbo": lambda: model.get_elbo(adata, return_mean=False),
        "mll": lambda: model.get_marginal_ll(
            adata, indices=idx, n_mc_samples=args.n_mc, return_mean=False
        ),
    }
    times: dict = {}
    values: dict = {}
    for _ in range(args.repeats):
        for rows in (1, floor):
            engine.MIN_CALL_ROWS = marginal_ll.MIN_CALL_ROWS = rows
            for name, job in jobs.items():
                t = time.perf_counter()
                value = job()
                times.setdefault(name, {}).setdefault(rows, []).append(time.perf_counter() - t)
                values.setdefault(name, {})[rows] = value
    engine.MIN_CALL_ROWS = marginal_ll.MIN_CALL_ROWS = floor
    report = {
        "model": str(args.model),
        "n_cells": adata.n_obs,
        "n_features": model.module.n_features,
        "min_call_rows": floor,
        "jobs": {
            name: {
                "seconds_without_floor": times[name][1],
                "seconds_with_floor": times[name][floor],
                "same_numbers": bool(np.array_equal(values[name][1], values[name][floor])),
            }
            for name in jobs
        },
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
