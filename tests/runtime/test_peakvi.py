"""PEAKVI without torch: the binary cross-entropy reference and kernel, the module's terms on the
shipped bundle against an independent numpy / scipy computation, its data rules, the CLI."""

from __future__ import annotations

import json
import math

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from scipy import stats

import scvi_onnx
from scvi_onnx import bundle as B
from scvi_onnx.cli import main
from scvi_onnx.data import Entries
from scvi_onnx.errors import (
    BundleError,
    BundleIntegrityError,
    InvalidArgumentError,
    InvalidValuesError,
    NonIntegerCountsWarning,
    UnknownCategoryError,
)
from scvi_onnx.maths import distributions as D
from scvi_onnx.maths import rng
from scvi_onnx.maths.likelihood import BLOCK_ELEMENTS, BernoulliScorer, Scratch

from ..conftest import MODELS
from ..peaks import PEAKS_H5AD

BUNDLE = MODELS / "pbmc_peakvi"
CPU = ["--device", "cpu", "--no-progress"]


# ----------------------------------------------------------------------------- the formula
def test_bce_is_minus_bernoulli_log_pmf():
    g = np.random.default_rng(0)
    p = g.uniform(1e-6, 1 - 1e-6, 1000)
    y = g.integers(0, 2, 1000).astype(np.float64)
    np.testing.assert_allclose(
        D.binary_cross_entropy(p, y), -stats.bernoulli.logpmf(y, p), rtol=1e-12
    )


def test_bce_clamps_each_log_at_minus_100_as_torch():
    p = np.array([0.0, 1.0, 0.0, 1.0, 1e-50, 1e-40, 0.5])
    y = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    # log(0) and log1p(-1) are -inf: clamped to -100 (a loss of 100, not infinity); the
    # other branch is multiplied by 0 and adds nothing
    want = [100.0, 100.0, 0.0, 0.0, 100.0, -math.log(1e-40), math.log(2.0)]
    np.testing.assert_allclose(D.binary_cross_entropy(p, y), want, rtol=1e-12)
    got32 = D.binary_cross_entropy(p.astype(np.float32), y.astype(np.float32))
    assert got32.dtype == np.float32 and np.isfinite(got32).all()


# ----------------------------------------------------------------------------- the kernel
def _reference_log_px(px, depth, f, x) -> np.ndarray:
    """-sum_r BCE((px * d) * f, x > 0), q in float32 (as torch), the logs in float64."""
    q = px if depth is None else px * depth[None]
    if f is not None:
        q = q * f
    return -D.binary_cross_entropy(q.astype(np.float64), (x > 0).astype(np.float64)).sum(-1)


def _case(g, S, n, R, *, depth=True, f=True):
    px = g.uniform(0, 1, (S, n, R)).astype(np.float32)
    x = (g.uniform(size=(n, R)) < 0.1) * g.integers(1, 5, (n, R))
    x = x.astype(np.float32) * np.where(g.uniform(size=(n, R)) < 0.1, 0.37, 1.0).astype(np.float32)
    x[0] = 0  # a cell with no accessible region
    d = g.uniform(0.2, 1, (n, 1)).astype(np.float32) if depth else None
    ff = g.uniform(0.3, 1, R).astype(np.float32) if f else None
    return px, x, d, ff


@pytest.mark.parametrize(
    "S, n, R, depth, f",
    [
        (3, 7, 50, True, True),
        (2, 40, 5000, True, False),  # rows of a block split over several blocks
        (5, 3, 2 * BLOCK_ELEMENTS + 3, False, True),  # one row larger than a block
        (1, 1, 1, False, False),
    ],
)
def test_kernel_equals_reference(S, n, R, depth, f, kernel):
    g = np.random.default_rng(R)
    px, x, d, ff = _case(g, S, n, R, depth=depth, f=f)
    scorer = BernoulliScorer(Entries.from_dense(x), R, ff)
    got = scorer.score(px, d)
    want = _reference_log_px(px, d, ff, x)
    assert got.shape == (S, n) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-5)
    # the second call's kept coefficients give the first call's sums, bit for bit
    np.testing.assert_array_equal(scorer.score(px, d), got)


