"""Parity with scvi-tools 1.4.2 over a matrix of PEAKVI configurations.

Each configuration trains a tiny PEAKVI on real cells (tests/peaks.py: real PBMC counts of
sparsely detected genes as regions, binarised in X, raw in layers["counts"]), exports it and
compares:

- the latent mean and ``return_dist`` within 1e-4 (the logistic-normal mean, itself a 5,000-draw
  Monte-Carlo mean in scvi-tools, within its Monte-Carlo error);
- per-cell ELBO and reconstruction error equal to scvi-tools' under the same noise (torch's
  ``_standard_normal`` returns the runtime's counter-based draws), on the host kernel and on the
  scoring graph, and within scvi-tools' run-to-run spread otherwise;
- the marginal LL, which scvi-tools 1.4.2 does not implement for PEAKVI: equal to an
  independent importance-sampling computation in torch from scvi-tools' own module outputs
  (its encoder, decoder and ``get_reconstruction_loss``) under the same draws, and checked for
  what an importance-sampling estimate must satisfy;
- the depth and region factors against ``get_library_size_factors`` / ``get_region_factors``.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np
import pytest

from ..conftest import require

torch = require("torch")
scvi = require("scvi")

import scvi_onnx  # noqa: E402
from scvi_onnx.errors import InvalidArgumentError  # noqa: E402
from scvi_onnx.exporter import export_model  # noqa: E402
from scvi_onnx.exporter.parity import QUIET_TRAINING, torch_draws  # noqa: E402
from scvi_onnx.exporter.specs import peakvae as peakvi_spec  # noqa: E402
from scvi_onnx.maths import rng  # noqa: E402

from ..peaks import peaks  # noqa: E402

#: Regions of the matrix configurations (the first of the 2,000; "full-default" takes all).
N_REGIONS = 600

CONFIGS = {
    # scvi-tools' defaults (n_hidden sqrt(R) = 44, n_latent sqrt(44) = 6, 2 + 2 layers, layer
    # norm, depth, region factors) on all 2,000 regions, binary X
    "full-default": dict(setup=dict(batch_key="batch"), model=dict(), regions=None),
    # raw counts (non-binary: x > 0 in the likelihood, raw values into the encoder), no depth,
    # no region factors, logistic-normal latent
    "counts-nodepth-norf-ln": dict(
        setup=dict(batch_key="batch", layer="counts"),
        model=dict(model_depth=False, region_factors=False, latent_distribution="ln"),
    ),
    "covariates-encoded-deep": dict(
        setup=dict(
            batch_key="batch",
            categorical_covariate_keys=["donor", "single"],
            continuous_covariate_keys=["pct", "depth"],
        ),
        model=dict(encode_covariates=True, deeply_inject_covariates=True),
    ),
    "batchnorm-both-1layer": dict(
        setup=dict(batch_key="batch"),
        model=dict(
            use_batch_norm="both", use_layer_norm="none", n_layers_encoder=1, n_layers_decoder=1
        ),
    ),
    "bn-encoder-ln-decoder-3layers-manybatch-cont": dict(
        setup=dict(batch_key="many", continuous_covariate_keys=["pct"]),
        model=dict(
            use_batch_norm="encoder",
            use_layer_norm="decoder",
            n_layers_encoder=3,
            n_layers_decoder=3,
            extra_encoder_kwargs={"var_activation": torch.nn.functional.softplus},
        ),
    ),
    "nobatch-norf": dict(setup=dict(), model=dict(region_factors=False)),
    "ln-encoded-cats-nodepth-deep": dict(
        setup=dict(batch_key="batch", categorical_covariate_keys=["donor"]),
        model=dict(
            latent_distribution="ln",
            encode_covariates=True,
            deeply_inject_covariates=True,
            model_depth=False,
            use_batch_norm="decoder",
        ),
    ),
}


def train(setup: dict, model_kw: dict, regions: int | None = N_REGIONS, epochs: int = 3):
    adata = peaks(regions)
    scvi.model.PEAKVI.setup_anndata(adata, **setup)
    scvi.settings.seed = 0
    kw = model_kw if regions is None else dict(n_hidden=16, n_latent=5) | model_kw
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = scvi.model.PEAKVI(adata, **kw)
        model.train(max_epochs=epochs, **QUIET_TRAINING)
    model.module.eval()
    return model, adata


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def trained(request, tmp_path_factory):
    """Each configuration exported with the sparse encoders too (a bundle gets them from
    10,000 regions: here at any size) and loaded with them (``input_layer="sparse"``; these
    cells are ~11% non-zero, so ``"auto"`` would take the dense ones).
    ``test_sparse_and_dense_input_layers_agree`` holds the dense ones to them; the dense
    ones are held to scvi-tools by the shipped and fuzzed bundles too."""
    cfg = CONFIGS[request.param]
    model, adata = train(cfg["setup"], cfg["model"], cfg.get("regions", N_REGIONS))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(peakvi_spec, "SPARSE_MIN_REGIONS", 0)
        path = export_model(model, tmp_path_factory.mktemp(request.param) / "bundle")
    assert scvi_onnx.load(path, device="cpu").module.sparse is None  # auto: too dense
    onnx_model = scvi_onnx.load(path, device="cpu", seed=123, input_layer="sparse")
    assert onnx_model.module.sparse is not None
    return request.param, model, adata, onnx_model


def z_noise(om, n_obs: int, n_samples: int) -> np.ndarray:
    """The runtime's standard-normal draws of z, (n_samples, n_obs, n_latent)."""
    L = om.n_latent
    e = rng.normals(om.seed, rng.STREAM_Z, np.arange(n_obs), n_samples * L)
    return e.reshape(n_obs, n_samples, L).transpose(1, 0, 2)


