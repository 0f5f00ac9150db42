"""Record scvi-tools' per-cell values for the shipped bundle, under the runtime's noise.

    python scripts/record_shipped_reference.py

Loads ``models/pbmc_scvi_torch`` with scvi-tools on ``models/example/pbmc_query.h5ad`` (its genes
put in the model's order), feeds torch the runtime's Monte-Carlo draws (``tests.conftest
.same_noise``, seed ``SEED``) and writes ``tests/data/shipped_reference.npz``:

- ``latent_mean`` / ``latent_var``: ``get_latent_representation(return_dist=True)`` of the
  first ``N_LATENT`` cells;
- ``elbo`` / ``reconstruction_loss``: per-cell ``get_elbo`` / ``get_reconstruction_error``
  (``return_mean=False``) of every cell, one posterior draw;
- ``marginal_ll``: per-cell ``get_marginal_ll`` of the first ``N_MLL`` cells with
  ``N_MC_SAMPLES`` samples;
- what it was recorded from: the seed, sample counts, the sha256 of the bundle's manifest and
  of the query file, and the versions.

tests/runtime/api/test_shipped_reference.py compares the runtime with it without torch. Re-run
after re-exporting the shipped bundle (the test refuses a reference recorded for another
manifest).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEED = 0
N_LATENT = 50
N_MLL = 32
N_MC_SAMPLES = 20


def record() -> dict[str, np.ndarray]:
    import anndata as ad
    import scvi
    import torch

    import scvi_onnx
    from scvi_onnx.bundle import format as F
    from scvi_onnx.bundle import sha256_file
    from tests.conftest import EXAMPLE_H5AD, SHIPPED_BUNDLE, SHIPPED_TORCH, same_noise

    om = scvi_onnx.load(SHIPPED_BUNDLE, device="cpu", seed=SEED)  # the noise's seed only
    query = ad.read_h5ad(EXAMPLE_H5AD)
    ordered = query[:, list(om.genes)].copy()  # scvi-tools needs the training gene order
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # load() sets the query up with the saved registry (the training batch categories)
        ref = scvi.model.SCVI.load(str(SHIPPED_TORCH), adata=ordered, accelerator="cpu")
        n = ordered.n_obs
        mean, var = ref.get_latent_representation(ordered[:N_LATENT].copy(), return_dist=True)
        with same_noise(ref, om, n, 1):
            elbo = ref.get_elbo(ordered, batch_size=n, return_mean=False).numpy()
        with same_noise(ref, om, n, 1):
            rec = ref.get_reconstruction_error(ordered, batch_size=n, return_mean=False)
        sub = ordered[:N_MLL].copy()
        with same_noise(ref, om, N_MLL, N_MC_SAMPLES):
            mll = ref.get_marginal_ll(
                sub, n_mc_samples=N_MC_SAMPLES, batch_size=N_MLL, return_mean=False
            ).numpy()
    return {
        "latent_mean": np.asarray(mean),
        "latent_var": np.asarray(var),
        "elbo": elbo,
        "reconstruction_loss": rec["reconstruction_loss"].numpy(),
        "marginal_ll": mll,
        "seed": np.int64(SEED),
        "n_mc_samples": np.int64(N_MC_SAMPLES),
        "manifest_sha256": np.str_(sha256_file(SHIPPED_BUNDLE / F.MANIFEST_FILE)),
        "query_sha256": np.str_(sha256_file(EXAMPLE_H5AD)),
        "scvi_tools": np.str_(scvi.__version__),
        "torch": np.str_(torch.__version__),
    }


def main() -> None:
    from tests.conftest import SHIPPED_REFERENCE

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(SHIPPED_REFERENCE))
    args = p.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    arrays = record()
    with open(out, "wb") as f:
        np.savez_compressed(f, **arrays)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
