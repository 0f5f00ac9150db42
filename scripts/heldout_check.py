"""Held-out check: TOTALVI and PEAKVI configurations outside the test matrix, trained on the
real cells of ../shared/data for as many epochs as a user would, saved, exported with the CLI
and compared with scvi-tools 1.4.2 on the same cells, as an outside reviewer would.

Per configuration: the latent mean and ``return_dist`` against scvi-tools'; the ELBO, every
reconstruction key and (TOTALVI) the marginal LL as scvi-tools' own run-to-run spread sees
them: ``--seeds`` runs on each side, the difference of the means in standard errors (about
N(0, 1) when both estimate the same thing) and the median per-cell |z|; for PEAKVI, whose
marginal LL scvi-tools lacks, what an importance-sampling estimate must satisfy (above the
ELBO, growing with the samples). The tests compare per cell under the same noise; this is the
whole-method view on larger, longer-trained models.

    python scripts/heldout_check.py [--configs NAME ...] [--seeds 8] [--out DIR]
"""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import scvi
import torch

import scvi_onnx
from scvi_onnx.exporter.parity import QUIET_TRAINING

ROOT = Path(__file__).resolve().parents[1]
FILES = ("pbmc_5k_protein_v3", "pbmc_10k_protein_v3")


def cells(shared: Path) -> ad.AnnData:
    """The 400 real cells of both files on their common genes, ``batch`` = file, the union of
    their antibodies in ``obsm["prot"]`` (zeros where a file did not measure one)."""
    parts = []
    for name in FILES:
        a = ad.read_h5ad(shared / f"{name}.h5ad")
        a.obs_names = [f"{name}-{n}" for n in a.obs_names]
        a.obs["batch"] = name
        names = [str(n) for n in a.uns["protein_names"]]
        a.obsm["prot"] = pd.DataFrame(
            np.asarray(a.obsm["protein_expression"]), index=a.obs_names, columns=names
        )
        parts.append(a)
    common = parts[0].var_names.intersection(parts[1].var_names)
    out = ad.concat([p[:, common] for p in parts], join="inner")
    out.obsm["prot"] = pd.concat([p.obsm["prot"] for p in parts]).fillna(0).astype(np.float32)
    return out


def totalvi_union(a: ad.AnnData):
    """NB, gene-batch dispersion, a categorical covariate, the antibody union (a protein mask),
    1,500 genes by total counts, the empirical background prior."""
    a.obs["ngenes"] = pd.qcut(a.obs["n_genes"], 3, labels=["lo", "mid", "hi"]).astype(str)
    a = a[:, np.argsort(-np.asarray(a.X.sum(0)).ravel())[:1500]].copy()
    a.X = sp.csr_matrix(a.X)
    scvi.model.TOTALVI.setup_anndata(
        a,
        protein_expression_obsm_key="prot",
        batch_key="batch",
        categorical_covariate_keys=["ngenes"],
    )
    return a, scvi.model.TOTALVI(a, n_latent=10, gene_dispersion="gene-batch"), 30


def totalvi_mudata(a: ad.AnnData):
    """setup_mudata (modalities "rna" and "prot", proteins in a layer), ZINB, logistic-normal
    latent, learned library size, an encoded continuous covariate, layer norm, 2 decoder
    layers, protein-batch dispersion; 1,200 genes by variance, the 14 shared antibodies."""
    import mudata as md

    a = a[:, np.argsort(-np.asarray(np.log1p(a.X).var(0)).ravel())[:1200]].copy()
    prot = a.obsm["prot"]
    shared = [c for c in prot.columns if (prot.loc[a.obs["batch"] == FILES[1], c] > 0).any()]
    rna = ad.AnnData(sp.csr_matrix(a.X), obs=a.obs[[]].copy(), var=a.var[[]].copy())
    adt = ad.AnnData(prot[shared].to_numpy(), obs=a.obs[[]].copy(), var=pd.DataFrame(index=shared))
    adt.layers["raw"] = adt.X.copy()
    m = md.MuData({"rna": rna, "prot": adt})
    m.obs["batch"] = a.obs["batch"].to_numpy()
    m.obs["pct"] = a.obs["percent_mito"].to_numpy(np.float32)
    scvi.model.TOTALVI.setup_mudata(
        m,
        protein_layer="raw",
        batch_key="batch",
        continuous_covariate_keys=["pct"],
        modalities={"rna_layer": "rna", "protein_layer": "prot"},
    )
    model = scvi.model.TOTALVI(
        m,
        n_latent=12,
        n_hidden=64,
        gene_likelihood="zinb",
        latent_distribution="ln",
        use_observed_lib_size=False,
        use_layer_norm="both",
        use_batch_norm="none",
        n_layers_decoder=2,
        protein_dispersion="protein-batch",
    )
    return m, model, 40


def peakvi_counts(a: ad.AnnData):
    """PEAKVI on accessibility built from real counts (genes detected in 2-25% of cells as
    regions, raw counts in a layer: x > 0 is accessible), logistic-normal latent, 1 + 3
    layers, batch norm, categorical and continuous covariates encoded and deeply injected."""
    det = np.asarray((a.X > 0).mean(0)).ravel()
    a = a[:, np.flatnonzero((det > 0.02) & (det < 0.25))[:3000]].copy()
    a.layers["counts"] = sp.csr_matrix(a.X)
    a.X = sp.csr_matrix((a.X > 0).astype(np.float32))
    a.obs["ngenes"] = pd.qcut(a.obs["n_genes"], 4, labels=False).astype(str)
    scvi.model.PEAKVI.setup_anndata(
        a,
        batch_key="batch",
        layer="counts",
        categorical_covariate_keys=["ngenes"],
        continuous_covariate_keys=["percent_mito"],
    )
    model = scvi.model.PEAKVI(
        a,
        latent_distribution="ln",
        n_layers_encoder=1,
        n_layers_decoder=3,
        deeply_inject_covariates=True,
        encode_covariates=True,
        use_batch_norm="both",
        use_layer_norm="none",
    )
    return a, model, 30