@contextlib.contextmanager
def same_noise(om, n_obs: int):
    """scvi-tools' one ``rsample`` of z per forward pass (all cells in one minibatch) returns
    the runtime's draw 0 of each cell."""
    with torch_draws([z_noise(om, n_obs, 1)[0]]):
        yield


def torch_log_weights(model, adata, eps: np.ndarray) -> np.ndarray:
    """Importance log-weights ``log N(u; 0, I) + log p(x | z(u)) - log q(u | x)`` computed in
    torch from scvi-tools' own module: its inference (q(u | x), d), its generative (px at
    z = u, or softmax(u) for "ln") and its ``get_reconstruction_loss`` (torch's BCE of
    p * d * f against x > 0). ``eps`` (S, N, L) are the standard-normal draws of u."""
    m = model.module
    dl = model._make_data_loader(adata=adata, batch_size=adata.n_obs)
    tensors = next(iter(dl))
    out = []
    with torch.inference_mode():
        inf = m.inference(**m._get_inference_input(tensors))
        qz, d = inf["qz"], inf["d"]
        f = torch.sigmoid(m.region_factors) if m.region_factors is not None else 1
        prior = torch.distributions.Normal(0.0, 1.0)
        for e in eps:
            u = qz.loc + torch.as_tensor(e, dtype=torch.float32) * qz.scale
            z = torch.softmax(u, -1) if m.latent_distribution == "ln" else u
            px = m.generative(**m._get_generative_input(tensors, {"z": z, "qz": qz}))["px"]
            rl = m.get_reconstruction_loss(px, d, f, tensors["X"])
            lw = prior.log_prob(u).sum(-1) - qz.log_prob(u).sum(-1) - rl
            out.append(lw.double().numpy())
    return np.stack(out)


def torch_marginal_ll(model, adata, eps: np.ndarray) -> np.ndarray:
    lw = torch.as_tensor(torch_log_weights(model, adata, eps))
    return (torch.logsumexp(lw, 0) - math.log(lw.shape[0])).numpy()


