"""Train the shipped example SCVI on the real PBMC cells and export it to models/.

    python scripts/train_example_model.py

Writes ``models/pbmc_scvi_torch/`` (the scvi-tools model folder, for parity tests) and
``models/pbmc_scvi/`` (the scvi-onnx bundle). Fixed seed; CPU.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=str(ROOT / "models" / "example" / "pbmc_train.h5ad"))
    p.add_argument("--out", default=str(ROOT / "models"))
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import anndata as ad
    import scvi

    from scvi_onnx.exporter import export_model

    scvi.settings.seed = args.seed
    adata = ad.read_h5ad(args.data)
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    model = scvi.model.SCVI(adata, n_latent=10, n_hidden=128, gene_likelihood="zinb")
    model.train(
        max_epochs=args.epochs,
        accelerator="cpu",
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
    )
    out = Path(args.out)
    model.save(str(out / "pbmc_scvi_torch"), overwrite=True, save_anndata=False)
    export_model(model, out / "pbmc_scvi", overwrite=True, seed=args.seed)
    print(f"wrote {out / 'pbmc_scvi_torch'} and {out / 'pbmc_scvi'}")


if __name__ == "__main__":
    main()
