"""Benchmark models: train/build them with scvi-tools and export them (cached in a work folder).

- ``pbmc_zinb``: the shipped example (models/pbmc_scvi_torch, models/pbmc_scvi).
- ``pbmc_nb``: the same data, NB likelihood, 2 layers (trained here, fixed seed).
- ``pbmc_totalvi``: the shipped TOTALVI example (models/pbmc_totalvi_torch, models/pbmc_totalvi):
  the same cells with their 29 surface proteins (models/example/pbmc_cite.h5ad).
- ``census``: shaped like the CELLxGENE Census scVI model: 8,000 genes, 2 layers of 128,
  latent 50, NB, 10,000 batches, encode_covariates False (briefly trained on the real cells,
  whose batch labels are spread over the 10,000 categories).
- ``pbmc_peakvi``: the shipped example PEAKVI (models/pbmc_peakvi_torch, models/pbmc_peakvi):
  2,000 regions (models/example/pbmc_peaks.h5ad).
- ``peakvi_atac``: PEAKVI shaped like a scATAC model: the 15,792 genes the two real PBMC files
  share, binarised, as regions (~11% accessible per cell, as peak matrices), two batches,
  scvi-tools' PEAKVI defaults (n_hidden sqrt(R) = 125, n_latent 11, 2 + 2 layers), briefly
  trained.
- ``peakvi_wide``: PEAKVI as wide as a scATAC peak set: 100,000 regions, a documented synthetic
  recipe over the real cells (region ``j`` copies gene ``j mod 15,792`` of the same files, each
  region keeping each of its gene's UMIs with probability 0.3, independently, seed 0;
  accessible where one is kept: ~4% accessible per cell), two batches, scvi-tools' PEAKVI
  defaults (n_hidden sqrt(R) = 316, n_latent 17: 126 MB of weights per graph), briefly
  trained. Run it with fewer cells (``--n-cells 5000``): scvi-tools needs ~3 s per 1,000.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def _train(adata, out: Path, epochs: int, model_class: str = "SCVI", **model_kw) -> None:
    import scvi

    from scvi_onnx.exporter import export_model
    from scvi_onnx.exporter.parity import QUIET_TRAINING

    scvi.settings.seed = 0
    model = getattr(scvi.model, model_class)(adata, **model_kw)
    model.train(max_epochs=epochs, **QUIET_TRAINING)
    model.save(str(out / "torch"), overwrite=True, save_anndata=False)
    export_model(model, out / "bundle", overwrite=True)


def _both_batches():
    """The real cells of the two shared files on the genes they share, ``obs['batch']`` naming
    the file (the PEAKVI benchmark models' source)."""
    import anndata as ad

    a5 = ad.read_h5ad(SHARED / "pbmc_5k_protein_v3.h5ad")
    a10 = ad.read_h5ad(SHARED / "pbmc_10k_protein_v3.h5ad")
    common = a5.var_names.intersection(a10.var_names, sort=False)
    return ad.concat(
        [a5[:, common], a10[:, common]],
        label="batch",
        keys=["pbmc_5k", "pbmc_10k"],
        index_unique="-",
    )


def _reexport_if_stale(out: Path) -> None:
    """Export the cached model again when its bundle is older than the exporter's code or came
    from another scvi-onnx version (the graphs the exporter writes change with them)."""
    import json

    import scvi_onnx

    manifest_path = out / "bundle" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    code = max(p.stat().st_mtime for p in (ROOT / "exporter").rglob("*.py"))
    if (
        manifest["versions"].get("scvi_onnx") != scvi_onnx.__version__
        or code > manifest_path.stat().st_mtime
    ):
        from scvi_onnx.exporter import export_model

        # with the model's cells where they are kept (build() writes them): a wide PEAKVI's
        # bundle records their share of non-zero values, which decides its sparse encoders
        source = out / "source.h5ad"
        adata = None
        if source.exists() and manifest["model_class"] == "PEAKVI":
            import anndata as ad

            adata = ad.read_h5ad(source)
        export_model(out / "torch", out / "bundle", adata=adata, overwrite=True)


def source_cells(name: str, work: Path) -> Path:
    """The real cells a model's benchmark data is drawn from."""
    if name in ("census", "peakvi_atac", "peakvi_wide"):
        return work / name / "source.h5ad"  # written by build()
    if name == "pbmc_totalvi":
        return ROOT / "models" / "example" / "pbmc_cite.h5ad"
    if name == "pbmc_peakvi":
        return ROOT / "models" / "example" / "pbmc_peaks.h5ad"
    return ROOT / "models" / "example" / "pbmc_train.h5ad"


#: Benchmark models that are shipped examples: (scvi-tools folder, bundle) in models/.
SHIPPED = {
    "pbmc_zinb": ("pbmc_scvi_torch", "pbmc_scvi"),
    "pbmc_totalvi": ("pbmc_totalvi_torch", "pbmc_totalvi"),
    "pbmc_peakvi": ("pbmc_peakvi_torch", "pbmc_peakvi"),
}


def build(name: str, work: Path) -> Path:
    """Return the model folder (with ``torch/`` and ``bundle/``), building it if needed."""
    if name in SHIPPED:
        out = work / name
        out.mkdir(parents=True, exist_ok=True)
        import shutil

        # always the shipped files (a few MB): a cached copy could be from an older export
        for src, dst in zip(SHIPPED[name], ("torch", "bundle"), strict=True):
            shutil.rmtree(out / dst, ignore_errors=True)
            shutil.copytree(ROOT / "models" / src, out / dst)
        return out
    out = work / name
    if (out / "bundle" / "manifest.json").exists():
        _reexport_if_stale(out)
        return out
    out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    import anndata as ad
    import pandas as pd
    import scvi

    if name == "pbmc_nb":
        adata = ad.read_h5ad(ROOT / "models" / "example" / "pbmc_train.h5ad")
        scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
        _train(adata, out, 100, gene_likelihood="nb", n_layers=2)
    elif name == "census":
        a5 = ad.read_h5ad(SHARED / "pbmc_5k_protein_v3.h5ad")
        a10 = ad.read_h5ad(SHARED / "pbmc_10k_protein_v3.h5ad")
        common = a5.var_names.intersection(a10.var_names, sort=False)
        both = ad.concat([a5[:, common], a10[:, common]], index_unique="-")
        top = np.argsort(-np.asarray(both.X.sum(0)).ravel(), kind="stable")[:8000]
        adata = both[:, top].copy()
        cats = [f"dataset_{i:05d}" for i in range(10_000)]
        rng = np.random.default_rng(0)
        adata.obs["dataset"] = pd.Categorical(
            np.array(cats)[rng.integers(0, 10_000, adata.n_obs)], categories=cats
        )
        adata.X = adata.X.astype(np.float32)
        import scipy.sparse as sp

        src = ad.AnnData(
            X=sp.csr_matrix(adata.X), obs=adata.obs[["dataset"]].copy(), var=adata.var[[]].copy()
        )
        src.write_h5ad(out / "source.h5ad")
        scvi.model.SCVI.setup_anndata(adata, batch_key="dataset")
        _train(
            adata,
            out,
            5,
            gene_likelihood="nb",
            n_layers=2,
            n_hidden=128,
            n_latent=50,
            encode_covariates=False,
            dropout_rate=0.1,
        )
    elif name == "peakvi_atac":
        import scipy.sparse as sp

        both = _both_batches()
        x = sp.csr_matrix(both.X.astype(np.float32))
        x.data = (x.data > 0).astype(np.float32)
        adata = ad.AnnData(X=x, obs=both.obs[["batch"]].copy(), var=both.var[[]].copy())
        adata.write_h5ad(out / "source.h5ad")
        scvi.model.PEAKVI.setup_anndata(adata, batch_key="batch")
        _train(adata, out, 20, model_class="PEAKVI")
    elif name == "peakvi_wide":
        import scipy.sparse as sp

        both = _both_batches()
        genes = sp.coo_matrix(both.X.astype(np.int64))
        n_genes, n_regions = genes.shape[1], 100_000
        # every non-zero (cell, gene) once per region copying that gene: regions g, g + G, ...
        copies = (n_regions - genes.col + n_genes - 1) // n_genes
        cell = np.repeat(genes.row, copies)
        count = np.repeat(genes.data, copies)
        first = np.repeat(np.cumsum(copies) - copies, copies)
        region = np.repeat(genes.col, copies) + (np.arange(len(cell)) - first) * n_genes
        kept = np.random.default_rng(0).binomial(count, 0.3) > 0
        x = sp.csr_matrix(
            (np.ones(int(kept.sum()), np.float32), (cell[kept], region[kept])),
            shape=(genes.shape[0], n_regions),
        )
        var = pd.DataFrame(
            index=[f"chr{1 + j % 22}:{1000 * j}-{1000 * j + 500}" for j in range(n_regions)]
        )
        adata = ad.AnnData(X=x, obs=both.obs[["batch"]].copy(), var=var)
        adata.write_h5ad(out / "source.h5ad")
        scvi.model.PEAKVI.setup_anndata(adata, batch_key="batch")
        _train(adata, out, 20, model_class="PEAKVI")
    else:
        raise ValueError(f"unknown benchmark model {name!r}")
    return out


if __name__ == "__main__":
    # python benchmarks/models.py NAME WORK: build in a process of its own (run.py does this,
    # so that training / export never inflate the peak memory of the jobs it forks)
    import sys

    print(build(sys.argv[1], Path(sys.argv[2])))