# ----------------------------------------------------------------------------- latent
def test_latent_mean_and_dist(trained):
    name, model, adata, om = trained
    rm, rv = model.get_latent_representation(adata, return_dist=True)
    gm, gv = om.get_latent_representation(adata, return_dist=True)
    np.testing.assert_allclose(gm, rm, atol=1e-4, rtol=0)
    np.testing.assert_allclose(gv, rv, atol=1e-4, rtol=1e-4)
    ref = model.get_latent_representation(adata)
    got = om.get_latent_representation(adata)
    assert got.shape == ref.shape and got.dtype == np.float32
    if model.module.latent_distribution == "ln":
        # both are 5,000-draw Monte-Carlo means of softmax(u): Monte-Carlo error only
        diff = np.abs(got - ref)
        assert diff.max() < 0.02 and diff.mean() < 0.004, (diff.max(), diff.mean())
        np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)
    else:
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_depth_and_region_factors(trained):
    name, model, adata, om = trained
    if model.module.model_depth:
        np.testing.assert_allclose(
            om.get_library_size_factors(adata, batch_size=77),
            model.get_library_size_factors(adata),
            atol=1e-5,
        )
    else:
        with pytest.raises(InvalidArgumentError, match="model_depth=False"):
            om.get_library_size_factors(adata)
        # on Dask too (the refusal comes before any cluster is needed)
        da = require("dask.array")
        lazy = adata.copy()
        lazy.X = da.from_array(lazy.X.toarray() if hasattr(lazy.X, "toarray") else lazy.X)
        with pytest.raises(InvalidArgumentError, match="model_depth=False"):
            om.get_library_size_factors(lazy)
    if model.module.region_factors is not None:
        np.testing.assert_array_equal(om.get_region_factors(), model.get_region_factors())
    else:
        with pytest.raises(InvalidArgumentError, match="region_factors=False"):
            om.get_region_factors()


# ----------------------------------------------------------------------------- ELBO
@pytest.mark.parametrize("scoring", ["host", "graph"])
def test_elbo_and_reconstruction_same_noise(trained, scoring):
    name, model, adata, om = trained
    if scoring == "graph":
        om = scvi_onnx.load(om.path, device="cpu", seed=123, scoring="graph")
        assert om.module.scores_on_graph
    n = adata.n_obs
    with same_noise(om, n):
        ref = model.get_elbo(adata, batch_size=n, return_mean=False).numpy()
    got = om.get_elbo(adata, return_mean=False)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-3)
    with same_noise(om, n):
        ref_rec = model.get_reconstruction_error(adata, batch_size=n, return_mean=False)
    got_rec = om.get_reconstruction_error(adata, return_mean=False, batch_size=37)
    assert list(got_rec) == list(ref_rec) == ["reconstruction_loss"]
    np.testing.assert_allclose(
        got_rec["reconstruction_loss"],
        ref_rec["reconstruction_loss"].numpy(),
        rtol=2e-5,
        atol=2e-3,
    )


