"""Make benchmark data from the real PBMC cells: draw cells with replacement and thin counts.

    python benchmarks/make_data.py --n-cells 20000 -o benchmarks/data/pbmc_20k.h5ad

Each new cell is a real cell (drawn with replacement from models/example/pbmc_train.h5ad, the
400 cells of ../shared/data on 2,000 genes) whose counts are binomially thinned with
p ~ U(0.5, 1): counts stay realistic and the size is unbounded. A source with obsm entries
(pbmc_cite.h5ad: TOTALVI's surface proteins) gives each new cell its source cell's entries,
thinned the same way. Written as CSR in chunks, so
1,000,000 cells need little memory.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 50_000


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n-cells", type=int, default=20_000)
    p.add_argument("--source", default=str(ROOT / "models" / "example" / "pbmc_train.h5ad"))
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    src = ad.read_h5ad(args.source)
    X = sp.csr_matrix(src.X)
    rng = np.random.default_rng(args.seed)
    n = args.n_cells
    pick = rng.integers(0, src.n_obs, n)
    cat_cols = [c for c in src.obs.columns if isinstance(src.obs[c].dtype, pd.CategoricalDtype)]
    obs = pd.DataFrame(
        {
            c: pd.Categorical(src.obs[c].to_numpy()[pick], categories=src.obs[c].cat.categories)
            for c in cat_cols
        },
        index=[f"cell{i}" for i in range(n)],
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    skeleton = ad.AnnData(obs=obs, var=src.var.copy())
    for key, value in src.obsm.items():
        # TOTALVI's surface proteins: the same cells, thinned alike (own generator: the RNA
        # draws, and so the data of the other models, do not change)
        prng = np.random.default_rng(args.seed + 1)
        counts = np.asarray(value, dtype=np.int64)[pick]
        thinned = prng.binomial(counts, prng.uniform(0.5, 1.0, (n, 1))).astype(np.float32)
        columns = value.columns if isinstance(value, pd.DataFrame) else None
        skeleton.obsm[key] = (
            pd.DataFrame(thinned, index=obs.index, columns=columns)
            if columns is not None
            else thinned
        )
    skeleton.write_h5ad(out)
    with h5py.File(out, "a") as f:
        if "X" in f:
            del f["X"]
        g = f.create_group("X")
        g.attrs.update(
            {"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (n, src.n_vars)}
        )
        data = g.create_dataset("data", (0,), maxshape=(None,), dtype="float32", chunks=(1 << 16,))
        indices = g.create_dataset(
            "indices", (0,), maxshape=(None,), dtype="int32", chunks=(1 << 16,)
        )
        indptr = [0]
        for start in range(0, n, CHUNK):
            rows = X[pick[start : start + CHUNK]]
            p_keep = rng.uniform(0.5, 1.0, rows.shape[0])
            thinned = rng.binomial(
                rows.data.astype(np.int64), np.repeat(p_keep, np.diff(rows.indptr))
            )
            rows = sp.csr_matrix(
                (thinned.astype(np.float32), rows.indices, rows.indptr), shape=rows.shape
            )
            rows.eliminate_zeros()
            k = data.shape[0]
            data.resize((k + rows.nnz,))
            indices.resize((k + rows.nnz,))
            data[k:] = rows.data
            indices[k:] = rows.indices
            indptr.extend((rows.indptr[1:] + k).tolist())
        g.create_dataset("indptr", data=np.asarray(indptr, dtype=np.int64))
    # drop cells thinned to zero counts? keep: they are rare; report them
    print(f"wrote {out}: {n} cells x {src.n_vars} genes")


if __name__ == "__main__":
    main()