def _scores_twice(scorer: BernoulliScorer, px, d) -> np.ndarray:
    """Both of the scorer's paths: the first call (gather / scatter), then the second (kept
    coefficients), which must give the same bits."""
    first = scorer.score(px, d)
    np.testing.assert_array_equal(scorer.score(px, d), first)
    return first


def test_kernel_keeps_coefficients_for_its_later_calls(kernel):
    """The marginal LL's way: one group of cells, chunk after chunk of samples."""
    g = np.random.default_rng(11)
    px, x, d, ff = _case(g, 12, 9, 333)
    scorer = BernoulliScorer(Entries.from_dense(x), 333, ff)
    chunks = [scorer.score(np.ascontiguousarray(px[s : s + 4]), d) for s in (0, 4, 8)]
    if kernel == "numpy":
        assert scorer._coef  # kept from the second call on
    whole = BernoulliScorer(Entries.from_dense(x), 333, ff).score(px, d)
    np.testing.assert_array_equal(np.concatenate(chunks), whole)
    # another depth array (a different group's): coefficients made again for it
    d2 = (d * np.float32(0.5)).astype(np.float32)
    np.testing.assert_array_equal(
        scorer.score(px, d2), BernoulliScorer(Entries.from_dense(x), 333, ff).score(px, d2)
    )
    np.testing.assert_allclose(scorer.score(px, d2), _reference_log_px(px, d2, ff, x), rtol=2e-6)


def test_kernel_clamps_where_q_is_0_or_1(kernel):
    # no depth, no region factors: q = px, which a sigmoid saturates to exactly 0 or 1
    x = np.array([[1, 0, 2, 0], [0, 0, 0, 0]], dtype=np.float32)
    px = np.array([[[0.0, 1.0, 0.5, 0.25], [1.0, 1.0, 0.0, 0.5]]], dtype=np.float32)
    got = _scores_twice(BernoulliScorer(Entries.from_dense(x), 4, None), px, None)
    want = [[-100 - 100 + math.log(0.5) + math.log(0.75), -200 + math.log(0.5)]]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got, _reference_log_px(px, None, None, x), rtol=1e-6)


def test_kernel_tiny_accessible_probabilities_are_not_lost_in_products(kernel):
    # four accessible regions one quarter apart multiply into one product: q = 3.2e-11 gives
    # ~1e-44, a float32 subnormal with a few bits left (its log off by ~0.1), and 1e-12 gives
    # 0; those rows are summed element by element (log q is -24 and -28, far above the clamp)
    g = np.random.default_rng(8)
    S, n, R = 2, 3, 40
    px, x, d, ff = _case(g, S, n, R)
    x[1] = 0
    acc = [3, 13, 23, 33]
    x[1, acc] = 1.0
    px[0, 1, acc] = (np.float32(3.2e-11) / (d[1] * ff[acc])).astype(np.float32)
    px[1, 1, acc] = 1e-12
    px[1, 2, :] = np.float32(1e-30)  # a row of tiny q, none of it accessible in cell 2...
    x[2, 5] = 2.0  # ...but one
    got = _scores_twice(BernoulliScorer(Entries.from_dense(x), R, ff), px, d)
    want = _reference_log_px(px, d, ff, x)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=2e-6)


def test_kernel_rows_independent_of_their_group(kernel):
    g = np.random.default_rng(3)
    px, x, d, ff = _case(g, 4, 30, 900)
    whole = BernoulliScorer(Entries.from_dense(x), 900, ff).score(px, d)
    e = Entries.from_dense(x)
    for sl in (slice(0, 1), slice(5, 17), slice(29, 30)):
        part = BernoulliScorer(e.rows(sl), 900, ff).score(np.ascontiguousarray(px[:, sl]), d[sl])
        np.testing.assert_array_equal(part, whole[:, sl])