def test_sparse_and_dense_input_layers_agree(trained):
    """The sparse encoders (x @ W from the non-zero entries) and the full graphs give the same
    numbers to float32 rounding, per cell, for every method; the sparse path never opens the
    full encoders, and its numbers do not depend on the batch size."""
    name, model, adata, om = trained
    dense = scvi_onnx.load(om.path, device="cpu", seed=123, input_layer="dense")
    assert dense.module.sparse is None
    sparse = scvi_onnx.load(om.path, device="cpu", seed=123, input_layer="sparse")
    sm, sv = sparse.get_latent_representation(adata, return_dist=True)
    dm, dv = dense.get_latent_representation(adata, return_dist=True)
    np.testing.assert_allclose(sm, dm, atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(sv, dv, atol=2e-6, rtol=1e-5)
    for bs in (1, 37, 400):
        np.testing.assert_array_equal(
            sparse.get_latent_representation(adata, return_dist=True, batch_size=bs)[0], sm
        )
    se = sparse.get_elbo(adata, return_mean=False)
    np.testing.assert_allclose(se, dense.get_elbo(adata, return_mean=False), rtol=1e-5)
    np.testing.assert_array_equal(sparse.get_elbo(adata, return_mean=False, batch_size=7), se)
    sr = sparse.get_reconstruction_error(adata, return_mean=False)["reconstruction_loss"]
    dr = dense.get_reconstruction_error(adata, return_mean=False)["reconstruction_loss"]
    np.testing.assert_allclose(sr, dr, rtol=1e-5)
    sl = sparse.get_marginal_ll(adata, n_mc_samples=20, return_mean=False)
    np.testing.assert_allclose(
        sl, dense.get_marginal_ll(adata, n_mc_samples=20, return_mean=False), rtol=1e-5
    )
    if model.module.model_depth:
        np.testing.assert_allclose(
            sparse.get_library_size_factors(adata),
            dense.get_library_size_factors(adata),
            rtol=1e-5,
            atol=1e-7,
        )
    # the full encoders were never opened by the sparse model
    assert sparse.module.encoder._session is None
    if sparse.module.depth_encoder is not None:
        assert sparse.module.depth_encoder._session is None


def test_stochastic_methods_within_scvi_spread(trained):
    """Whole-method agreement: our mean lies within scvi-tools' own run-to-run spread."""
    name, model, adata, om = trained
    runs = np.array([float(model.get_elbo(adata)) for _ in range(5)])
    ours = om.get_elbo(adata)
    spread = max(runs.std(), 1e-3 * abs(runs.mean()))
    assert abs(ours - runs.mean()) < 5 * spread, (ours, runs)
    rec = np.array(
        [float(model.get_reconstruction_error(adata)["reconstruction_loss"]) for _ in range(5)]
    )
    ours_rec = om.get_reconstruction_error(adata)["reconstruction_loss"]
    spread = max(rec.std(), 1e-3 * abs(rec.mean()))
    assert abs(ours_rec - rec.mean()) < 5 * spread, (ours_rec, rec)


def test_get_marginal_ll_not_in_scvi_tools(trained):
    """What the README says: scvi-tools 1.4.2 has no marginal LL for PEAKVI."""
    name, model, adata, om = trained
    with pytest.raises(NotImplementedError):
        model.get_marginal_ll(adata[:4].copy(), n_mc_samples=2)


# ----------------------------------------------------------------------------- marginal LL
@pytest.mark.parametrize("scoring", ["host", "graph"])
def test_marginal_ll_equals_torch_importance_sampling(trained, scoring):
    """Per cell, equal to the torch computation from scvi-tools' module under the same
    draws (20 samples, 7 per pass, cells in groups of 50)."""
    name, model, adata, om = trained
    if scoring == "graph":
        om = scvi_onnx.load(om.path, device="cpu", seed=123, scoring="graph")
    n, s = 64, 20
    sub = adata[:n].copy()
    ref = torch_marginal_ll(model, sub, z_noise(om, n, s))
    got = om.get_marginal_ll(
        sub, n_mc_samples=s, return_mean=False, n_mc_samples_per_pass=7, batch_size=50
    )
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-3)


def test_marginal_ll_importance_sampling_properties(trained):
    """What an importance-sampling estimate of log p(x) must satisfy, per cell and on
    average: finite; each cell's value independent of how cells and samples are split; the
    log of a mean of weights whose mean log is the ELBO, so equal to the ELBO on average with
    one sample, then higher, increasing with the number of samples (Jensen); below 0 (a
    Bernoulli likelihood: p(x) <= 1). The averages are over cells (independent replicates)
    and, for 1 and 10 samples, over 8 seeds (their spread is larger)."""
    name, model, adata, om = trained
    idx = np.arange(0, adata.n_obs, 2)  # 200 cells
    seeds = range(8)

    def mll(s: int, seed: int, **kw) -> np.ndarray:
        return om.get_marginal_ll(
            adata, indices=idx, n_mc_samples=s, return_mean=False, seed=seed, **kw
        )

    m1 = np.mean([mll(1, k) for k in seeds], 0)
    m10 = np.mean([mll(10, k) for k in seeds], 0)
    m1000 = mll(1000, 0)
    for v in (m1, m10, m1000):
        assert v.shape == (idx.size,) and np.isfinite(v).all()
    assert (m1000 < 0).all()
    # chunking: other minibatches and samples per pass, the same per-cell numbers (to the
    # float32 rounding of a graph run on another number of rows: 1e-9 relative seen)
    np.testing.assert_allclose(
        mll(1000, 0, batch_size=23, n_mc_samples_per_pass=9), m1000, rtol=1e-7, atol=0
    )
    # one sample: the log-weight itself, whose expectation is the ELBO
    elbo = np.mean([om.get_elbo(adata, indices=idx, return_mean=False, seed=k) for k in seeds], 0)

    def z_score(d: np.ndarray) -> float:
        return d.mean() / (d.std() / math.sqrt(d.size))

    assert abs(z_score(m1 - elbo)) < 4, (m1 - elbo).mean()
    # more samples: higher on average
    for d in (m10 - m1, m1000 - m10, m1000 - elbo):
        assert z_score(d) > 3, (d.mean(), d.std())


