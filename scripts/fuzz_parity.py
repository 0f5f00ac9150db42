"""Randomised parity check: TOTALVI (AnnData or MuData, the MuData's obs columns in its own obs
or a modality's), PEAKVI, SCVI, LinearSCVI and SCANVI configurations drawn at random from the
options scvi-tools 1.4.2 accepts, each trained briefly on the real cells of the shipped
examples, exported (from the live model or from its saved folder) and compared with scvi-tools:

- the latent mean (normal latents) and ``return_dist`` within 1e-4;
- per-cell ELBO and every reconstruction key under the same noise (scvi-tools'
  ``_standard_normal`` returns the runtime's draws), ``rtol=2e-5, atol=2e-3`` as the tests;
  TOTALVI's with scvi-tools' protein likelihood computed in float64 over its own outputs, as
  the runtime computes it (its float32 one rounds by up to ~1e-4 per cell on trained models);
- all but PEAKVI (which scvi-tools lacks): the marginal LL's mean over 24 cells under the
  same noise (one scvi-tools call);
- where the bundle has a scoring graph (CUDA's path), its ELBO equal to the host kernel's;
- AnnData models: the runtime's latent and ELBO on the same cells with the features in another
  order, unknown features added, another matrix layout and dtype (and a protein table's
  columns in another order) equal its own on the original.

The test matrix (tests/parity) fixes its configurations; this draws new combinations of the same
options each ``--seed``, to find interactions the matrix does not hold. Every configuration is
printed with its result; the exit status is 1 if any failed. A configuration whose training
fails in scvi-tools itself (it diverges: a few unnormalised ones do) is reported and not
compared.

    python scripts/fuzz_parity.py [--n 12] [--seed 0] [--models totalvi scanvi ...] [--out FILE]
                                  [--epochs MIN MAX] [--all-features]
                                  [--mudata-share 0.3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import scvi
import torch

import scvi_onnx
from scvi_onnx.bundle import format as F
from scvi_onnx.exporter import export_model
from scvi_onnx.exporter.parity import QUIET_TRAINING, float64_protein_likelihood, torch_draws
from scvi_onnx.maths import rng as noise

ROOT = Path(__file__).resolve().parents[1]
NORMS = ["encoder", "decoder", "none", "both"]


def features(r: np.random.Generator, n_vars: int, lo: int, hi: int, every: bool) -> np.ndarray:
    """A sorted random subset of ``lo..hi`` of the data's features, or all of them with
    ``every`` (``--all-features``: full-width models, as users train them)."""
    n = int(r.integers(lo, hi))
    return np.arange(n_vars) if every else np.sort(r.choice(n_vars, n, replace=False))


def pick(r: np.random.Generator, options):
    return options[int(r.integers(len(options)))]


def obs_columns(a: ad.AnnData, r: np.random.Generator) -> ad.AnnData:
    n = a.n_obs
    a.obs["donor"] = np.array(["d1", "d2", "d3"])[r.integers(0, 3, n)]
    a.obs["many"] = [f"b{i}" for i in r.integers(0, 6, n)]
    a.obs["pct"] = r.normal(size=n).astype(np.float32)
    a.obs["pct2"] = r.uniform(size=n).astype(np.float32)
    tot = np.asarray(a.X.sum(1)).ravel()
    a.obs["sf"] = (tot / np.median(tot)).astype(np.float32)
    return a


#: Share of TOTALVI configurations set up as a MuData (``--mudata-share``).
MUDATA_SHARE = 0.3


def draw_totalvi(r: np.random.Generator, every: bool) -> tuple[ad.AnnData, dict, dict]:
    a = ad.read_h5ad(ROOT / "models" / "example" / "pbmc_cite.h5ad")
    genes = features(r, a.n_vars, 80, 250, every)
    a = obs_columns(a[:, genes].copy(), r)
    prot = a.obsm["protein_expression"]
    common = [c for c in prot.columns if (prot.loc[a.obs["batch"] == "pbmc_10k", c] > 0).any()]
    obsm = pick(
        r, ["protein_expression", "common_df", "common_array", "shuffled_df", "union_array"]
    )
    a.obsm["common_df"] = prot[common].copy()
    a.obsm["common_array"] = prot[common].to_numpy()
    a.obsm["shuffled_df"] = prot[list(r.permutation(prot.columns))].copy()
    a.obsm["union_array"] = prot.to_numpy()  # named by adata.uns
    a.uns["union_names"] = np.array(prot.columns)
    setup = dict(protein_expression_obsm_key=obsm)
    if obsm == "union_array":
        setup["protein_names_uns_key"] = "union_names"
    setup["batch_key"] = pick(r, ["batch", "batch", "many", None])
    if setup["batch_key"] == "many" and obsm != "common_array" and r.random() < 0.5:
        # the protein panels are the two files, the batches finer: mask and prior per panel
        a.obs["panel"] = a.obs["batch"].astype(str)
        setup["panel_key"] = "panel"
    if r.random() < 0.4:
        setup["categorical_covariate_keys"] = list(
            r.choice(["donor", "many"], int(r.integers(1, 3)), replace=False)
        )
    if r.random() < 0.4:
        setup["continuous_covariate_keys"] = list(
            r.choice(["pct", "pct2"], int(r.integers(1, 3)), replace=False)
        )
    if r.random() < 0.2:
        setup["size_factor_key"] = "sf"
    if r.random() < 0.3:
        a.layers["counts"] = a.X.copy()
        setup["layer"] = "counts"
    masked = obsm not in ("common_df", "common_array") and (
        setup["batch_key"] == "batch" or "panel_key" in setup
    )
    model = dict(
        n_latent=int(r.integers(2, 12)),
        n_hidden=int(pick(r, [16, 32, 64])),
        gene_likelihood=pick(r, ["nb", "zinb"]),
        gene_dispersion=pick(r, ["gene", "gene-batch"]),
        protein_dispersion=pick(r, ["protein", "protein-batch"]),
        latent_distribution=pick(r, ["normal", "normal", "ln"]),
        n_layers_encoder=int(r.integers(1, 3)),
        n_layers_decoder=int(r.integers(1, 3)),
        use_batch_norm=pick(r, NORMS),
        use_layer_norm=pick(r, NORMS),
        encode_covariates=bool(r.random() < 0.5),
        log_variational=bool(r.random() < 0.8),
        use_observed_lib_size=bool(r.random() < 0.6),
        empirical_protein_background_prior=bool(r.random() < 0.5),
    )
    if masked and r.random() < 0.3:
        model["override_missing_proteins"] = True
    if r.random() < 0.2:
        model["extra_decoder_kwargs"] = {"activation_function_bg": "exp"}
    if r.random() < MUDATA_SHARE:
        return as_mudata(a, setup, r), setup, model
    return a, setup, model


def as_mudata(a: ad.AnnData, setup: dict, r: np.random.Generator):
    """The same cells as a MuData (``setup_mudata``): RNA and the registered proteins as
    modalities with drawn names, the proteins raw in a layer or ``X``; ``setup`` rewritten."""
    import mudata as md
    import pandas as pd
    import scipy.sparse as sp

    prot = a.obsm[setup.pop("protein_expression_obsm_key")]
    uns_key = setup.pop("protein_names_uns_key", None)
    if hasattr(prot, "columns"):
        names = list(prot.columns)
    elif uns_key:
        names = [str(n) for n in a.uns[uns_key]]
    else:
        names = [f"p{i}" for i in range(prot.shape[1])]
    values = np.asarray(prot, dtype=np.float32)
    rna_layer = setup.pop("layer", None)
    rna = ad.AnnData(sp.csr_matrix(a.X), obs=a.obs[[]].copy(), var=a.var[[]].copy())
    if rna_layer:
        rna.layers[rna_layer] = rna.X.copy()
    adt = ad.AnnData(values, obs=a.obs[[]].copy(), var=pd.DataFrame(index=names))
    protein_layer = pick(r, [None, "raw"])
    if protein_layer:
        adt.layers["raw"] = adt.X.copy()
        adt.X = np.log1p(adt.X)  # not what the model reads
    keys = pick(r, [("rna", "prot"), ("gex", "adt")])
    mods = dict(zip(keys, (rna, adt), strict=True))
    # the obs columns in the MuData's own obs, or in a modality's (as the scvi-tools tutorial
    # does: modalities={"batch_key": "rna_subset"}), the MuData's then shuffled: read from the
    # wrong place, the numbers differ
    obs_mod = pick(r, [None, keys[0], keys[1]])
    m = md.MuData(mods)
    modalities = {"rna_layer": keys[0], "protein_layer": keys[1]}
    shuffle = np.arange(a.n_obs)
    if obs_mod:
        shuffle = r.permutation(a.n_obs)
        obs_keys = (
            "batch_key",
            "size_factor_key",
            "categorical_covariate_keys",
            "continuous_covariate_keys",
        )
        modalities.update(dict.fromkeys(obs_keys, obs_mod))
        for col in a.obs.columns:
            mods[obs_mod].obs[col] = a.obs[col].to_numpy()
    for col in a.obs.columns:
        m.obs[col] = a.obs[col].to_numpy()[shuffle]
    setup.update(
        rna_layer=rna_layer,
        protein_layer=protein_layer,
        modalities=modalities,
        mudata=True,
    )
    return m


def draw_scvi(r: np.random.Generator, every: bool) -> tuple[ad.AnnData, dict, dict]:
    a = ad.read_h5ad(ROOT / "models" / "example" / "pbmc_train.h5ad")
    genes = features(r, a.n_vars, 100, 400, every)
    a = obs_columns(a[:, genes].copy(), r)
    a.obs["label"] = np.array(["t", "b", "m"])[r.integers(0, 3, a.n_obs)]
    setup = dict(batch_key=pick(r, ["batch", "batch", "many", None]))
    if r.random() < 0.4:
        setup["labels_key"] = "label"
    if r.random() < 0.4:
        setup["categorical_covariate_keys"] = ["donor"]
    if r.random() < 0.4:
        setup["continuous_covariate_keys"] = ["pct"]
    if r.random() < 0.2:
        setup["size_factor_key"] = "sf"
    dispersions = ["gene", "gene-batch", "gene-cell"] + ["gene-label"] * ("labels_key" in setup)
    model = dict(
        n_latent=int(r.integers(2, 12)),
        n_hidden=int(pick(r, [16, 32, 64])),
        n_layers=int(r.integers(1, 3)),
        gene_likelihood=pick(r, ["zinb", "nb", "nb", "poisson", "normal"]),
        dispersion=pick(r, dispersions),
        latent_distribution=pick(r, ["normal", "normal", "ln"]),
        use_observed_lib_size=bool(r.random() < 0.6),
        encode_covariates=bool(r.random() < 0.5),
        deeply_inject_covariates=bool(r.random() < 0.7),
        use_batch_norm=pick(r, NORMS),
        use_layer_norm=pick(r, NORMS),
        log_variational=bool(r.random() < 0.8),
    )
    if setup["batch_key"] and r.random() < 0.3:
        model["batch_representation"] = "embedding"
    return a, setup, model


def draw_linear(r: np.random.Generator, every: bool) -> tuple[ad.AnnData, dict, dict]:
    a, setup, _ = draw_scvi(r, every)
    for key in ("categorical_covariate_keys", "continuous_covariate_keys", "size_factor_key"):
        setup.pop(key, None)  # LinearSCVI.setup_anndata: layer, batch and labels only
    # not gene-cell (scvi-tools 1.4.2's LDVAE decoder gives no px_r) nor gene-label
    # (LinearSCVI does not pass n_labels to LDVAE: its one_hot fails): it cannot train them
    dispersions = ["gene", "gene-batch"]
    model = dict(
        n_latent=int(r.integers(2, 12)),
        n_hidden=int(pick(r, [16, 32, 64])),
        n_layers=int(r.integers(1, 3)),
        gene_likelihood=pick(r, ["zinb", "nb", "poisson"]),
        dispersion=pick(r, dispersions),
        latent_distribution=pick(r, ["normal", "normal", "ln"]),
        use_observed_lib_size=bool(r.random() < 0.4),
        use_batch_norm=bool(r.random() < 0.5),
        bias=bool(r.random() < 0.5),
    )
    return a, setup, model


def draw_scanvi(r: np.random.Generator, every: bool) -> tuple[ad.AnnData, dict, dict]:
    a, setup, _ = draw_scvi(r, every)
    lab = a.obs["label"].to_numpy().astype(object)
    lab[r.random(a.n_obs) < 0.3] = "Unknown"
    a.obs["label"] = lab
    setup.update(labels_key="label", unlabeled_category="Unknown")
    model = dict(
        n_latent=int(r.integers(2, 12)),
        n_hidden=int(pick(r, [16, 32, 64])),
        n_layers=int(r.integers(1, 3)),
        gene_likelihood=pick(r, ["zinb", "nb"]),
        # not gene-label: scvi-tools 1.4.2 one-hot encodes the unlabeled category's index,
        # one past n_labels, and fails
        dispersion=pick(r, ["gene", "gene-batch"]),
        use_observed_lib_size=bool(r.random() < 0.6),
        linear_classifier=bool(r.random() < 0.3),
        use_batch_norm=pick(r, NORMS),
        use_layer_norm=pick(r, NORMS),
    )
    return a, setup, model


def draw_peakvi(r: np.random.Generator, every: bool) -> tuple[ad.AnnData, dict, dict]:
    a = ad.read_h5ad(ROOT / "models" / "example" / "pbmc_peaks.h5ad")
    regions = features(r, a.n_vars, 100, 400, every)
    a = obs_columns(a[:, regions].copy(), r)
    setup = dict(batch_key=pick(r, ["batch", "many", None]))
    if r.random() < 0.4:
        setup["categorical_covariate_keys"] = ["donor"]
    if r.random() < 0.4:
        setup["continuous_covariate_keys"] = ["pct"]
    if r.random() < 0.3:
        setup["layer"] = "counts"  # raw counts: accessible where > 0
    model = dict(
        n_latent=int(r.integers(2, 12)),
        n_hidden=int(pick(r, [16, 32, 64])),
        n_layers_encoder=int(r.integers(1, 3)),
        n_layers_decoder=int(r.integers(1, 3)),
        model_depth=bool(r.random() < 0.7),
        region_factors=bool(r.random() < 0.7),
        use_batch_norm=pick(r, NORMS),
        use_layer_norm=pick(r, NORMS),
        latent_distribution=pick(r, ["normal", "normal", "ln"]),
        deeply_inject_covariates=bool(r.random() < 0.5),
        encode_covariates=bool(r.random() < 0.5),
    )
    return a, setup, model


DRAWS = {
    "totalvi": draw_totalvi,
    "peakvi": draw_peakvi,
    "scvi": draw_scvi,
    "linear": draw_linear,
    "scanvi": draw_scanvi,
}
CLASSES = dict(
    totalvi="TOTALVI", peakvi="PEAKVI", scvi="SCVI", linear="LinearSCVI", scanvi="SCANVI"
)


def draws(om, m, kind: str, n: int, n_samples: int) -> list[np.ndarray]:
    """The runtime's draws for cells ``0..n-1`` in the order scvi-tools takes them, per
    forward pass: z; then SCVI, LinearSCVI, SCANVI: the library when it is learned and SCANVI's
    z2 (drawn in its loss); TOTALVI: the log-library (drawn even when observed) and the
    protein background; PEAKVI: nothing more."""
    cells = np.arange(n)
    L = om.n_latent
    ez = noise.normals(om.seed, noise.STREAM_Z, cells, n_samples * L).reshape(n, n_samples, L)
    if kind == "peakvi":
        return [ez[:, s] for s in range(n_samples)]
    if kind in ("scvi", "linear", "scanvi"):
        # per pass: z, the library when learned, SCANVI's z2 (K * N, L) in its loss
        el = noise.normals(om.seed, noise.STREAM_L, cells, n_samples)
        K = m.module.n_labels
        ez2 = noise.normals(om.seed, noise.STREAM_Z2, cells, n_samples * K * L)
        ez2 = ez2.reshape(n, n_samples, K, L)
        out = []
        for s in range(n_samples):
            out.append(ez[:, s])
            if not m.module.use_observed_lib_size:
                out.append(el[:, s : s + 1])
            if kind == "scanvi":
                out.append(ez2[:, s].transpose(1, 0, 2).reshape(K * n, L))
        return out
    P = len(om.proteins)
    el = noise.normals(om.seed, noise.STREAM_L, cells, n_samples)
    eb = noise.normals(om.seed, noise.STREAM_PRO_BACK, cells, n_samples * P)
    eb = eb.reshape(n, n_samples, P)
    out = []
    for s in range(n_samples):
        out += [ez[:, s], el[:, s : s + 1], eb[:, s]]
    return out


def shuffled_query(a: ad.AnnData, setup: dict, r: np.random.Generator):
    """``a`` with its features in another order, 5 unknown features, ``X`` (or the registered
    layer) dense, CSR or CSC, float32 or float64, and a named protein table's columns in
    another order."""
    import pandas as pd
    import scipy.sparse as sp

    perm = r.permutation(a.n_vars)
    layer = setup.get("layer")
    src = a.layers[layer] if layer else a.X
    m = sp.csr_matrix(src)[:, perm]
    extra = sp.csr_matrix(r.poisson(1.0, (a.n_obs, 5)).astype(np.float32))
    m = sp.hstack([m, extra]).tocsr()
    form = pick(r, ["dense", "csr", "csc"])
    dtype = pick(r, [np.float32, np.float64])
    m = m.astype(dtype)
    m = m.toarray() if form == "dense" else (m.tocsc() if form == "csc" else m)
    var = pd.DataFrame(index=list(a.var_names[perm]) + [f"unknown{i}" for i in range(5)])
    q = ad.AnnData(X=m if not layer else None, obs=a.obs.copy(), var=var)
    if layer:
        q.X = sp.csr_matrix(q.shape, dtype=np.float32)  # not what the model reads
        q.layers[layer] = m
    for k, v in a.obsm.items():
        q.obsm[k] = v[list(r.permutation(v.columns))] if hasattr(v, "columns") else v
    q.uns = dict(a.uns)
    return q, dict(form=form, dtype=np.dtype(dtype).name)


def exact(kind: str):
    """TOTALVI: scvi-tools' protein likelihood in float64 over its own float32 outputs, as the
    runtime computes it (torch's float32 is itself up to ~1e-4 per cell from that value on
    trained models: ``float64_protein_likelihood``); the others: as scvi-tools runs."""
    return float64_protein_likelihood() if kind == "totalvi" else contextlib.nullcontext()


def close(got, ref, rtol=2e-5, atol=2e-3) -> float:
    """Largest ``|got - ref| / (atol + rtol |ref|)`` (<= 1 passes)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.max(np.abs(got - ref) / (atol + rtol * np.abs(ref))))