def test_kernel_reuses_a_thread_scratch_and_gives_the_same_sums(kernel):
    g = np.random.default_rng(5)
    scratch = Scratch()
    px, x, d, ff = _case(g, 3, 20, 700)
    e = Entries.from_dense(x)
    fresh = BernoulliScorer(e, 700, ff).score(px, d)
    # a buffer left with another call's values (NaN) changes nothing: every element is written
    scratch.buffer(1 << 20)[:] = np.nan
    kept = scratch.buffer(1)
    reused = BernoulliScorer(e, 700, ff, scratch).score(px, d)
    np.testing.assert_array_equal(reused, fresh)
    assert scratch.buffer(1) is kept  # kept between calls, not allocated again
    # a smaller model's call after a larger one's: the same buffer, the same sums
    px2, x2, d2, ff2 = _case(g, 2, 5, 40)
    np.testing.assert_array_equal(
        BernoulliScorer(Entries.from_dense(x2), 40, ff2, scratch).score(px2, d2),
        BernoulliScorer(Entries.from_dense(x2), 40, ff2).score(px2, d2),
    )
    # each thread has its own buffer (two threads never share one)
    import threading

    other = []
    t = threading.Thread(target=lambda: other.append(scratch.buffer(1)))
    t.start()
    t.join()
    assert other[0] is not kept and not np.shares_memory(other[0], kept)


# ----------------------------------------------------------------------------- shipped bundle
@pytest.fixture(scope="module")
def model():
    return scvi_onnx.load(BUNDLE, device="cpu", seed=11)


@pytest.fixture(scope="module")
def cells():
    return ad.read_h5ad(PEAKS_H5AD)


def _graphs_by_hand(model, a):
    """Encoder, depth and decoder outputs from onnxruntime directly (not through the
    runtime)."""
    import onnxruntime as ort

    sess = {
        g: ort.InferenceSession(str(BUNDLE / f"{g}.onnx"), providers=["CPUExecutionProvider"])
        for g in ("encoder", "depth", "decoder")
    }
    x = np.asarray(a.X.todense(), dtype=np.float32)
    codes = {c: i for i, c in enumerate(model.manifest.registry.batch.categories)}
    batch = np.array([codes[b] for b in a.obs["batch"]], dtype=np.int64)[:, None]
    feeds = {"x": x, "batch_index": batch}

    def run(g):
        return sess[g].run(None, {i.name: feeds[i.name] for i in sess[g].get_inputs()})

    (qz_m, qz_v), (depth,) = run("encoder"), run("depth")
    return x, batch, {"qz_m": qz_m, "qz_v": qz_v, "depth": depth}, sess["decoder"]


