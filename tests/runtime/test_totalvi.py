"""TOTALVI without torch: the protein mixture and the selections against independent
computations, and the shipped TOTALVI bundle's inputs (proteins by name, arrays, MuData-free
AnnData, dataloaders, backed files) and their errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from scipy.special import expit, gammaln
from scipy.special import logsumexp as scipy_logsumexp

import scvi_onnx
from scvi_onnx.bundle import CategoricalField, ProteinField, Registry, read_manifest
from scvi_onnx.errors import (
    InputDataError,
    InvalidValuesError,
    MissingColumnError,
    MissingGenesError,
    NonIntegerCountsWarning,
)
from scvi_onnx.maths import distributions as D
from scvi_onnx.models.totalvae import (
    background_prior,
    efficiency,
    encoder_input,
    protein_dispersion,
)

from ..conftest import MODELS, SHIPPED_BUNDLE, require

TOTALVI_BUNDLE = MODELS / "pbmc_totalvi"
CITE_H5AD = MODELS / "example" / "pbmc_cite.h5ad"
TINY_EPS = 1e-300
HYP = settings(max_examples=200, deadline=None)
log_uniform = st.floats(min_value=-4.0, max_value=4.0).map(lambda e: 10.0**e)
counts = st.one_of(st.integers(0, 10), st.integers(0, 10**5)).map(float)
logits = st.floats(min_value=-20.0, max_value=20.0)


# ----------------------------------------------------------------------------- the maths
def nbinom_mixture_scipy(x, mu1, mu2, theta, pi):
    """log(sigmoid(pi) NB(x; mu1, theta) + sigmoid(-pi) NB(x; mu2, theta)), scipy.stats."""
    l1 = stats.nbinom.logpmf(x, theta, theta / (theta + mu1))
    l2 = stats.nbinom.logpmf(x, theta, theta / (theta + mu2))
    return scipy_logsumexp([l1 + np.log(expit(pi)), l2 + np.log(expit(-pi))], axis=0)


@HYP
@given(x=counts, mu1=log_uniform, mu2=log_uniform, theta=log_uniform, pi=logits)
def test_log_nb_mixture_matches_scipy(x, mu1, mu2, theta, pi):
    got = D.log_nb_mixture(x, mu1, mu2, theta, pi, eps=TINY_EPS)
    want = nbinom_mixture_scipy(x, mu1, mu2, theta, pi)
    scale = abs(gammaln(x + theta)) + abs(gammaln(theta)) + abs(gammaln(x + 1)) + 1.0
    scale += theta * abs(np.log(theta + max(mu1, mu2))) + x * abs(np.log(min(mu1, mu2)))
    # the reference's own rounding: scipy takes p = theta / (theta + mu) and log1p(-p), which
    # loses (theta + mu) / mu ulps when p is within a hair of 1 (x = 6060, mu = 1e-3,
    # theta = 1e4: 4e-6 off); two float64 ulps of that, per count, in units of the 1e-11 below
    mu = min(mu1, mu2)
    scale += x * (theta + mu) / mu * (2 * np.finfo(np.float64).eps / 1e-11)
    assert abs(got - want) <= 1e-11 * scale, (got, want)


def test_log_nb_mixture_limits_are_its_components():
    """All background (pi -> inf) or all foreground (pi -> -inf): one negative binomial."""
    rs = np.random.default_rng(0)
    x = rs.poisson(20, 200).astype(np.float64)
    mu1, mu2, theta = rs.uniform(1, 50, 200), rs.uniform(1, 500, 200), rs.uniform(0.5, 20, 200)
    np.testing.assert_allclose(
        D.log_nb_mixture(x, mu1, mu2, theta, 800.0), D.log_nb_positive(x, mu1, theta), atol=1e-9
    )
    np.testing.assert_allclose(
        D.log_nb_mixture(x, mu1, mu2, theta, -800.0), D.log_nb_positive(x, mu2, theta), atol=1e-9
    )
    # the count terms are the same in both components: outside the logsumexp
    np.testing.assert_allclose(
        D.nb_mixture_core(x, mu1, mu2, theta, 0.3) + D.nb_count_terms(x, theta),
        D.log_nb_mixture(x, mu1, mu2, theta, 0.3),
        rtol=1e-13,
    )


def test_fast_mixture_sum_matches_reference():
    """The runtime's kernel (float64, in place) against the float64 formula, masked and
    unmasked."""
    from scvi_onnx.maths.likelihood import nb_mixture_sum

    rs = np.random.default_rng(3)
    S, N, P = 5, 40, 14
    y = rs.poisson(rs.uniform(1, 300, (N, P))).astype(np.float32)
    mu1 = rs.uniform(0.5, 60, (S, N, P))
    mu2 = mu1 * rs.uniform(1, 30, (S, N, P))
    theta = rs.uniform(0.5, 20, P)
    pi = rs.normal(0, 4, (S, N, P))
    mask = (rs.uniform(size=(N, P)) > 0.2).astype(float)
    ref = D.nb_mixture_core(y.astype(float), mu1, mu2, theta, pi)
    got = nb_mixture_sum(y, mu1, mu2, theta, pi)
    np.testing.assert_allclose(got, ref.sum(-1), rtol=1e-12, atol=1e-9)
    got = nb_mixture_sum(y, mu1, mu2, np.broadcast_to(theta, (N, P)), pi, mask)
    np.testing.assert_allclose(got, (ref * mask).sum(-1), rtol=1e-12, atol=1e-9)


def test_softplus_exact():
    v = np.array([-800.0, -30.0, -1.0, 0.0, 1.0, 30.0, 800.0])
    np.testing.assert_allclose(D.softplus(v), np.logaddexp(0.0, v), rtol=1e-15)


def test_encoder_input_is_scvi_tools_normalisation():
    rs = np.random.default_rng(1)
    x = rs.poisson(2.0, (7, 50)).astype(np.float32)
    y = rs.poisson(30.0, (7, 6)).astype(np.float32)
    got = encoder_input(x, y, True)
    want = np.concatenate(
        [np.log1p(v / (1 + v.mean(1, keepdims=True))) for v in (x.astype(float), y.astype(float))],
        axis=1,
    )
    assert got.dtype == np.float32 and got.shape == (7, 56)
    np.testing.assert_allclose(got, want, rtol=3e-7, atol=1e-7)
    raw = encoder_input(x, y, False)
    np.testing.assert_allclose(np.log1p(raw.astype(float)), want, rtol=1e-6)
    # scvi-tools < 1.3.1: the counts themselves
    old = np.concatenate([x, y], axis=1).astype(float)
    np.testing.assert_allclose(encoder_input(x, y, True, scaling=False), np.log1p(old), rtol=3e-7)
    np.testing.assert_array_equal(encoder_input(x, y, False, scaling=False), old)


def test_selections():
    rs = np.random.default_rng(2)
    P, B = 5, 3
    batch = np.array([[2], [0], [1], [2]])
    labels = np.zeros((4, 1), dtype=int)
    log_eff = rs.normal(size=(P, B)).astype(np.float32)
    np.testing.assert_allclose(efficiency(log_eff, batch), np.exp(log_eff[:, [2, 0, 1, 2]].T))
    alpha, log_beta = rs.normal(size=(P, 2)), rs.normal(size=(P, 2))
    m, s = background_prior(alpha, log_beta, np.array([1, 0, 0, 1]))
    np.testing.assert_allclose(m, alpha[:, [1, 0, 0, 1]].T)
    np.testing.assert_allclose(s, np.exp(log_beta[:, [1, 0, 0, 1]].T))
    py_r = rs.normal(size=(P, B))
    np.testing.assert_allclose(
        protein_dispersion("protein-batch", py_r, batch, labels), np.exp(py_r[:, [2, 0, 1, 2]].T)
    )
    np.testing.assert_allclose(
        protein_dispersion("protein", py_r[:, 0], batch, labels), np.exp(py_r[:, 0])
    )


# ----------------------------------------------------------------------------- the registry
def test_registry_json_round_trip_and_old_manifests():
    reg = Registry(
        layer=None,
        batch=CategoricalField("batch", ("a", "b")),
        labels=CategoricalField(None, (0,)),
        proteins=ProteinField("obsm", "protein_expression", ("CD3", "CD4"), True, None),
        panel=CategoricalField("panel", ("A", "B")),
        modalities={"X": "rna", "proteins": "prot", "batch": None},
    )
    assert Registry.from_json(json.loads(json.dumps(reg.to_json()))) == reg
    assert reg.obs_columns() == [("batch", "batch_key"), ("panel", "panel_key")]
    # a manifest written before these fields: read as before, written back unchanged
    raw = json.loads((SHIPPED_BUNDLE / "manifest.json").read_text())["registry"]
    old = Registry.from_json(raw)
    assert old.proteins is None and old.panel is None and old.modalities is None
    assert old.to_json() == raw


# ----------------------------------------------------------------------------- the inputs
@pytest.fixture(scope="module")
def model():
    return scvi_onnx.load(TOTALVI_BUNDLE, device="cpu", seed=5)


@pytest.fixture(scope="module")
def cite():
    return ad.read_h5ad(CITE_H5AD)[:96].copy()


@pytest.fixture(scope="module")
def reference(model, cite):
    return {
        "z": model.get_latent_representation(cite),
        "elbo": model.get_elbo(cite, return_mean=False),
        "rec": model.get_reconstruction_error(cite, return_mean=False),
    }


def with_proteins(adata, proteins):
    out = adata.copy()
    out.obsm["protein_expression"] = proteins
    return out


def same_as_reference(model, adata, reference, **kw):
    np.testing.assert_array_equal(model.get_latent_representation(adata, **kw), reference["z"])
    np.testing.assert_array_equal(model.get_elbo(adata, return_mean=False, **kw), reference["elbo"])


def test_shipped_bundle_describes_its_proteins(model, cite):
    assert type(model).__name__ == "OnnxTOTALVI"
    assert model.proteins == tuple(cite.obsm["protein_expression"].columns)
    assert model.config.protein_batch_mask and model.config.n_proteins == 29
    assert scvi_onnx.verify(TOTALVI_BUNDLE).ok
    assert "proteins=29" in repr(model)


def test_proteins_matched_by_name(model, cite, reference):
    prot = cite.obsm["protein_expression"]
    shuffled = prot[list(prot.columns[::-1])].copy()
    shuffled["extra_antibody"] = 7.0  # not the model's: ignored
    same_as_reference(model, with_proteins(cite, shuffled), reference)
    # integer counts in a DataFrame of another dtype
    same_as_reference(model, with_proteins(cite, prot.astype(np.int64)), reference)


def test_proteins_as_array_in_model_order(model, cite, reference):
    arr = cite.obsm["protein_expression"].to_numpy()
    same_as_reference(model, with_proteins(cite, arr), reference)
    with pytest.raises(InputDataError, match="28 columns.*29 proteins.*by position"):
        model.get_elbo(with_proteins(cite, arr[:, 1:]))


def test_missing_proteins(model, cite):
    prot = cite.obsm["protein_expression"].drop(columns=["CD4_TotalSeqB"])
    data = with_proteins(cite, prot)
    with pytest.raises(MissingGenesError, match="1 of the model's 29 proteins.*CD4_TotalSeqB"):
        model.get_latent_representation(data)
    z = model.get_latent_representation(data, missing_genes="zero")
    full = prot.assign(CD4_TotalSeqB=0.0)
    np.testing.assert_array_equal(z, model.get_latent_representation(with_proteins(cite, full)))
    with pytest.raises(MissingColumnError, match="obsm has no 'protein_expression'"):
        model.get_elbo(ad.AnnData(X=cite.X, obs=cite.obs, var=cite.var))


def test_bad_protein_values(model, cite):
    prot = cite.obsm["protein_expression"].copy()
    neg = prot.copy()
    neg.iloc[3, 2] = -1.0
    with pytest.raises(InvalidValuesError, match=r"obsm\['protein_expression'\].*negative"):
        model.get_elbo(with_proteins(cite, neg))
    nan = prot.copy()
    nan.iloc[5, 0] = np.nan
    with pytest.raises(InvalidValuesError, match="NaN"):
        model.get_latent_representation(with_proteins(cite, nan))
    text = prot.astype(str)
    with pytest.raises(InvalidValuesError, match="must hold numbers"):
        model.get_latent_representation(with_proteins(cite, text))
    frac = prot.copy()
    frac.iloc[0, 0] += 0.5
    with pytest.warns(NonIntegerCountsWarning, match="protein_expression"):
        model.get_elbo(with_proteins(cite, frac))


def test_dataloader_and_backed_inputs(model, cite, reference, tmp_path):
    x = cite.X.toarray()
    y = cite.obsm["protein_expression"].to_numpy()
    codes = cite.obs["batch"].map({"pbmc_5k": 0, "pbmc_10k": 1}).to_numpy()
    loader = [
        {"X": x[i : i + 40], "proteins": y[i : i + 40], "batch": codes[i : i + 40]}
        for i in range(0, cite.n_obs, 40)
    ]
    np.testing.assert_array_equal(
        model.get_elbo(dataloader=loader, return_mean=False), reference["elbo"]
    )
    with pytest.raises(MissingColumnError, match="'proteins'"):
        model.get_elbo(dataloader=[{"X": x[:4], "batch": codes[:4]}])
    cite.write_h5ad(tmp_path / "cite.h5ad")
    backed = ad.read_h5ad(tmp_path / "cite.h5ad", backed="r")
    same_as_reference(model, backed, reference)


def test_reconstruction_keys_and_marginal_ll_per_cell(model, cite, reference):
    assert list(reference["rec"]) == ["reconst_loss_gene", "reconst_loss_protein"]
    total = reference["rec"]["reconst_loss_gene"] + reference["rec"]["reconst_loss_protein"]
    assert np.all(total > 0) and np.all(-reference["elbo"] > total)  # kl_local >= 0 here
    per_cell = model.get_marginal_ll(cite, n_mc_samples=40, return_mean=False, batch_size=32)
    assert per_cell.shape == (cite.n_obs,) and np.isfinite(per_cell).all()
    mean = model.get_marginal_ll(cite, n_mc_samples=40, batch_size=32)
    assert mean == pytest.approx(per_cell.mean(), rel=1e-12)  # three minibatches of 32
    # importance sampling: the estimate is at least the ELBO on average, and more samples
    # tighten it (per cell, same draws extended). These are pbmc_5k cells, which measured
    # every protein: elsewhere scvi-tools' marginal LL adds the background terms of proteins
    # the ELBO masks as missing, and can fall below it (reproduced as it is)
    assert per_cell.mean() > reference["elbo"].mean()
    more = model.get_marginal_ll(cite, n_mc_samples=400, return_mean=False)
    assert more.mean() >= per_cell.mean() - 1.0


def test_mudata_for_an_anndata_model_is_refused(model, cite):
    md = require("mudata")
    prot = ad.AnnData(cite.obsm["protein_expression"].to_numpy(), obs=cite.obs[[]].copy())
    mdata = md.MuData({"rna": cite, "prot": prot})
    with pytest.raises(InputDataError, match="setup_anndata"):
        model.get_latent_representation(mdata)


def test_runtime_without_torch():
    script = textwrap.dedent(
        f"""
        import sys

        class Block:
            BLOCKED = ("torch", "scvi", "lightning", "pytorch_lightning", "jax", "mudata")

            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in self.BLOCKED:
                    raise ImportError(f"blocked import of {{name}}")
                return None

        sys.meta_path.insert(0, Block())
        import anndata as ad
        import numpy as np
        import scvi_onnx

        adata = ad.read_h5ad({str(CITE_H5AD)!r}, backed="r")
        m = scvi_onnx.load({str(TOTALVI_BUNDLE)!r}, device="cpu")
        z = m.get_latent_representation(adata)
        e = m.get_elbo(adata)
        r = m.get_reconstruction_error(adata)
        ll = m.get_marginal_ll(adata, n_mc_samples=10, return_mean=False)
        assert z.shape == (400, 10) and ll.shape == (400,)
        assert np.isfinite([e, *r.values(), *ll]).all()
        assert scvi_onnx.verify({str(TOTALVI_BUNDLE)!r}).ok
        bad = [k for k in sys.modules if k.split(".")[0] in Block.BLOCKED]
        assert not bad, bad
        print("OK")
        """
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("OK")


def test_manifest_of_the_shipped_bundle():
    man = read_manifest(TOTALVI_BUNDLE)
    assert man.model_class == "TOTALVI" and man.config["module_class"] == "TOTALVAE"
    p = man.registry.proteins
    assert p.attr_name == "obsm" and p.attr_key == "protein_expression" and p.named
    assert man.registry.modalities is None and man.registry.panel is None
    assert len(p.names) == 29 and pd.Index(p.names).is_unique
    # written before the entry existed: read as the scaling its scvi-tools 1.4.2 had
    assert "encoder_input_scaling" not in man.config
    assert scvi_onnx.load(TOTALVI_BUNDLE, device="cpu").config.encoder_input_scaling is True


def test_command_line(model, cite, tmp_path, capsys):
    """info, verify, latent and the metrics take a TOTALVI bundle with no special case."""
    from scvi_onnx.cli import main

    src = tmp_path / "cite.h5ad"
    cite.write_h5ad(src)
    bundle = str(TOTALVI_BUNDLE)
    assert main(["info", bundle, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_class"] == "TOTALVI" and info["proteins"]["n_proteins"] == 29
    assert info["proteins"]["from"] == "obsm['protein_expression']"
    assert main(["verify", bundle]) == 0
    capsys.readouterr()
    assert main(["latent", bundle, str(src), "-o", str(tmp_path / "z.npy")]) == 0
    z = model.get_latent_representation(cite)
    np.testing.assert_array_equal(np.load(tmp_path / "z.npy"), z)
    per_cell = tmp_path / "rec.csv"
    args = ["reconstruction-error", bundle, str(src), "--json", "--seed", "5"]
    assert main([*args, "--per-cell", str(per_cell)]) == 0
    res = json.loads(capsys.readouterr().out)
    want = model.get_reconstruction_error(cite, return_mean=False, seed=5)
    assert set(res["values"]) == set(want)
    table = pd.read_csv(per_cell, index_col=0)
    for k, v in want.items():
        np.testing.assert_allclose(table[k].to_numpy(), v, rtol=1e-12)
        assert res["values"][k] == pytest.approx(v.mean(), rel=1e-12)
    assert res["value"] == pytest.approx(sum(v.mean() for v in want.values()), rel=1e-12)
    assert main(["marginal-ll", bundle, str(src), "--n-mc-samples", "10", "--seed", "5"]) == 0
    line = capsys.readouterr().out.strip()
    mll = model.get_marginal_ll(cite, n_mc_samples=10, seed=5)
    assert line.startswith("marginal_ll:")
    assert float(line.split()[-1]) == pytest.approx(mll, abs=1e-4)


def test_proteins_named_in_uns_must_name_every_column(cite):
    """An obsm array named by ``protein_names_uns_key``: names that do not list the columns one
    by one are refused with the counts of both (ONNX Runtime's shape error, an IndexError or a
    silent pairing of the first names with the first columns, before)."""
    from scvi_onnx.data.proteins import ProteinInput, ProteinReader, obsm_proteins

    names = ("CD3", "CD4", "CD8", "CD14")
    field = ProteinField("obsm", "prot", names, True, "prot_names")
    adata = ad.AnnData(X=np.zeros((5, 2), np.float32))
    adata.obsm["prot"] = np.arange(20, dtype=np.float32).reshape(5, 4)
    adata.uns["prot_names"] = list(names[::-1])
    reader = ProteinReader(obsm_proteins(adata, field), field, 5)
    np.testing.assert_array_equal(reader.read(np.arange(5))(), adata.obsm["prot"][:, ::-1])
    for bad, match in [
        (list(names[:3]), r"4 columns but 3 protein names"),
        (["EXTRA", *names], r"4 columns but 5 protein names"),
        ("CD3", r"protein names are a str, not a list"),
    ]:
        adata.uns["prot_names"] = bad
        with pytest.raises(InputDataError, match=match) as err:
            ProteinReader(obsm_proteins(adata, field), field, 5, missing_genes="zero")
        assert "uns['prot_names']" in str(err.value)
    two_d = ProteinInput(adata.obsm["prot"], np.array([list(names)]), "here")
    with pytest.raises(InputDataError, match="not a list of names"):
        ProteinReader(two_d, field, 5)


def test_proteins_with_nullable_dtypes(model, cite, reference):
    """pandas' nullable columns (Int64, Float64) are numbers; a missing value (pd.NA) is a
    NaN, refused as such."""
    prot = cite.obsm["protein_expression"]
    same_as_reference(model, with_proteins(cite, prot.astype("Int64")), reference)
    same_as_reference(model, with_proteins(cite, prot.astype("Float64")), reference)
    holed = prot.astype("Float64")
    holed.iloc[4, 1] = pd.NA
    with pytest.raises(InvalidValuesError, match="NaN"):
        model.get_elbo(with_proteins(cite, holed))


# ------------------------------------------------------------- setup_mudata: obs in a modality
def _batch_in_modality_bundle(folder):
    """The shipped TOTALVI with the registry setup_mudata writes when the batch column is in
    the RNA modality's obs (``modalities={"rna_layer": "rna", "protein_layer": "prot",
    "batch_key": "rna"}``); a trained export of that kind is checked in tests/parity."""
    import shutil

    bundle = folder / "bundle"
    shutil.copytree(TOTALVI_BUNDLE, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["registry"]["proteins"].update(attr_name="X", attr_key=None)
    manifest["registry"]["modalities"] = {"X": "rna", "proteins": "prot", "batch": "rna"}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return bundle


def _cite_mudata(cells, batch_in="rna"):
    md = require("mudata")
    import warnings

    rna = ad.AnnData(X=cells.X, obs=cells.obs[[]].copy(), var=cells.var[[]].copy())
    prot = cells.obsm["protein_expression"]
    adt = ad.AnnData(X=prot.to_numpy(), obs=cells.obs[[]].copy())
    adt.var_names = list(prot.columns)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mdata = md.MuData({"rna": rna, "prot": adt})
    target = mdata.obs if batch_in == "mdata" else mdata.mod[batch_in].obs
    target["batch"] = cells.obs["batch"].to_numpy()
    return mdata


def test_mudata_obs_column_in_a_modality_cli_and_messages(cite, tmp_path, capsys):
    """--obs sets a column where setup_mudata registered it (here the RNA modality's obs; it
    was set on the MuData's own obs and ignored: the numbers did not change); the column
    misplaced gets an error saying where it is and where it belongs; cells of a modality in
    another order get an error saying how to reorder them; ``info`` names the modality."""
    md = require("mudata")
    from scvi_onnx.cli import main

    bundle = _batch_in_modality_bundle(tmp_path)
    om = scvi_onnx.load(bundle, device="cpu", seed=5)
    mdata = _cite_mudata(cite)
    src = tmp_path / "cells.h5mu"
    mdata.write(src)
    as_is = om.get_elbo(mdata, return_mean=False)
    set_to = _cite_mudata(cite)
    set_to.mod["rna"].obs["batch"] = "pbmc_10k"
    want = om.get_elbo(set_to, return_mean=False)
    assert not np.array_equal(want, as_is)
    for i, (extra, expected) in enumerate([([], as_is), (["--obs", "batch=pbmc_10k"], want)]):
        out = tmp_path / f"e{i}.npy"
        assert (
            main(["elbo", str(bundle), str(src), "--seed", "5", "--per-cell", str(out), *extra])
            == 0
        )
        np.testing.assert_array_equal(np.load(out), expected)
    # no batch column anywhere: --obs supplies it
    bare = _cite_mudata(cite)
    del bare.mod["rna"].obs["batch"]
    bare.write(tmp_path / "bare.h5mu")
    out = tmp_path / "b.npy"
    args = ["elbo", str(bundle), str(tmp_path / "bare.h5mu"), "--seed", "5", "--per-cell", str(out)]
    assert main([*args, "--obs", "batch=pbmc_10k"]) == 0
    np.testing.assert_array_equal(np.load(out), want)
    # the column in the MuData's own obs, not the modality's
    with pytest.raises(MissingColumnError, match=r"mdata.mod\['rna'\].obs has no column "
                       r"'batch'.*it is in mdata.obs.*copy it there"):  # fmt: skip
        om.get_elbo(_cite_mudata(cite, batch_in="mdata"))
    # a modality holding the same cells in another order
    swapped = _cite_mudata(cite)
    order = np.arange(cite.n_obs)[::-1]
    swapped.mod["prot"] = swapped.mod["prot"][order].copy()
    with pytest.raises(InputDataError, match=r"'prot' holds the MuData's cells in another "
                       r"order.*mdata.mod\['prot'\]\[mdata.obs_names\]"):  # fmt: skip
        om.get_elbo(swapped)
    swapped.mod["prot"] = swapped.mod["prot"][swapped.obs_names].copy()
    np.testing.assert_array_equal(om.get_elbo(swapped, return_mean=False), as_is)
    capsys.readouterr()
    assert main(["info", str(bundle)]) == 0
    text = capsys.readouterr().out
    assert "mdata.mod['rna'].obs['batch']" in text
    assert "mdata.mod['rna'].X" in text
    assert md is not None


def test_cli_notes_zero_filled_proteins(model, cite, tmp_path, capsys):
    """--missing-genes zero fills missing proteins by name as it fills genes, and says so
    (the note named genes only: a protein filled with zeros is scored as a measured 0)."""
    from scvi_onnx.cli import main

    data = with_proteins(cite, cite.obsm["protein_expression"].drop(columns=["CD4_TotalSeqB"]))
    path = tmp_path / "q.h5ad"
    data.write_h5ad(path)
    capsys.readouterr()
    args = ["elbo", str(TOTALVI_BUNDLE), str(path), "--seed", "5", "--json"]
    assert main([*args, "--missing-genes", "zero"]) == 0
    cap = capsys.readouterr()
    assert "28 of 29 model proteins found; 1 filled with zeros (CD4_TotalSeqB)" in cap.err
    assert "model genes found" not in cap.err  # every gene is there
    want = model.get_elbo(data, missing_genes="zero")
    assert json.loads(cap.out)["value"] == pytest.approx(want)
    assert main(args) == 2
    assert "1 of the model's 29 proteins are missing" in capsys.readouterr().err
