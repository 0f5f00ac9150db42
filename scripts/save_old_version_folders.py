"""Save small TOTALVI, PEAKVI, SCVI, LinearSCVI and SCANVI model folders with an older
scvi-tools, and what that version itself computes on them, for tests/exporter/test_old_versions.py.

Run it inside a virtual environment holding the older scvi-tools (PyPI has them; CPU torch):

    python3 -m venv /tmp/old && /tmp/old/bin/pip install "scvi-tools==1.1.6.post2" "torch==2.13.0"
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 /tmp/old/bin/python scripts/save_old_version_folders.py

(0.20-1.1 also want jax/jaxlib 0.4.30, flax 0.8.5, optax 0.2.2, chex 0.1.86, numpyro 0.15.0,
orbax-checkpoint 0.5.20, setuptools < 70 and pandas < 3 to import.) It writes
``tests/data/old_versions/<version>/<model>/`` (``model.pt``, or ``model_params.pt`` and
``attr.pkl`` before 0.15, + ``adata.h5ad``, as ``model.save(save_anndata=True)`` writes
them) and ``reference.npz``: the saving version's latent mean, its posterior mean and
variance where it has ``return_dist``, and its ELBO (the mean over cells) under ten torch
seeds.

Data: the first 120 cells of each batch of models/example/pbmc_cite.h5ad (real 10x CITE-seq
PBMC cells; 29 antibodies, 15 missing in pbmc_10k: a protein mask) x its first 100 genes, and
of models/example/pbmc_peaks.h5ad x its first 300 regions, and of
models/example/pbmc_train.h5ad x its first 100 genes (SCANVI's labels: n_genes above or below
the median, every third cell unlabelled). scvi-tools 1.0-1.1 diverge (NaN)
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


def _python_3_11_shim() -> None:
    """pytorch-lightning < 1.6 (scvi-tools < 0.17) formats its str enums into attribute
    names, which Python 3.11 formats as ``TrainerFn.FITTING``: give them their value back."""
    try:
        from pytorch_lightning.trainer import states
    except ImportError:
        return
    for name in ("TrainerFn", "RunningStage", "TrainerStatus", "TrainerState"):
        enum = getattr(states, name, None)
        if enum is not None and issubclass(enum, str):
            enum.__format__ = lambda self, spec: format(self.value, spec)
            enum.__str__ = lambda self: str(self.value)


def train(model, **kw) -> None:
    import pytorch_lightning

    quiet = (
        {"enable_progress_bar": False}
        if _release(pytorch_lightning.__version__) >= (1, 5)
        else {"progress_bar_refresh_rate": 0}
    )
    args = dict(max_epochs=5, **quiet, **kw)
    if "accelerator" in inspect.signature(model.train).parameters:
        model.train(accelerator="cpu", **args)
    else:
        model.train(use_gpu=False, **args)


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("+")[0].split(".")[:2])


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


def setup(cls, adata: ad.AnnData, **kw) -> None:
    """``cls.setup_anndata`` (scvi-tools >= 0.15) or the global ``scvi.data.setup_anndata``."""
    setup_fn = getattr(cls, "setup_anndata", None) or scvi.data.setup_anndata
    if "unlabeled_category" not in inspect.signature(setup_fn).parameters:
        kw.pop("unlabeled_category", None)  # SCANVI < 0.15 takes it in its constructor
    setup_fn(adata, **kw)


def save(model, folder: Path, refs: dict, kind: str) -> None:
    try:
        model.save(str(folder / kind), overwrite=True, save_anndata=True)
    except TypeError:
        # scvi-tools < 0.15's TOTALVI keeps a dict with integer keys in uns["_scvi"], which
        # anndata cannot write: the folder without its AnnData, the cells beside it
        for file in (folder / kind).glob("*.h5ad"):
            file.unlink()  # what the failed write left
        model.save(str(folder / kind), overwrite=True, save_anndata=False)
        cells = model.adata.copy()
        cells.uns.pop("_scvi", None)
        cells.write_h5ad(folder / f"{kind}.h5ad")
    refs |= {f"{kind}_{k}": v for k, v in reference(model).items()}


def main() -> None:
    version = scvi.__version__
    out = ROOT / "tests" / "data" / "old_versions" / version
    warnings.simplefilter("ignore")
    _python_3_11_shim()
    refs: dict = {}
    scanvi_setup = getattr(scvi.model.SCANVI, "setup_anndata", scvi.data.setup_anndata)
    pre_0_15 = "unlabeled_category" not in inspect.signature(scanvi_setup).parameters

    cite = subset(ad.read_h5ad(EXAMPLE / "pbmc_cite.h5ad"), 100)
    setup(
        scvi.model.TOTALVI,
        cite,
        protein_expression_obsm_key="protein_expression",
        batch_key="batch",
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
    save(model, out, refs, "totalvi")

    peaks = subset(ad.read_h5ad(EXAMPLE / "pbmc_peaks.h5ad"), 300)
    setup(scvi.model.PEAKVI, peaks, batch_key="batch")
    scvi.settings.seed = 0
    model = scvi.model.PEAKVI(peaks)
    train(model)
    save(model, out, refs, "peakvi")

    # SCVI (learned library size, per-batch dispersion), LinearSCVI and SCANVI on RNA counts
    rna = subset(ad.read_h5ad(EXAMPLE / "pbmc_train.h5ad"), 100)
    n_genes = rna.obs["n_genes"].to_numpy()
    labels = np.where(n_genes < np.quantile(n_genes, 0.5), "low", "high").astype(object)
    labels[::3] = "Unknown"
    rna.obs["kind"] = labels
    for kind, cls, kw in (
        ("scvi", scvi.model.SCVI, dict(use_observed_lib_size=False, dispersion="gene-batch")),
        ("linearscvi", scvi.model.LinearSCVI, {}),
        ("scanvi", scvi.model.SCANVI, {}),
    ):
        a = rna.copy()
        extra = dict(labels_key="kind", unlabeled_category="Unknown") if kind == "scanvi" else {}
        setup(cls, a, batch_key="batch", **extra)
        scvi.settings.seed = 0
        if kind == "scanvi" and pre_0_15:
            kw = dict(kw, unlabeled_category="Unknown")
        model = cls(a, n_hidden=16, n_latent=4, **kw)
        train(model)
        save(model, out, refs, kind)

    np.savez_compressed(out / "reference.npz", version=np.array(version), **refs)
    print(f"wrote {out}: {sorted(refs)}")


if __name__ == "__main__":
    main()