def test_marginal_ll_converges_to_quadrature(tmp_path):
    """With a one-dimensional latent, log p(x) = log of the integral of N(u; 0, 1) p(x | u)
    over u, computed by quadrature in torch with scvi-tools' module (per cell, 2,001 points
    over the posterior mean +- 12 posterior sd; the integrand is checked negligible at both
    ends); the importance-sampling estimate approaches it as samples grow (bias ~ variance
    / (2 S))."""
    model, adata = train(dict(batch_key="batch"), dict(n_latent=1, n_hidden=16), epochs=5)
    om = scvi_onnx.load(export_model(model, tmp_path / "bundle"), device="cpu", seed=5)
    sub = adata[:40].copy()
    m = model.module
    tensors = next(iter(model._make_data_loader(adata=sub, batch_size=sub.n_obs)))
    with torch.inference_mode():
        inf = m.inference(**m._get_inference_input(tensors))
        qz = inf["qz"]
        f = torch.sigmoid(m.region_factors)
        t = torch.linspace(-12.0, 12.0, 2001, dtype=torch.float64)
        grid = qz.loc.double()[None, :, :] + t[:, None, None] * qz.scale.double()[None]  # (G, N, 1)
        logs = []
        for chunk in grid.split(250):
            z = chunk.float()
            px = m.generative(**m._get_generative_input(tensors, {"z": z, "qz": qz}))["px"]
            rl = torch.stack([m.get_reconstruction_loss(p, inf["d"], f, tensors["X"]) for p in px])
            logs.append(-rl.double() - 0.5 * chunk[..., 0] ** 2 - 0.5 * math.log(2 * math.pi))
        logs = torch.cat(logs)  # (G, N)
        assert (logs[[0, -1]] < logs.max(0).values - 30).all()  # the ends carry no mass
        step = (t[1] - t[0]) * qz.scale.double()[:, 0]
        log_px = (torch.logsumexp(logs, 0) + torch.log(step)).numpy()
    est = {s: om.get_marginal_ll(sub, n_mc_samples=s, return_mean=False) for s in (10, 2000)}
    err = {s: est[s] - log_px for s in est}
    assert np.abs(err[2000]).max() < 0.05, err[2000]
    assert err[2000].mean() < 0.01 and np.abs(err[2000]).mean() < np.abs(err[10]).mean()


