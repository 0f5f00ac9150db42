"""Build the example data in models/example from the real 10x PBMC cells in ../shared/data.

- pbmc_train.h5ad: the two files (200 cells each) on their common genes, ``batch`` = file,
  restricted to the 2,000 genes with the most counts; raw counts, CSR.
- pbmc_query.h5ad: the pbmc_10k cells with those 2,000 genes plus 500 other genes, in a
  shuffled gene order (the runtime matches genes by name), CSR.

Data: subsets of public 10x Genomics CITE-seq PBMC data sets (CC BY 4.0), as distributed with the
scvi-tools test suite (BSD-3-Clause).

    python scripts/make_example_data.py [--shared ../shared/data]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
N_GENES = 2000
N_EXTRA = 500


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--out", default=str(ROOT / "models" / "example"))
    args = p.parse_args()
    shared, out = Path(args.shared), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    a5 = ad.read_h5ad(shared / "pbmc_5k_protein_v3.h5ad")
    a10 = ad.read_h5ad(shared / "pbmc_10k_protein_v3.h5ad")
    common = a5.var_names.intersection(a10.var_names, sort=False)
    both = ad.concat(
        [a5[:, common], a10[:, common]],
        label="batch",
        keys=["pbmc_5k", "pbmc_10k"],
        index_unique="-",
    )
    totals = np.asarray(both.X.sum(0)).ravel()
    order = np.argsort(-totals, kind="stable")
    top = both.var_names[order[:N_GENES]]
    train = ad.AnnData(
        X=sp.csr_matrix(both[:, top].X.astype(np.float32)),
        obs=both.obs[["batch", "n_genes", "n_counts"]].copy(),
        var=both[:, top].var[[]].copy(),
    )
    train.write_h5ad(out / "pbmc_train.h5ad", compression="gzip")
    rng = np.random.default_rng(0)
    extra = a10.var_names.difference(top)
    extra = extra[rng.choice(len(extra), N_EXTRA, replace=False)]
    genes = np.concatenate([np.asarray(top), np.asarray(extra)])
    genes = genes[rng.permutation(len(genes))]
    q = a10[:, genes]
    query = ad.AnnData(
        X=sp.csr_matrix(q.X.astype(np.float32)),
        obs=q.obs[["n_genes", "n_counts"]].assign(batch="pbmc_10k"),
        var=q.var[[]].copy(),
    )
    query.obs_names = [f"{n}-pbmc_10k" for n in query.obs_names]
    query.write_h5ad(out / "pbmc_query.h5ad", compression="gzip")
    print(f"wrote {out}/pbmc_train.h5ad {train.shape} and pbmc_query.h5ad {query.shape}")


if __name__ == "__main__":
    main()
