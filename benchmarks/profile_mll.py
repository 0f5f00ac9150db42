"""Where the marginal LL's time goes: decoder (ONNX Runtime) vs likelihood (the kernel).

    python benchmarks/profile_mll.py --model benchmarks/work/pbmc_zinb --threads 1

Times the runtime's own steps (seconds summed over worker threads) for ``--cells`` cells x
``--n-mc`` samples, after a warm-up call: each graph's calls by file (``graph decoder``,
whichever way the model's module calls it), the likelihood kernels and the module's steps
(``encode`` holds ``graph encoder``'s time: the lines overlap). Needs a model folder built by
``benchmarks/run.py`` (``bundle/``) and its data (``<work>/<name>_<n>.h5ad``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="benchmark model folder (with bundle/)")
    p.add_argument("--data", help="h5ad (default: <model>_20000.h5ad beside the folder)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cells", type=int, default=256)
    p.add_argument("--n-mc", type=int, default=1000)
    args = p.parse_args()
    import anndata as ad
    import numpy as np

    import scvi_onnx

    model_dir = Path(args.model)
    data = args.data or model_dir.parent / f"{model_dir.name}_20000.h5ad"
    adata = ad.read_h5ad(data, backed="r")
    model = scvi_onnx.load(model_dir / "bundle", device="cpu", n_threads=args.threads)
    spent: dict[str, float] = {}

    def timed(owner, name, label):
        """Time ``owner.name`` under ``label`` (a string, or a function of the call's first
        argument: a method's instance)."""
        fn = getattr(owner, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                key = label(a[0]) if callable(label) else label
                spent[key] = spent.get(key, 0.0) + time.perf_counter() - t

        setattr(owner, name, wrapper)

    from scvi_onnx.maths.likelihood import BernoulliScorer, MinibatchScorer
    from scvi_onnx.sessions import Graph

    # the module's pieces (on the instance), each graph's calls (by file: every model's
    # decoder, however its module calls it) and the likelihood kernels
    for name in ("encode", "z_draws", "library", "prepare"):
        if hasattr(model.module, name):  # PEAKVI has no library size
            timed(model.module, name, name)
    timed(Graph, "run", lambda graph: f"graph {graph.path.stem}")
    timed(MinibatchScorer, "score", "likelihood")
    timed(BernoulliScorer, "score", "likelihood")
    idx = np.arange(min(args.cells, adata.n_obs))
    kw = {"indices": idx, "batch_size": len(idx)}
    model.get_marginal_ll(adata, n_mc_samples=min(args.n_mc, 100), **kw)  # warm-up
    spent.clear()
    t = time.perf_counter()
    value = model.get_marginal_ll(adata, n_mc_samples=args.n_mc, **kw)
    wall = time.perf_counter() - t
    print(f"{model_dir.name}: {len(idx)} cells x {args.n_mc} samples, {args.threads} thread(s)")
    print(f"wall {wall:.3f} s, marginal LL {value:.4f}")
    for name, s in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"  {name:16s} {s:7.3f} s (summed over threads)")


if __name__ == "__main__":
    main()