def check(
    kind: str,
    r: np.random.Generator,
    work: Path,
    res: dict,
    epochs: tuple[int, int] = (2, 5),
    every_feature: bool = False,
) -> dict:
    a, setup, model_kw = DRAWS[kind](r, every_feature)
    cls = getattr(scvi.model, CLASSES[kind])
    from_folder = bool(r.random() < 0.5)
    res.update(setup=setup, options=model_kw, n_vars=a.n_vars, from_folder=from_folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if setup.get("mudata"):
            cls.setup_mudata(a, **{k: v for k, v in setup.items() if k != "mudata"})
        else:
            cls.setup_anndata(a, **setup)
        res["train_seed"] = scvi.settings.seed = int(r.integers(1 << 30))
        m = cls(a, **model_kw)
        extra = dict(reduce_lr_on_plateau=False) if kind == "totalvi" else {}  # needs a logger
        try:
            res["epochs"] = int(r.integers(epochs[0], epochs[1] + 1))
            m.train(max_epochs=res["epochs"], **QUIET_TRAINING, **extra)
        except (ValueError, RuntimeError) as e:  # diverged (NaN): nothing to compare
            res.update(passed=True, skipped=f"scvi-tools' training failed: {str(e)[:120]}")
            return res
        m.module.eval()
        src = m
        if from_folder:
            m.save(work / "saved", overwrite=True)
            src = work / "saved"
        path = export_model(src, work / "bundle", overwrite=True)
    om = scvi_onnx.load(path, device="cpu", seed=int(r.integers(1000)))
    # outputs the export accepted within their float32 rounding spread (large activations)
    widened = om.manifest.validation.get(F.VALIDATION_WIDENED)
    if widened:
        res["widened"] = widened
    n = a.n_obs
    scores = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rm, rv = m.get_latent_representation(a, return_dist=True)
        gm, gv = om.get_latent_representation(a, return_dist=True)
        scores["latent_dist"] = max(close(gm, rm, 0, 1e-4), close(gv, rv, 1e-4, 1e-4))
        if model_kw.get("latent_distribution", "normal") == "normal":
            ref_mean = m.get_latent_representation(a)
            scores["latent"] = close(om.get_latent_representation(a), ref_mean, 0, 1e-4)
        with torch_draws(draws(om, m, kind, n, 1)), exact(kind):
            ref = m.get_elbo(a, batch_size=n, return_mean=False).numpy()
        scores["elbo"] = close(om.get_elbo(a, return_mean=False, batch_size=97), ref)
        with torch_draws(draws(om, m, kind, n, 1)), exact(kind):
            ref_rec = m.get_reconstruction_error(a, batch_size=n, return_mean=False)
        got_rec = om.get_reconstruction_error(a, return_mean=False)
        assert list(got_rec) == list(ref_rec), (list(got_rec), list(ref_rec))
        for k in ref_rec:
            scores[k] = close(got_rec[k], ref_rec[k].numpy())
        if kind != "peakvi":
            sub = a[:24].copy()
            with torch_draws(draws(om, m, kind, 24, 6)), exact(kind):
                ref_mll = m.get_marginal_ll(sub, n_mc_samples=6, batch_size=24)
            got_mll = om.get_marginal_ll(sub, n_mc_samples=6, batch_size=24)
            scores["marginal_ll_mean"] = close(got_mll, ref_mll)
        if "scorer" in om.manifest.graphs:  # the CUDA path's scoring graph, on the CPU
            og = scvi_onnx.load(path, device="cpu", seed=om.seed, scoring="graph")
            scores["graph_elbo"] = close(
                og.get_elbo(a, return_mean=False), om.get_elbo(a, return_mean=False), 1e-5, 1e-3
            )
        if not setup.get("mudata"):
            # the same cells as a user may hand them over: another feature order, features
            # the model does not know, another matrix layout and dtype: the same numbers
            q, res["query"] = shuffled_query(a, setup, r)
            ours = om.get_latent_representation(a, return_dist=True)
            theirs = om.get_latent_representation(q, return_dist=True)
            pairs = zip(theirs, ours, strict=True)
            scores["query_latent"] = max(close(x, y, 1e-6, 1e-7) for x, y in pairs)
            scores["query_elbo"] = close(
                om.get_elbo(q, return_mean=False), om.get_elbo(a, return_mean=False), 1e-6, 1e-6
            )
    res["scores"] = scores
    res["passed"] = all(v <= 1.0 for v in scores.values())
    return res


def main() -> None:
    global MUDATA_SHARE  # --mudata-share sets it for draw_totalvi
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=12, help="configurations per model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", nargs="+", default=list(DRAWS), choices=list(DRAWS))
    p.add_argument("--out", help="write the results as JSON")
    p.add_argument(
        "--epochs",
        nargs=2,
        type=int,
        default=(2, 5),
        metavar=("MIN", "MAX"),
        help="training epochs, drawn from MIN..MAX (default 2 5: briefly trained models; "
        "hundreds give trained ones, with larger activations)",
    )
    p.add_argument(
        "--all-features",
        action="store_true",
        help="every gene / region of the example data (2,000), not a subset of 80-400",
    )
    p.add_argument(
        "--mudata-share",
        type=float,
        default=MUDATA_SHARE,
        help=f"share of TOTALVI configurations set up as a MuData (default {MUDATA_SHARE})",
    )
    args = p.parse_args()
    MUDATA_SHARE = args.mudata_share
    torch.set_num_threads(2)
    r = np.random.default_rng(args.seed)
    results, failed = [], 0
    for _ in range(args.n):
        for kind in args.models:
            t = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                res = dict(model=kind)
                try:
                    check(kind, r, Path(tmp), res, tuple(args.epochs), args.all_features)
                except Exception:  # noqa: BLE001 - a configuration that errors is a failure
                    res.update(passed=False, error=traceback.format_exc(limit=-3))
            res["seconds"] = round(time.perf_counter() - t, 1)
            failed += not res["passed"]
            results.append(res)
            print(json.dumps(res, default=str), flush=True)
    skipped = sum("skipped" in r for r in results)
    print(
        f"{len(results) - failed - skipped} of {len(results) - skipped} configurations passed "
        f"({skipped} not compared: scvi-tools' own training failed)",
        flush=True,
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
