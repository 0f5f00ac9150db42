"""Build the example accessibility data models/example/pbmc_peaks.h5ad from real cells.

There is no scATAC data in ../shared/data, so PEAKVI's example "regions" are built from the real
10x PBMC RNA counts there (the 400 cells of the two files, ``batch`` = file), chosen and
binarised to look like a peak matrix:

- regions: 2,000 genes drawn at random (seed 0) among the genes detected (count > 0) in 2% to
  30% of the 400 cells: a scATAC-like density of accessible regions (~10% per cell, against
  ~46% for the 2,000 genes with the most counts);
- ``X``: accessibility, ``x > 0`` as float32 0/1 (CSR), what peak matrices are often binarised
  to and what PEAKVI's likelihood reads;
- ``layers["counts"]``: the raw counts of the same cells and regions (non-binary values: PEAKVI
  binarises them in its likelihood, ``x > 0``, while its encoder reads them as they are).

Data: subsets of public 10x Genomics CITE-seq PBMC data sets (CC BY 4.0), as distributed with the
scvi-tools test suite (BSD-3-Clause).

    python scripts/make_peaks_data.py [--shared ../shared/data]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
N_REGIONS = 2000
DETECTED = (0.02, 0.30)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--out", default=str(ROOT / "models" / "example" / "pbmc_peaks.h5ad"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    shared = Path(args.shared)
    a5 = ad.read_h5ad(shared / "pbmc_5k_protein_v3.h5ad")
    a10 = ad.read_h5ad(shared / "pbmc_10k_protein_v3.h5ad")
    common = a5.var_names.intersection(a10.var_names, sort=False)
    both = ad.concat(
        [a5[:, common], a10[:, common]],
        label="batch",
        keys=["pbmc_5k", "pbmc_10k"],
        index_unique="-",
    )
    counts = sp.csr_matrix(both.X.astype(np.float32))
    detected = np.asarray((counts > 0).mean(0)).ravel()
    pool = np.flatnonzero((detected >= DETECTED[0]) & (detected <= DETECTED[1]))
    rng = np.random.default_rng(args.seed)
    regions = np.sort(rng.choice(pool, N_REGIONS, replace=False))
    counts = counts[:, regions]
    binary = counts.copy()
    binary.data = (binary.data > 0).astype(np.float32)
    out = ad.AnnData(
        X=binary,
        obs=both.obs[["batch"]].copy(),
        var=both[:, regions].var[[]].copy(),
        layers={"counts": counts},
    )
    out.write_h5ad(args.out, compression="gzip")
    print(
        f"wrote {args.out}: {out.n_obs} cells x {out.n_vars} regions, "
        f"{100 * binary.nnz / np.prod(binary.shape):.1f}% accessible"
    )


if __name__ == "__main__":
    main()