CONFIGS = {
    "totalvi-union": totalvi_union,
    "totalvi-mudata": totalvi_mudata,
    "peakvi-counts": peakvi_counts,
}


def spread(ours: np.ndarray, theirs: np.ndarray) -> dict:
    """``(seeds, cells)`` of each side: the means' difference in standard errors, and the
    median per-cell |difference of means| over its standard error."""
    k = len(ours)
    a, b = ours.mean(1), theirs.mean(1)
    se = np.sqrt(a.var(ddof=1) / k + b.var(ddof=1) / k)
    cell_se = np.sqrt(ours.var(0, ddof=1) / k + theirs.var(0, ddof=1) / k)
    z = np.abs(ours.mean(0) - theirs.mean(0)) / np.maximum(cell_se, 1e-12)
    return {
        "ours": float(a.mean()),
        "scvi_tools": float(b.mean()),
        "diff_in_se": float((a.mean() - b.mean()) / se),
        "per_cell_median_abs_z": float(np.median(z)),
    }


def torch_runs(fn, seeds: int) -> list:
    """``fn()`` of scvi-tools under ``seeds`` torch seeds."""
    out = []
    for s in range(seeds):
        torch.manual_seed(1000 + s)
        out.append(fn())
    return out


def check(name: str, data, model, seeds: int, work: Path) -> dict:
    folder, bundle = work / f"{name}-model", work / f"{name}-bundle"
    model.save(str(folder), overwrite=True)
    cli = [sys.executable, "-m", "scvi_onnx"]
    subprocess.run([*cli, "export", str(folder), str(bundle), "--overwrite"], check=True)
    subprocess.run([*cli, "verify", str(bundle)], check=True, stdout=subprocess.DEVNULL)
    om = scvi_onnx.load(bundle, device="cpu")
    res: dict = {"config": name}
    qm, qv = om.get_latent_representation(data, return_dist=True)
    tm, tv = model.get_latent_representation(data, return_dist=True)
    res["qz_m_max_abs"] = float(np.abs(qm - tm).max())
    res["qz_v_max_abs"] = float(np.abs(qv - tv).max())
    # the mean of a logistic-normal latent is a Monte-Carlo estimate on both sides
    res["latent_max_abs"] = float(
        np.abs(om.get_latent_representation(data) - model.get_latent_representation(data)).max()
    )
    ours = np.stack([om.get_elbo(data, return_mean=False, seed=s) for s in range(seeds)])
    theirs = torch_runs(lambda: model.get_elbo(data, return_mean=False), seeds)
    res["elbo"] = spread(ours, np.stack([np.asarray(t, dtype=np.float64) for t in theirs]))
    ours_rec = [om.get_reconstruction_error(data, return_mean=False, seed=s) for s in range(seeds)]
    theirs_rec = torch_runs(lambda: model.get_reconstruction_error(data, return_mean=False), seeds)
    for key in ours_rec[0]:
        res[key] = spread(
            np.stack([r[key] for r in ours_rec]),
            np.stack([np.asarray(r[key], dtype=np.float64) for r in theirs_rec]),
        )
    if isinstance(model, scvi.model.TOTALVI):
        # scvi-tools 1.4.2 gives only the mean for TOTALVI (return_mean=False fails)
        ours = np.array([om.get_marginal_ll(data, n_mc_samples=50, seed=s) for s in range(seeds)])
        theirs = np.array(torch_runs(lambda: model.get_marginal_ll(data, n_mc_samples=50), seeds))
        se = np.sqrt(ours.var(ddof=1) / seeds + theirs.var(ddof=1) / seeds)
        res["marginal_ll_50"] = {
            "ours": float(ours.mean()),
            "scvi_tools": float(theirs.mean()),
            "diff_in_se": float((ours.mean() - theirs.mean()) / se),
        }
    else:
        elbo = res["elbo"]["ours"]  # the mean over the seeds above
        few = float(np.mean(om.get_marginal_ll(data, n_mc_samples=10, return_mean=False)))
        many = float(np.mean(om.get_marginal_ll(data, n_mc_samples=200, return_mean=False)))
        res["marginal_ll"] = {"elbo": elbo, "n_mc_10": few, "n_mc_200": many}
        res["marginal_ll"]["ok"] = bool(elbo < few < many)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=sorted(CONFIGS))
    p.add_argument("--seeds", type=int, default=8, help="runs per side (default 8)")
    p.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    warnings.simplefilter("ignore")
    results = []
    with tempfile.TemporaryDirectory(prefix="heldout_") as tmp:
        for name in args.configs:
            scvi.settings.seed = 0  # the initial weights and the training order
            data, model, epochs = CONFIGS[name](cells(Path(args.shared)))
            # scvi-tools' learning-rate monitor needs a logger
            extra = {"reduce_lr_on_plateau": False}
            if "reduce_lr_on_plateau" not in inspect.signature(model.train).parameters:
                extra = {}
            model.train(max_epochs=epochs, **extra, **QUIET_TRAINING)
            res = check(name, data, model, args.seeds, Path(tmp))
            print(json.dumps(res, indent=1), flush=True)
            results.append(res)
    out = Path(args.out) / f"heldout-{pd.Timestamp.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"seeds": args.seeds, "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