# ----------------------------------------------------------------------------- saturated logits
def test_saturated_logits_match_torch(tmp_path):
    """Accessibility and depth logits far below -10 (a model without layer norm, a few epochs
    in, reaches -20 on real cells): ONNX's ``Sigmoid`` is accurate in absolute terms only
    (0 below -18, 460% relative error at -15), and ``log(p d f)`` at an accessible region
    needs ``p`` to float32's relative precision. The graphs compute ``1 / (1 + exp(-x))`` as
    torch does: the export validates, and the per-cell ELBO, reconstruction and marginal LL
    equal scvi-tools' under the same noise."""
    model, adata = train(
        dict(batch_key="batch"), dict(use_layer_norm="none", n_layers_decoder=1), epochs=2
    )
    m = model.module
    with torch.no_grad():  # push the logits of both sigmoid heads far into the low tail
        for lin in (m.z_decoder.output[0], m.d_encoder.output[0]):
            lin.weight.mul_(10.0)
            lin.bias.sub_(20.0)
    n = adata.n_obs
    tensors = next(iter(model._make_data_loader(adata=adata, batch_size=n)))
    with torch.inference_mode():
        inf = m.inference(**m._get_inference_input(tensors))
        logits = m.z_decoder.output[0](m.z_decoder.px_decoder(inf["qz"].loc, tensors["batch"]))
        depth = inf["d"]
    assert logits.min() < -25 and (logits < -18).float().mean() > 0.1, logits.min()
    assert depth.min() < 1e-5, depth.min()
    om = scvi_onnx.load(export_model(model, tmp_path / "bundle"), device="cpu", seed=123)
    np.testing.assert_allclose(
        om.get_library_size_factors(adata), depth.numpy().ravel(), rtol=1e-5, atol=0
    )
    with same_noise(om, n):
        ref = model.get_elbo(adata, batch_size=n, return_mean=False).numpy()
    np.testing.assert_allclose(om.get_elbo(adata, return_mean=False), ref, rtol=2e-5, atol=2e-3)
    with same_noise(om, n):
        rec = model.get_reconstruction_error(adata, batch_size=n, return_mean=False)
    np.testing.assert_allclose(
        om.get_reconstruction_error(adata, return_mean=False)["reconstruction_loss"],
        rec["reconstruction_loss"].numpy(),
        rtol=2e-5,
        atol=2e-3,
    )
    sub = adata[:32].copy()
    ref_mll = torch_marginal_ll(model, sub, z_noise(om, 32, 10))
    got_mll = om.get_marginal_ll(sub, n_mc_samples=10, return_mean=False)
    np.testing.assert_allclose(got_mll, ref_mll, rtol=2e-5, atol=2e-3)


# ----------------------------------------------------------------------------- shipped example
def test_shipped_example_against_its_scvi_tools_folder():
    """models/pbmc_peakvi against models/pbmc_peakvi_torch (scripts/train_peakvi_example.py),
    on its cells with the regions in another order (matched by name)."""
    from ..conftest import MODELS

    om = scvi_onnx.load(MODELS / "pbmc_peakvi", device="cpu", seed=123)
    adata = peaks()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scvi.model.PEAKVI.setup_anndata(adata, batch_key="batch")
        ref = scvi.model.PEAKVI.load(str(MODELS / "pbmc_peakvi_torch"), adata=adata)
    shuffled = adata[:, np.random.default_rng(0).permutation(adata.n_vars)].copy()
    np.testing.assert_allclose(
        om.get_latent_representation(shuffled), ref.get_latent_representation(adata), atol=1e-4
    )
    n = adata.n_obs
    with same_noise(om, n):
        want = ref.get_elbo(adata, batch_size=n, return_mean=False).numpy()
    np.testing.assert_allclose(om.get_elbo(shuffled, return_mean=False), want, rtol=2e-5, atol=2e-3)
    np.testing.assert_allclose(
        om.get_library_size_factors(shuffled), ref.get_library_size_factors(adata), atol=1e-5
    )


