"""PEAKVI's sparse encoders against the dense ones, side by side in one process, alternating.

    python benchmarks/input_layer.py --model benchmarks/work/peakvi_wide \
        --data benchmarks/work/peakvi_wide_5000.h5ad

Loads the bundle twice (``input_layer="sparse"``: the first layer's product from the non-zero
entries, rows never densified; ``"dense"``: ONNX Runtime's product of the dense minibatch),
times the latent space, the per-cell ELBO and the depth factors ``--repeats`` rounds
alternating, and reports how far the two are apart (float32 rounding); peak memory is
``benchmarks/run.py``'s (a process per job). Needs a bundle with the sparse encoders
(PEAKVI on 10,000 regions or more, exported by this version) and its data, read backed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="benchmark model folder (with bundle/)")
    p.add_argument("--data", required=True, help="h5ad, read backed")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/)")
    args = p.parse_args()
    import anndata as ad
    import numpy as np

    import scvi_onnx

    bundle = Path(args.model) / "bundle"
    models = {c: scvi_onnx.load(bundle, input_layer=c) for c in ("dense", "sparse")}
    if models["sparse"].module.sparse is None:
        sys.exit(f"{bundle} has no sparse encoders: export it with this version")
    adata = ad.read_h5ad(args.data, backed="r")
    bs = args.batch_size
    jobs = {
        "latent": lambda m: m.get_latent_representation(adata, batch_size=bs),
        "elbo": lambda m: m.get_elbo(adata, return_mean=False, batch_size=bs),
        "depth": lambda m: m.get_library_size_factors(adata, batch_size=bs),
    }
    times: dict = {}
    values: dict = {}
    for _ in range(args.repeats):
        for choice, model in models.items():
            for name, job in jobs.items():
                t = time.perf_counter()
                values.setdefault(name, {})[choice] = job(model)
                times.setdefault(name, {}).setdefault(choice, []).append(
                    round(time.perf_counter() - t, 3)
                )
    report = {
        "model": str(args.model),
        "n_cells": adata.n_obs,
        "batch_size": bs,
        "density": float(
            models["sparse"].manifest.graphs["encoder_sparse"]["input_layer"].get("density", -1)
        ),
        "times": times,
        "speedup_of_medians": {
            k: round(float(np.median(v["dense"]) / np.median(v["sparse"])), 2)
            for k, v in times.items()
        },
        "max_abs_diff": {
            k: float(np.max(np.abs(np.asarray(v["dense"]) - np.asarray(v["sparse"]))))
            for k, v in values.items()
        },
    }
    out = (
        Path(args.out)
        if args.out
        else (
            Path(__file__).parent / "results" / f"input-layer-{time.strftime('%Y%m%d-%H%M%S')}.json"
        )
    )
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    print(f"written {out}")


if __name__ == "__main__":
    main()