def test_elbo_and_marginal_ll_equal_an_independent_computation(model, cells):
    """The runtime's terms against a computation from the graphs, the reference formula and
    scipy.stats: ELBO = -(sum BCE(p d f, x > 0) + KL(q || N(0, I))), marginal LL = log mean_s
    of N(u; 0, I) p(x | u) / q(u | x)."""
    a = cells[:50]
    x, batch, enc, dec = _graphs_by_hand(model, a)
    f = np.load(BUNDLE / B.ARRAYS_FILE)[B.ARR_REGION_FACTORS]
    m, v = enc["qz_m"].astype(np.float64), enc["qz_v"].astype(np.float64)
    L, n, S = m.shape[1], a.n_obs, 30
    eps = rng.normals(11, rng.STREAM_Z, np.arange(n), S * L).reshape(n, S, L).transpose(1, 0, 2)
    u = m[None] + eps * np.sqrt(v)[None]
    px = dec.run(None, {"z": u.astype(np.float32), "batch_index": batch})[0]
    log_px = _reference_log_px(px, enc["depth"], f, x)
    kl = 0.5 * (v + m**2 - 1 - np.log(v)).sum(-1)
    np.testing.assert_allclose(model.get_elbo(a, return_mean=False), log_px[0] - kl, rtol=1e-5)
    rec = model.get_reconstruction_error(a, return_mean=False)
    np.testing.assert_allclose(rec["reconstruction_loss"], -log_px[0], rtol=1e-5)
    log_w = (
        stats.norm.logpdf(u).sum(-1)
        + log_px
        - stats.norm.logpdf(u, m[None], np.sqrt(v)[None]).sum(-1)
    )
    want = np.log(np.mean(np.exp(log_w - log_w.max(0)), 0)) + log_w.max(0)
    got = model.get_marginal_ll(a, n_mc_samples=S, return_mean=False)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_any_positive_value_is_accessible_and_the_encoder_reads_raw_values(model, cells):
    a = cells[:40].copy()
    scaled = a.copy()
    scaled.X = a.X * 3.0  # counts instead of 0/1: the likelihood sees the same x > 0
    z, z3 = model.get_latent_representation(a), model.get_latent_representation(scaled)
    assert not np.allclose(z, z3)  # the encoder reads the values as they are
    dec = scvi_onnx.load(BUNDLE, device="cpu")
    # with the same posterior draws the reconstruction would be equal: check the kernel sees
    # only x > 0 by scoring the same probabilities against both
    e1, e3 = Entries.from_dense(a.X.toarray()), Entries.from_dense(scaled.X.toarray())
    px = np.random.default_rng(0).uniform(size=(2, 40, a.n_vars)).astype(np.float32)
    f = dec.get_region_factors()
    np.testing.assert_array_equal(
        BernoulliScorer(e1, a.n_vars, f).score(px, None),
        BernoulliScorer(e3, a.n_vars, f).score(px, None),
    )


def test_data_rules(model, cells):
    a = cells[:20].copy()
    # a cell with no accessible region: no library size to refuse, a finite ELBO
    empty = a.copy()
    empty.X = sp.csr_matrix(empty.X.toarray() * (np.arange(20) != 0)[:, None])
    assert np.isfinite(model.get_elbo(empty, return_mean=False)).all()
    # non-integer values: accepted with one warning, as scvi-tools (X is registered as counts)
    frac = a.copy()
    frac.X = frac.X * 0.5
    with pytest.warns(NonIntegerCountsWarning):
        model.get_elbo(frac)
    for bad, what in ((-1.0, "negative"), (np.nan, "NaN")):
        b = a.copy()
        dense = b.X.toarray()
        dense[3, 7] = bad
        b.X = dense
        with pytest.raises(InvalidValuesError, match=what):
            model.get_elbo(b)


def test_regions_matched_by_name(model, cells):
    a = cells[:30]
    g = np.random.default_rng(1)
    order = g.permutation(a.n_vars)
    shuffled = a[:, order].copy()
    extra = ad.AnnData(
        X=sp.csr_matrix(np.ones((30, 5), np.float32)),
        obs=shuffled.obs,
        var={"_": np.arange(5)},
    )
    extra.var_names = [f"chrX:{i}-{i + 500}" for i in range(5)]
    wider = ad.concat([shuffled, extra], axis=1, merge="first")
    np.testing.assert_array_equal(
        model.get_elbo(wider, return_mean=False), model.get_elbo(a, return_mean=False)
    )


def test_bit_identical_across_batch_sizes(model, cells):
    ref = model.get_elbo(cells, return_mean=False)
    for bs in (1, 33, 400):
        np.testing.assert_array_equal(model.get_elbo(cells, return_mean=False, batch_size=bs), ref)