def test_sparse_encoders_read_no_dense_rows(tmp_path):
    """With the sparse encoders the rows of a sparse source are never densified: the same
    numbers from CSR, CSC, dense and backed inputs, and the same typed errors and warning
    (worded from the entries) as the dense encoders give."""
    import scipy.sparse as sp

    from ..peaks import export_sparse_peakvi

    path, _, adata = export_sparse_peakvi(tmp_path / "b", n_regions=N_REGIONS)
    om = scvi_onnx.load(path, device="cpu", seed=123, input_layer="sparse")

    from scvi_onnx.errors import InvalidValuesError, NonIntegerCountsWarning

    assert not om.module.needs.dense and om.module.latent_call_rows == 256
    assert om.module.score_task_rows == 256 and adata.n_obs > 256
    dense_model = scvi_onnx.load(om.path, device="cpu", seed=123, input_layer="dense")
    csr = adata.copy()
    csr.X = sp.csr_matrix(adata.X, dtype=np.float32)
    want_z = om.get_latent_representation(csr)
    want_e = om.get_elbo(csr, return_mean=False)
    want_r = om.get_reconstruction_error(csr, return_mean=False)["reconstruction_loss"]
    # tasks of 256 cells decoded 64 at a time give the numbers of the engine's tasks (here
    # all cells in one call), of tiny minibatches, and of one thread
    other = scvi_onnx.load(om.path, device="cpu", seed=123, input_layer="sparse", n_threads=1)
    for task_rows, bs in ((None, None), (256, 7), (256, 300)):
        other.module.score_task_rows = task_rows
        np.testing.assert_array_equal(other.get_elbo(csr, return_mean=False, batch_size=bs), want_e)
        got = other.get_reconstruction_error(csr, return_mean=False, batch_size=bs)
        np.testing.assert_array_equal(got["reconstruction_loss"], want_r)
    path = tmp_path / "cells.h5ad"
    csr.write_h5ad(path)
    import anndata as ad

    for x in (sp.csc_matrix(csr.X), csr.X.toarray()):
        other = csr.copy()
        other.X = x
        np.testing.assert_array_equal(om.get_latent_representation(other), want_z)
        np.testing.assert_array_equal(om.get_elbo(other, return_mean=False), want_e)
    backed = ad.read_h5ad(path, backed="r")
    np.testing.assert_array_equal(om.get_latent_representation(backed), want_z)
    np.testing.assert_array_equal(om.get_elbo(backed, return_mean=False), want_e)
    backed.file.close()
    # bad values: the error the dense rows give, word for word
    for value, match in ((-1.0, "negative"), (np.nan, "NaN")):
        bad = csr.copy()
        x = csr.X.toarray()
        x[7, 3] = value
        bad.X = sp.csr_matrix(x)
        with pytest.raises(InvalidValuesError, match=match) as got:
            om.get_elbo(bad)
        with pytest.raises(InvalidValuesError) as ref:
            dense_model.get_elbo(bad)
        assert str(got.value) == str(ref.value)
        assert bad.obs_names[7] in str(got.value)
    half = csr.copy()
    half.X = half.X.copy()
    half.X.data[:5] = 0.5
    with pytest.warns(NonIntegerCountsWarning) as got_w:
        om.get_latent_representation(half)
    with pytest.warns(NonIntegerCountsWarning) as ref_w:
        dense_model.get_latent_representation(half)
    assert [str(w.message) for w in got_w] == [str(w.message) for w in ref_w]


def test_auto_takes_the_sparse_encoders_on_the_cpu_only(tmp_path, monkeypatch):
    """``input_layer="auto"``: the sparse encoders where the recorded density allows, on the
    CPU; where a session would try CUDA, the dense ones (a GPU multiplies them faster)."""
    import json

    from scvi_onnx.bundle import format as F
    from scvi_onnx.models import peakvae

    from ..peaks import export_sparse_peakvi

    path, _, _ = export_sparse_peakvi(tmp_path / "b", n_regions=300, epochs=1)
    man = json.loads((path / "manifest.json").read_text())
    for name in ("encoder_sparse", "depth_sparse"):
        man["graphs"][name][F.INPUT_LAYER]["density"] = 0.01
    (path / "manifest.json").write_text(json.dumps(man))  # lists no checksum of itself
    assert scvi_onnx.load(path, device="cpu").module.sparse is not None
    assert scvi_onnx.load(path).module.sparse is not None  # "auto" on a CPU-only machine
    monkeypatch.setattr(peakvae, "may_use_cuda", lambda device: True)
    assert scvi_onnx.load(path).module.sparse is None
    assert scvi_onnx.load(path, input_layer="sparse").module.sparse is not None
