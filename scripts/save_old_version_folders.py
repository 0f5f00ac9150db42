"""Save small TOTALVI and PEAKVI model folders with an older scvi-tools, and what that version
itself computes on them, for tests/exporter/test_old_versions.py.

Run it inside a virtual environment holding the older scvi-tools (PyPI has them; CPU torch):

    python3 -m venv /tmp/old && /tmp/old/bin/pip install "scvi-tools==1.1.6.post2" "torch==2.13.0"
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 /tmp/old/bin/python scripts/save_old_version_folders.py

(0.20-1.1 also want jax/jaxlib 0.4.30, flax 0.8.5, optax 0.2.2, chex 0.1.86, numpyro 0.15.0,
orbax-checkpoint 0.5.20, setuptools < 70 and pandas < 3 to import.) It writes
``tests/data/old_versions/<version>/{totalvi,peakvi}/`` (``model.pt`` + ``adata.h5ad``, as
``model.save(save_anndata=True)`` writes them) and ``reference.npz``: the saving version's
latent mean, its posterior mean and variance where it has ``return_dist``, and its ELBO (the
mean over cells) under ten torch seeds.

Data: the first 120 cells of each batch of models/example/pbmc_cite.h5ad (real 10x CITE-seq
PBMC cells; 29 antibodies, 15 missing in pbmc_10k: a protein mask) x its first 100 genes, and
of models/example/pbmc_peaks.h5ad x its first 300 regions. scvi-tools 1.0-1.1 diverge (NaN)
while fitting TOTALVI with its empirical background prior on these cells, so their TOTALVI
uses the fixed prior.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import scvi
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "models" / "example"
N_SEEDS = 10


def subset(a: ad.AnnData, n_vars: int) -> ad.AnnData:
    cells = np.concatenate(
        [np.flatnonzero(a.obs["batch"] == b)[:60] for b in a.obs["batch"].unique()]
    )
    return a[cells, :n_vars].copy()


def train(model, **kw) -> None:
    args = dict(max_epochs=5, enable_progress_bar=False, **kw)
    if "accelerator" in inspect.signature(model.train).parameters:
        model.train(accelerator="cpu", **args)
    else:
        model.train(use_gpu=False, **args)


def reference(model) -> dict[str, np.ndarray]:
    out = {"latent": model.get_latent_representation()}
    if "return_dist" in inspect.signature(model.get_latent_representation).parameters:
        out["qz_m"], out["qz_v"] = model.get_latent_representation(return_dist=True)
    elbo = []
    for s in range(N_SEEDS):
        torch.manual_seed(s)
        elbo.append(float(model.get_elbo()))
    out["elbo"] = np.array(elbo)
    return out


def main() -> None:
    version = scvi.__version__
    out = ROOT / "tests" / "data" / "old_versions" / version
    warnings.simplefilter("ignore")
    refs = {}

    cite = subset(ad.read_h5ad(EXAMPLE / "pbmc_cite.h5ad"), 100)
    scvi.model.TOTALVI.setup_anndata(
        cite, protein_expression_obsm_key="protein_expression", batch_key="batch"
    )
    scvi.settings.seed = 0
    fixed = version.startswith(("1.0.", "1.1."))
    model = scvi.model.TOTALVI(
        cite,
        n_hidden=16,
        n_latent=4,
        **({"empirical_protein_background_prior": False} if fixed else {}),
    )
    # torch 2.13's ReduceLROnPlateau lacks the verbose= that older versions pass it
    train(model, reduce_lr_on_plateau=False)
    model.save(str(out / "totalvi"), overwrite=True, save_anndata=True)
    refs |= {f"totalvi_{k}": v for k, v in reference(model).items()}

    peaks = subset(ad.read_h5ad(EXAMPLE / "pbmc_peaks.h5ad"), 300)
    scvi.model.PEAKVI.setup_anndata(peaks, batch_key="batch")
    scvi.settings.seed = 0
    model = scvi.model.PEAKVI(peaks)
    train(model)
    model.save(str(out / "peakvi"), overwrite=True, save_anndata=True)
    refs |= {f"peakvi_{k}": v for k, v in reference(model).items()}

    np.savez_compressed(out / "reference.npz", version=np.array(version), **refs)
    print(f"wrote {out}: {sorted(refs)}")


if __name__ == "__main__":
    main()
