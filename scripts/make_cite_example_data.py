"""Build models/example/pbmc_cite.h5ad, the CITE-seq example data, from the real 10x PBMC
cells in ../shared/data.

The 400 cells and 2,000 genes of ``pbmc_train.h5ad`` (the two files on their common genes,
``batch`` = file; see ``make_example_data.py``) with their surface-protein counts in
``obsm["protein_expression"]``: a DataFrame whose columns name the antibodies. The two files
measured different panels (29 antibodies in pbmc_5k, 14 of them in pbmc_10k), so the 15
antibodies pbmc_10k lacks are zeros there: scvi-tools' TOTALVI treats them as missing in that
batch (its ``protein_batch_mask``), a real case of panels that differ between batches.

Data: subsets of public 10x Genomics CITE-seq PBMC data sets (CC BY 4.0), as distributed with the
scvi-tools test suite (BSD-3-Clause).

    python scripts/make_cite_example_data.py [--shared ../shared/data]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
FILES = ("pbmc_5k_protein_v3", "pbmc_10k_protein_v3")  # the order of pbmc_train's batches


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--out", default=str(ROOT / "models" / "example"))
    args = p.parse_args()
    shared, out = Path(args.shared), Path(args.out)
    train = ad.read_h5ad(out / "pbmc_train.h5ad")
    parts, union = [], []
    for name in FILES:
        a = ad.read_h5ad(shared / f"{name}.h5ad")
        names = [str(n) for n in a.uns["protein_names"]]
        parts.append(pd.DataFrame(np.asarray(a.obsm["protein_expression"]), columns=names))
        union += [n for n in names if n not in union]
    proteins = pd.concat([f.reindex(columns=union, fill_value=0) for f in parts])
    if len(proteins) != train.n_obs:
        raise SystemExit(f"{len(proteins)} protein rows for {train.n_obs} cells")
    proteins.index = train.obs_names
    cite = ad.AnnData(X=train.X, obs=train.obs.copy(), var=train.var.copy())
    cite.obsm["protein_expression"] = proteins.astype(np.float32)
    cite.write_h5ad(out / "pbmc_cite.h5ad", compression="gzip")
    print(f"wrote {out}/pbmc_cite.h5ad {cite.shape} with {proteins.shape[1]} proteins")


if __name__ == "__main__":
    main()
