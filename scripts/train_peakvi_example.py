"""Train the shipped example PEAKVI on the example accessibility data and export it to models/.

    python scripts/train_peakvi_example.py

Data: models/example/pbmc_peaks.h5ad (400 real PBMC cells x 2,000 regions; see
scripts/make_peaks_data.py for how real counts stand in for a peak matrix). Model: scvi-tools'
PEAKVI defaults (n_hidden = sqrt(2000) = 44, n_latent = sqrt(44) = 6, 2 + 2 layers, layer
norm, depth and region factors), ``batch_key="batch"``, scvi-tools' PEAKVI training defaults
(AdamW, lr 1e-4, early stopping on the validation reconstruction loss) for at most 300 epochs.
Fixed seed; CPU.

Writes ``models/pbmc_peakvi_torch/`` (the scvi-tools model folder, for parity tests) and
``models/pbmc_peakvi/`` (the scvi-onnx bundle).
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=str(ROOT / "models" / "example" / "pbmc_peaks.h5ad"))
    p.add_argument("--out", default=str(ROOT / "models"))
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import anndata as ad
    import scvi

    from scvi_onnx.exporter import export_model

    scvi.settings.seed = args.seed
    adata = ad.read_h5ad(args.data)
    scvi.model.PEAKVI.setup_anndata(adata, batch_key="batch")
    model = scvi.model.PEAKVI(adata)
    model.train(
        max_epochs=args.epochs,
        enable_model_summary=False,
        accelerator="cpu",
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
    )
    out = Path(args.out)
    model.save(str(out / "pbmc_peakvi_torch"), overwrite=True, save_anndata=False)
    export_model(model, out / "pbmc_peakvi", overwrite=True, seed=args.seed)
    print(f"wrote {out / 'pbmc_peakvi_torch'} and {out / 'pbmc_peakvi'}")


if __name__ == "__main__":
    main()