def test_wide_models_read_fewer_cells_at_a_time(model, cells, monkeypatch):
    import dataclasses

    from scvi_onnx.methods.engine import MIN_CALL_ROWS

    ref_latent = model.get_latent_representation(cells, batch_size=400)
    ref_elbo = model.get_elbo(cells, return_mean=False, batch_size=400)
    ref_mll = model.get_marginal_ll(cells, n_mc_samples=3, batch_size=400)
    # bounds of 10 and 150 cells x the model's regions: tasks of MIN_CALL_ROWS (64) cells,
    # reads of two tasks (128 cells)
    R = cells.n_vars
    monkeypatch.setattr(
        model,
        "engine",
        dataclasses.replace(model.engine, task_elements=10 * R, read_elements=150 * R),
    )
    assert MIN_CALL_ROWS == 64 and model.engine.read_cells(R) == 128
    reads, seen = [], []
    minibatches = model._minibatches
    monkeypatch.setattr(
        model,
        "_minibatches",
        lambda *a, **k: (reads.append(mb.n) or mb for mb in minibatches(*a, **k)),
    )
    encode = model.module.encode
    monkeypatch.setattr(model.module, "encode", lambda mb: seen.append(mb.n) or encode(mb))
    np.testing.assert_array_equal(
        model.get_latent_representation(cells, batch_size=400), ref_latent
    )
    assert reads == [128, 128, 128, 16]
    assert sorted(seen) == [16] + [64] * 6
    seen.clear()
    np.testing.assert_array_equal(
        model.get_elbo(cells, return_mean=False, batch_size=400), ref_elbo
    )
    assert sorted(seen) == [16] + [64] * 6
    seen.clear()
    # the marginal LL groups cells by batch_size (a mean of minibatch means): not cut
    assert cells.n_obs == 400
    assert model.get_marginal_ll(cells, n_mc_samples=3, batch_size=400) == ref_mll
    assert seen == [400]  # the 400 cells in one minibatch


