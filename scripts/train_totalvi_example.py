"""Train the shipped example TOTALVI on the real CITE-seq PBMC cells and export it to models/.

    python scripts/train_totalvi_example.py

Reads ``models/example/pbmc_cite.h5ad`` (400 cells, 2,000 genes, 29 surface proteins of which
pbmc_10k measured 14: a protein_batch_mask; see ``make_cite_example_data.py``). Writes
``models/pbmc_totalvi_torch/`` (the scvi-tools model folder, for parity tests) and
``models/pbmc_totalvi/`` (the scvi-onnx bundle). Fixed seed; CPU.

    python scripts/train_totalvi_example.py --export-only   # re-export the saved model only
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=str(ROOT / "models" / "example" / "pbmc_cite.h5ad"))
    p.add_argument("--out", default=str(ROOT / "models"))
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--export-only",
        action="store_true",
        help="re-export models/pbmc_totalvi from models/pbmc_totalvi_torch (no training)",
    )
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import anndata as ad
    import scvi

    from scvi_onnx.exporter import export_model

    out = Path(args.out)
    if args.export_only:
        # the saved folder with its training cells (the export's real probe cells)
        export_model(
            out / "pbmc_totalvi_torch",
            out / "pbmc_totalvi",
            adata=ad.read_h5ad(args.data),
            overwrite=True,
            seed=args.seed,
        )
        print(f"wrote {out / 'pbmc_totalvi'}")
        return
    scvi.settings.seed = args.seed
    adata = ad.read_h5ad(args.data)
    scvi.model.TOTALVI.setup_anndata(
        adata, protein_expression_obsm_key="protein_expression", batch_key="batch"
    )
    model = scvi.model.TOTALVI(adata, n_latent=10, n_hidden=128)
    model.train(
        max_epochs=args.epochs,
        accelerator="cpu",
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
        reduce_lr_on_plateau=False,  # scvi-tools' LR monitor needs a logger
        early_stopping=False,
    )
    model.save(str(out / "pbmc_totalvi_torch"), overwrite=True, save_anndata=False)
    export_model(model, out / "pbmc_totalvi", overwrite=True, seed=args.seed)
    print(f"wrote {out / 'pbmc_totalvi_torch'} and {out / 'pbmc_totalvi'}")


if __name__ == "__main__":
    main()