def test_every_call_carries_enough_rows_to_amortise_the_weights(model, cells, monkeypatch):
    """A wide model's weights are read from memory once per ONNX Runtime call: a call
    carries at least MIN_CALL_ROWS cells (or sample x cell rows), whatever the element bounds
    say (they cut a 100,000-region model's calls to 10 cells, 20 rows in the marginal LL)."""
    import dataclasses

    from scvi_onnx.methods.engine import MIN_CALL_ROWS, Engine

    cpu = Engine.for_provider("CPUExecutionProvider", 2)
    for R in (2_000, 15_792, 100_000, 300_000):
        assert cpu.task_cells(R) == max(MIN_CALL_ROWS, cpu.task_elements // R)
        assert cpu.read_cells(R) % cpu.task_cells(R) == 0
        assert cpu.read_cells(R) <= max(cpu.read_elements // R, cpu.task_cells(R))
    assert cpu.task_cells(100_000) == cpu.read_cells(100_000) == MIN_CALL_ROWS
    assert cpu.task_cells(2_000) == cpu.task_elements // 2_000  # narrow models: unchanged

    idx = np.arange(40)
    ref_elbo = model.get_elbo(cells, indices=idx, return_mean=False)
    ref_mll = model.get_marginal_ll(cells, indices=idx, n_mc_samples=100, return_mean=False)
    # element bounds of 5 cells (or rows) x the regions: as a model 100x wider has
    R = cells.n_vars
    monkeypatch.setattr(
        model,
        "engine",
        dataclasses.replace(
            model.engine, task_elements=5 * R, read_elements=5 * R, chunk_elements=5 * R
        ),
    )
    rows = []
    decoder = model.module.decoder
    run = decoder.run
    monkeypatch.setattr(
        decoder, "run", lambda feeds: rows.append(int(np.prod(feeds["z"].shape[:-1]))) or run(feeds)
    )
    np.testing.assert_array_equal(model.get_elbo(cells, indices=idx, return_mean=False), ref_elbo)
    assert rows == [40]  # 40 cells: one task (8 of 5 cells without the floor)
    rows.clear()
    np.testing.assert_array_equal(
        model.get_marginal_ll(cells, indices=idx, n_mc_samples=100, return_mean=False),
        ref_mll,
    )
    assert sum(rows) == 100 * 40
    # one cell per group, its 100 samples in calls of 64 and 36 (5 rows per call without the
    # floor)
    assert sorted(rows) == [36] * 40 + [MIN_CALL_ROWS] * 40


def test_reads_are_cut_to_a_bound_never_below_one_task():
    from scvi_onnx.methods.engine import READ_ELEMENTS, Engine

    cpu, cuda = (
        Engine.for_provider("CPUExecutionProvider", 2),
        Engine.for_provider("CUDAExecutionProvider", 2),
    )
    assert cpu.read_elements == max(READ_ELEMENTS, cpu.task_elements)
    # CUDA's tasks are larger than the bound: a read still carries one whole task
    assert cuda.read_elements == cuda.task_elements > READ_ELEMENTS
    assert cuda.read_cells(2_000) == cuda.task_cells(2_000)


def test_extra_methods_and_repr(model, cells):
    assert "OnnxPEAKVI" in repr(model) and "model_depth=True" in repr(model)
    f = model.get_region_factors()
    assert f.shape == (cells.n_vars,) and f.dtype == np.float32 and ((f > 0) & (f < 1)).all()
    d = model.get_library_size_factors(cells, batch_size=50)
    assert d.shape == (cells.n_obs,) and ((d > 0) & (d < 1)).all()


def _bundle_copy(tmp_path, edit_config=None, drop_array=None):
    import shutil

    out = tmp_path / "b"
    shutil.copytree(BUNDLE, out)
    man = json.loads((out / B.MANIFEST_FILE).read_text())
    if edit_config:
        man["config"].update(edit_config)
    if drop_array:
        arrays = dict(np.load(out / B.ARRAYS_FILE))
        arrays.pop(drop_array)
        np.savez(out / B.ARRAYS_FILE, **arrays)
        man["files"][B.ARRAYS_FILE] = B.sha256_file(out / B.ARRAYS_FILE)
    (out / B.MANIFEST_FILE).write_text(json.dumps(man))
    return out


def _without_depth_graph(tmp_path):
    out = _bundle_copy(tmp_path)
    man = json.loads((out / B.MANIFEST_FILE).read_text())
    del man["graphs"]["depth"], man["files"][B.DEPTH_FILE]
    (out / B.DEPTH_FILE).unlink()
    (out / B.MANIFEST_FILE).write_text(json.dumps(man))
    return out


def test_bundle_refusals(tmp_path):
    with pytest.raises(BundleIntegrityError, match="depth.onnx"):
        scvi_onnx.load(_without_depth_graph(tmp_path / "d"), device="cpu")
    with pytest.raises(BundleError, match="latent_distribution"):
        scvi_onnx.load(_bundle_copy(tmp_path / "a", {"latent_distribution": "x"}), device="cpu")
    with pytest.raises(BundleIntegrityError, match="region_factors"):
        scvi_onnx.load(_bundle_copy(tmp_path / "b", drop_array=B.ARR_REGION_FACTORS))
    with pytest.raises(InvalidArgumentError, match="scoring"):
        scvi_onnx.load(BUNDLE, device="cpu", scoring="gpu")


# ----------------------------------------------------------------------------- the CLI
def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_info_verify_latent_and_metrics(capsys, tmp_path, model, cells):
    code, out, err = _run(capsys, "info", BUNDLE)
    assert code == 0, err
    assert "PEAKVI" in out and "PEAKVAE" in out and "binary cross-entropy" in out
    assert "gene likelihood" not in out and "library size" not in out
    assert "regions:" in out and "2000 (" in out and "genes:" not in out
    code, out, err = _run(capsys, "info", BUNDLE, "--json")
    info = json.loads(out)
    assert info["model_class"] == "PEAKVI" and info["n_genes"] == 2000
    assert info["model"]["depth factor d"].startswith("per cell") and info["checksums_ok"]
    code, out, err = _run(capsys, "verify", BUNDLE, "--device", "cpu", "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"], out
    assert {r["output"] for r in report["outputs"]} >= {
        "encoder.qz_m",
        "depth.depth",
        "decoder.px",
        "scorer.log_px",
    }
    npy = tmp_path / "z.npy"
    code, out, err = _run(capsys, "latent", BUNDLE, PEAKS_H5AD, "-o", npy, *CPU)
    assert code == 0, err
    np.testing.assert_array_equal(np.load(npy), model.get_latent_representation(cells))
    for command, want in (
        ("elbo", model.get_elbo(cells, seed=7)),
        ("reconstruction-error", model.get_reconstruction_error(cells, seed=7)),
        ("marginal-ll", model.get_marginal_ll(cells, n_mc_samples=20, seed=7)),
    ):
        extra = ["--n-mc-samples", 20] if command == "marginal-ll" else []
        code, out, err = _run(
            capsys, command, BUNDLE, PEAKS_H5AD, "--json", "--seed", 7, *extra, *CPU
        )
        assert code == 0, err
        value = json.loads(out)["value"]
        want = want["reconstruction_loss"] if isinstance(want, dict) else want
        assert value == pytest.approx(want, rel=1e-9), command


def test_new_sample_of_an_unseen_batch(model, cells):
    """The shipped PEAKVI's encoders do not take the batch: a new sample's latent (and depth
    factors) are computed and equal whatever batch the cells are given; the scoring methods,
    whose decoder takes it, refuse the unseen batch unless it is mapped with ``unseen_as``."""
    new = cells[:60].copy()
    new.obs["batch"] = "clinic_sample_7"
    known = cells[:60].copy()
    known.obs["batch"] = "pbmc_10k"
    np.testing.assert_array_equal(
        model.get_latent_representation(new), model.get_latent_representation(known)
    )
    np.testing.assert_array_equal(
        model.get_library_size_factors(new), model.get_library_size_factors(known)
    )
    with pytest.raises(UnknownCategoryError, match="clinic_sample_7"):
        model.get_elbo(new)
    np.testing.assert_array_equal(
        model.get_elbo(new, return_mean=False, unseen_as={"batch": "pbmc_10k"}),
        model.get_elbo(known, return_mean=False),
    )


def test_missing_regions_are_named_regions_and_never_rounded_to_all_found(model, cells):
    from scvi_onnx.data.genes import _percent
    from scvi_onnx.errors import MissingGenesError

    with pytest.raises(MissingGenesError) as e:
        model.get_latent_representation(cells[:5, :1999].copy())
    msg = str(e.value)
    assert "1 of the model's 2000 regions are missing" in msg and "(99.9% found)" in msg
    assert "genes" not in msg.split("missing_genes=")[0]
    assert _percent(99_990, 100_000) == "99.9%" and _percent(100_000, 100_000) == "100.0%"
    assert _percent(1, 100_000) == "<0.1%" and _percent(0, 10) == "0.0%"


def test_regions_named_in_a_var_column_get_the_var_column_hint(model, cells):
    """A PEAKVI's regions are matched like genes: region names held in a var column are
    suggested as gene_key (not the protein advice)."""
    from scvi_onnx.errors import InputDataError, MissingGenesError

    b = cells[:5].copy()
    b.var["region_id"] = b.var_names.astype(str)
    b.var_names = [f"r{i}" for i in range(b.n_vars)]
    with pytest.raises(MissingGenesError, match="gene_key='region_id'") as e:
        model.get_latent_representation(b)
    assert "model.proteins" not in str(e.value) and "model's regions" in str(e.value)
    np.testing.assert_array_equal(
        model.get_latent_representation(b, gene_key="region_id"),
        model.get_latent_representation(cells[:5].copy()),
    )
    d = cells[:5].copy()
    names = d.var_names.astype(str).tolist()
    names[1] = names[0]
    d.var_names = names
    with pytest.raises(InputDataError, match="deduplicate the regions"):
        model.get_latent_representation(d)
