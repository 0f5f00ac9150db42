"""Trust (issue 5): refuse what cannot be done correctly, say why, never return a wrong number.

Every refusal is checked through the Python API (a typed ``ScviOnnxError`` raised by scvi-onnx's
own code, whose message names the offending thing and says what to do) and through the CLI
(``scvi_onnx.cli.main`` in-process: exit status 2, exactly one ``scvi-onnx: error:`` line on
stderr, nothing on stdout, and no output file, temporary or final, left behind).

Sections: 1. bundle integrity, 2. ``verify``, 3. bad and unusual data, 4. CLI refusals of data
files, 5. determinism (CPU; CPU vs CUDA when a GPU is present), 6. threads and memory.
"""

from __future__ import annotations

import concurrent.futures as cf
import gc
import json
import os
import shutil
import threading
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import scvi_onnx
from scvi_onnx import bundle as B
from scvi_onnx.bundle import format as F
from scvi_onnx.cli import main
from scvi_onnx.errors import (
    BundleError,
    BundleIntegrityError,
    BundleVersionError,
    InputDataError,
    InvalidArgumentError,
    InvalidValuesError,
    MissingColumnError,
    MissingGenesError,
    NonIntegerCountsWarning,
    ScviOnnxError,
    UnknownCategoryError,
    ZeroLibrarySizeError,
)

from ..conftest import EXAMPLE_H5AD, MODELS, SHIPPED_BUNDLE

RUNTIME_DIR = Path(scvi_onnx.__file__).resolve().parent
CPU = ["--device", "cpu", "--no-progress"]
BUNDLE_FILES = (B.ENCODER_FILE, B.DECODER_FILE, B.ARRAYS_FILE, B.PROBES_FILE)


# ============================================================================================
# fixtures and helpers
# ============================================================================================
@pytest.fixture(scope="module")
def model():
    return scvi_onnx.load(SHIPPED_BUNDLE, device="cpu")


@pytest.fixture(scope="module")
def query():
    q = ad.read_h5ad(EXAMPLE_H5AD)
    assert q.n_obs == 200 and sp.issparse(q.X) and q.X.dtype == np.float32
    return q


@pytest.fixture()
def out_dir(tmp_path):
    """An empty folder for CLI outputs; a refusal must leave it empty (no temporaries)."""
    d = tmp_path / "out"
    d.mkdir()
    return d


def _raises(exc_type, fn, *needles):
    """``fn()`` raises ``exc_type`` (a ScviOnnxError) from scvi-onnx's code, naming needles."""
    with pytest.raises(exc_type) as ei:
        fn()
    err = ei.value
    assert isinstance(err, ScviOnnxError), type(err)
    origin = Path(str(ei.traceback[-1].path)).resolve()
    assert origin.is_relative_to(RUNTIME_DIR), f"raised from {origin}, not scvi-onnx: {err!r}"
    msg = str(err)
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_refused(result, *needles, code=2) -> str:
    status, out, err = result
    assert status == code, (status, out, err)
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("scvi-onnx: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _copy_bundle(tmp_path: Path, src: Path = SHIPPED_BUNDLE) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(src, dst)
    return dst


def _read_manifest_json(bundle: Path) -> dict:
    return json.loads((bundle / B.MANIFEST_FILE).read_text())


def _write_manifest_json(bundle: Path, man: dict) -> None:
    (bundle / B.MANIFEST_FILE).write_text(json.dumps(man))


def _reseal(bundle: Path, *names: str) -> None:
    """Recompute the manifest's sha256 of files we rewrote on purpose."""
    man = _read_manifest_json(bundle)
    for name in names:
        man["files"][name] = B.sha256_file(bundle / name)
    _write_manifest_json(bundle, man)


def _bundle_commands(bundle, out_dir: Path) -> list[list]:
    """CLI commands that must all refuse an unusable bundle."""
    return [
        ["latent", bundle, EXAMPLE_H5AD, "-o", out_dir / "z.h5ad", *CPU],
        ["latent", bundle, EXAMPLE_H5AD, "-o", out_dir / "z.csv", *CPU],
        ["elbo", bundle, EXAMPLE_H5AD, "--per-cell", out_dir / "elbo.npy", *CPU],
        ["marginal-ll", bundle, EXAMPLE_H5AD, "--n-mc-samples", 5, "--per-cell", out_dir / "m.csv"],
        ["verify", bundle, "--device", "cpu"],
    ]


def _assert_bundle_refused(capsys, bundle, out_dir, exc_type, *needles):
    """Python load + verify and every CLI command refuse the bundle, naming the needles."""
    _raises(exc_type, lambda: scvi_onnx.load(bundle, device="cpu"), *needles)
    _raises(exc_type, lambda: scvi_onnx.verify(bundle, device="cpu"), *needles)
    for argv in _bundle_commands(bundle, out_dir):
        _assert_refused(_cli(capsys, *argv), *needles)
    assert list(out_dir.iterdir()) == []


# ============================================================================================
# 1. bundle integrity
# ============================================================================================
def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _delete(p: Path) -> None:
    p.unlink()


@pytest.mark.parametrize("damage", [_flip, _truncate, _delete], ids=["flip", "truncate", "delete"])
@pytest.mark.parametrize("name", BUNDLE_FILES)
def test_damaged_bundle_file_is_refused(capsys, tmp_path, out_dir, name, damage):
    bundle = _copy_bundle(tmp_path)
    damage(bundle / name)
    hint = "missing" if damage is _delete else "altered or truncated"
    _assert_bundle_refused(capsys, bundle, out_dir, BundleIntegrityError, name, hint, "restore")


def _manifest_not_json(bundle: Path) -> None:
    (bundle / B.MANIFEST_FILE).write_text('{"format": "scvi-onnx-bundle", "schema_ver')


def _manifest_binary(bundle: Path) -> None:
    (bundle / B.MANIFEST_FILE).write_bytes(b"\xff\xfe\x00\x01garbage")


def _manifest_missing(bundle: Path) -> None:
    (bundle / B.MANIFEST_FILE).unlink()


def _manifest_foreign(bundle: Path) -> None:
    man = _read_manifest_json(bundle)
    man["format"] = "some-other-tool"
    _write_manifest_json(bundle, man)


def _manifest_array(bundle: Path) -> None:
    (bundle / B.MANIFEST_FILE).write_text("[1, 2, 3]")


@pytest.mark.parametrize(
    ("damage", "exc_type", "needles"),
    [
        (
            _manifest_not_json,
            BundleIntegrityError,
            ["manifest.json", "not valid JSON", "re-export"],
        ),
        (_manifest_binary, BundleIntegrityError, ["manifest.json", "not valid JSON"]),
        (_manifest_missing, BundleError, ["manifest.json is missing", "scvi-onnx export"]),
        (_manifest_foreign, BundleError, ["'some-other-tool'", "not a scvi-onnx manifest"]),
        (_manifest_array, BundleError, ["manifest.json", "not a scvi-onnx manifest"]),
    ],
    ids=["invalid-json", "binary", "missing", "foreign-format", "json-array"],
)
def test_bad_manifest_is_refused(capsys, tmp_path, out_dir, damage, exc_type, needles):
    bundle = _copy_bundle(tmp_path)
    damage(bundle)
    _assert_bundle_refused(capsys, bundle, out_dir, exc_type, *needles)
    _assert_refused(_cli(capsys, "info", bundle), *needles)


def test_newer_schema_version_is_refused_naming_both(capsys, tmp_path, out_dir):
    bundle = _copy_bundle(tmp_path)
    man = _read_manifest_json(bundle)
    newer = B.SCHEMA_VERSION + 1
    man["schema_version"] = newer
    _write_manifest_json(bundle, man)
    needles = (f"schema version {newer}", f"up to {B.SCHEMA_VERSION}", "upgrade scvi-onnx")
    _assert_bundle_refused(capsys, bundle, out_dir, BundleVersionError, *needles)
    _assert_refused(_cli(capsys, "info", bundle), *needles)


def test_older_schema_version_still_read(capsys, tmp_path, out_dir, monkeypatch, model, query):
    # Simulate a runtime that writes schema 2 and still reads schema 1: the shipped
    # (version-1) bundle keeps loading and giving the same numbers.
    assert model.manifest.schema_version == 1
    monkeypatch.setattr(F, "SCHEMA_VERSION", 2)
    monkeypatch.setattr(F, "MIN_SCHEMA_VERSION", 1)
    old = scvi_onnx.load(SHIPPED_BUNDLE, device="cpu")
    assert old.manifest.schema_version == 1
    np.testing.assert_array_equal(
        old.get_elbo(query, return_mean=False), model.get_elbo(query, return_mean=False)
    )
    assert scvi_onnx.verify(SHIPPED_BUNDLE).ok
    code, _, err = _cli(capsys, "latent", SHIPPED_BUNDLE, EXAMPLE_H5AD, "-o", out_dir / "z.npy")
    assert code == 0, err
    np.testing.assert_array_equal(
        np.load(out_dir / "z.npy"), model.get_latent_representation(query)
    )
    (out_dir / "z.npy").unlink()

    # ... and once version 1 is dropped, it is refused, naming both versions.
    monkeypatch.setattr(F, "MIN_SCHEMA_VERSION", 2)
    needles = ("schema version 1", "from 2", "re-export")
    _assert_bundle_refused(capsys, SHIPPED_BUNDLE, out_dir, BundleVersionError, *needles)


@pytest.mark.parametrize(
    ("kind", "needles"),
    [
        ("file", ["is a file, not a bundle folder"]),
        ("random", ["manifest.json is missing"]),
        ("nonexistent", ["does not exist"]),
        ("query-folder", ["manifest.json is missing"]),
    ],
)
def test_not_a_bundle(capsys, tmp_path, out_dir, kind, needles):
    if kind == "file":
        path = SHIPPED_BUNDLE / B.ENCODER_FILE
    elif kind == "random":
        path = tmp_path / "random"
        path.mkdir()
        rng = np.random.default_rng(0)
        for name in ("encoder.onnx", "arrays.npz", "notes.txt", "manifest.json.bak"):
            (path / name).write_bytes(rng.bytes(256))
    elif kind == "nonexistent":
        path = tmp_path / "no_such_bundle"
    else:
        path = MODELS / "example"
    _assert_bundle_refused(capsys, path, out_dir, BundleError, str(path), *needles)
    _assert_refused(_cli(capsys, "info", path), str(path))


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/hostname"])
def test_manifest_listing_a_file_outside_the_bundle(capsys, tmp_path, out_dir, name):
    bundle = _copy_bundle(tmp_path)
    target = (bundle / name) if not name.startswith("/") else Path(name)
    if not target.exists():
        target.write_bytes(b"outside")
    man = _read_manifest_json(bundle)
    man["files"][name] = B.sha256_file(target)  # a correct checksum does not make it acceptable
    _write_manifest_json(bundle, man)
    _assert_bundle_refused(
        capsys, bundle, out_dir, BundleIntegrityError, "outside the bundle", name
    )


def test_unlisted_bundle_file_is_not_loaded_unchecked(capsys, tmp_path, out_dir):
    # A manifest that forgets a file's checksum must not let that file load unverified.
    bundle = _copy_bundle(tmp_path)
    man = _read_manifest_json(bundle)
    del man["files"][B.DECODER_FILE]
    _write_manifest_json(bundle, man)
    _flip(bundle / B.DECODER_FILE)
    _assert_bundle_refused(
        capsys, bundle, out_dir, BundleIntegrityError, "decoder.onnx", "checksum"
    )


@pytest.mark.parametrize(
    ("edit", "exc_type", "needles"),
    [
        (lambda m: m["files"].update({B.ENCODER_FILE: None}), BundleIntegrityError, ["sha256"]),
        (lambda m: m.update(files=list(m["files"])), BundleIntegrityError, ["'files'"]),
        (lambda m: m["config"].pop("gene_likelihood"), BundleIntegrityError, ["gene_likelihood"]),
        (lambda m: m.update(config=[]), BundleIntegrityError, ["'config'"]),
        (lambda m: m.update(genes="MALAT1"), BundleIntegrityError, ["'genes'"]),
        (
            lambda m: m["config"].update(gene_likelihood="negbin"),
            BundleError,
            ["gene_likelihood='negbin'", "upgrade scvi-onnx"],
        ),
        (lambda m: m.update(schema_version="1"), BundleError, ["schema_version"]),
        (lambda m: m.update(schema_version=True), BundleError, ["schema_version"]),
    ],
    ids=[
        "null-checksum",
        "files-list",
        "config-key-missing",
        "config-list",
        "genes-string",
        "unknown-likelihood",
        "version-string",
        "version-bool",
    ],
)
def test_corrupt_manifest_fields_are_refused(capsys, tmp_path, out_dir, edit, exc_type, needles):
    bundle = _copy_bundle(tmp_path)
    man = _read_manifest_json(bundle)
    edit(man)
    _write_manifest_json(bundle, man)
    _assert_bundle_refused(capsys, bundle, out_dir, exc_type, "manifest.json", *needles)


# ---- never unpickle ----------------------------------------------------------------------------
def _payload_ran(path: str) -> int:
    """What a malicious pickle in a bundle would run; it must never be called by scvi-onnx."""
    Path(path).write_text("the bundle executed code")
    return 0


class _Payload:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (_payload_ran, (self.path,))


@pytest.mark.parametrize("name", [B.ARRAYS_FILE, B.PROBES_FILE])
def test_object_arrays_are_never_unpickled(capsys, tmp_path, out_dir, name):
    bundle = _copy_bundle(tmp_path)
    sentinel = tmp_path / "pwned"
    arrays = dict(B.load_npz(bundle / name))
    arrays["payload"] = np.array([_Payload(str(sentinel))], dtype=object)
    with open(bundle / name, "wb") as f:
        np.savez(f, **arrays)
    _reseal(bundle, name)  # the checksum is right: only the pickle refusal protects us

    if name == B.ARRAYS_FILE:
        _raises(BundleIntegrityError, lambda: scvi_onnx.load(bundle, device="cpu"), name, "Object")
    _raises(BundleIntegrityError, lambda: scvi_onnx.verify(bundle, device="cpu"), name, "Object")
    commands = _bundle_commands(bundle, out_dir)
    for argv in commands if name == B.ARRAYS_FILE else commands[-1:]:
        _assert_refused(_cli(capsys, *argv), name)
    assert list(out_dir.iterdir()) == []
    assert not sentinel.exists()
    # the payload is live: unpickling it (what scvi-onnx never does) would have run it
    with np.load(bundle / name, allow_pickle=True) as f:
        f["payload"]
    assert sentinel.exists()


def test_loading_reads_npz_with_allow_pickle_false(monkeypatch, query):
    calls = []
    real_load = np.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("allow_pickle", "default"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(np, "load", spy)
    m = scvi_onnx.load(SHIPPED_BUNDLE, device="cpu")
    m.get_elbo(query)
    assert scvi_onnx.verify(SHIPPED_BUNDLE).ok
    assert calls and all(c is False for c in calls), calls


def test_npz_missing_an_array_is_a_typed_error(capsys, tmp_path, out_dir, query):
    bundle = _copy_bundle(tmp_path)
    with open(bundle / B.ARRAYS_FILE, "wb") as f:
        np.savez(f, unrelated=np.zeros(3, np.float32))
    _reseal(bundle, B.ARRAYS_FILE)

    def score():
        scvi_onnx.load(bundle, device="cpu").get_elbo(query)

    _raises(BundleIntegrityError, score, B.ARRAYS_FILE, "'px_r'", "re-export")
    _assert_refused(
        _cli(capsys, "elbo", bundle, EXAMPLE_H5AD, "--per-cell", out_dir / "e.csv", *CPU),
        B.ARRAYS_FILE,
    )
    assert list(out_dir.iterdir()) == []


def test_npz_that_is_not_a_zip_is_a_typed_error(capsys, tmp_path, out_dir):
    bundle = _copy_bundle(tmp_path)
    (bundle / B.ARRAYS_FILE).write_bytes(b"PK\x03\x04 not really a zip")
    _reseal(bundle, B.ARRAYS_FILE)
    _assert_bundle_refused(capsys, bundle, out_dir, BundleIntegrityError, B.ARRAYS_FILE)


def test_graph_that_is_not_onnx_is_a_typed_error(capsys, tmp_path, out_dir):
    bundle = _copy_bundle(tmp_path)
    (bundle / B.ENCODER_FILE).write_bytes(b"not an onnx graph" * 10)
    _reseal(bundle, B.ENCODER_FILE)
    _assert_bundle_refused(capsys, bundle, out_dir, BundleError, B.ENCODER_FILE)


# ============================================================================================
# 2. verify
# ============================================================================================
def test_verify_ok_on_shipped_bundle(capsys):
    report = scvi_onnx.verify(SHIPPED_BUNDLE, device="cpu")
    assert report.ok and report.provider == "CPUExecutionProvider"
    names = {r.output for r in report.rows}
    assert {"encoder.qz_m", "encoder.qz_v", "decoder.px_rate", "decoder.px_dropout"} <= names
    assert all(r.ok and r.atol == 1e-4 and r.rtol == 1e-4 for r in report.rows)
    code, out, err = _cli(capsys, "verify", SHIPPED_BUNDLE, "--device", "cpu")
    assert code == 0 and err == "" and "OK: all" in out and "FAIL" not in out


@pytest.mark.parametrize(
    ("key", "output"),
    [
        ("enc_out.qz_m", "encoder.qz_m"),
        ("dec_out.px_rate", "decoder.px_rate"),
        ("dec_out.px_dropout", "decoder.px_dropout"),
        ("dec_out.theta", "theta"),
    ],
)
def test_verify_fails_on_probes_off_by_a_tenth_of_a_percent(capsys, tmp_path, key, output):
    bundle = _copy_bundle(tmp_path)
    probes = dict(B.load_npz(bundle / B.PROBES_FILE))
    probes[key] = probes[key] * np.float32(1.001)
    with open(bundle / B.PROBES_FILE, "wb") as f:
        np.savez_compressed(f, **probes)
    _reseal(bundle, B.PROBES_FILE)

    report = scvi_onnx.verify(bundle, device="cpu")
    assert not report.ok
    failed = [r.output for r in report.rows if not r.ok]
    assert failed == [output]
    row = next(r for r in report.rows if r.output == output)
    # a 1e-3 change, on top of the graph's own deviation from torch (which is large, relative,
    # on values near zero such as dropout logits)
    base = next(
        r for r in scvi_onnx.verify(SHIPPED_BUNDLE, device="cpu").rows if r.output == output
    )
    assert row.max_abs_diff > row.atol and 5e-4 < row.max_rel_diff < 1.5e-3 + base.max_rel_diff

    code, out, err = _cli(capsys, "verify", bundle, "--device", "cpu")
    assert code == 1, err
    fail_lines = [line for line in out.splitlines() if line.rstrip().endswith("FAIL")]
    assert len(fail_lines) == 1 and fail_lines[0].startswith(output), out
    assert "FAIL: 1 of" in out
    code, out, _ = _cli(capsys, "verify", bundle, "--device", "cpu", "--json")
    res = json.loads(out)
    assert code == 1 and res["ok"] is False
    assert [o["output"] for o in res["outputs"] if not o["ok"]] == [output]


def test_verify_refuses_probes_that_do_not_fit_the_graph(capsys, tmp_path):
    bundle = _copy_bundle(tmp_path)
    probes = dict(B.load_npz(bundle / B.PROBES_FILE))
    key = "enc_in." + B.IN_X_LOG1P
    probes[key] = probes[key][:, :1999]  # one gene short
    with open(bundle / B.PROBES_FILE, "wb") as f:
        np.savez_compressed(f, **probes)
    _reseal(bundle, B.PROBES_FILE)
    _raises(BundleIntegrityError, lambda: scvi_onnx.verify(bundle), "probes.npz", "encoder.onnx")
    _assert_refused(_cli(capsys, "verify", bundle, "--device", "cpu"), "probes.npz")


# ============================================================================================
# 3. bad and unusual data
# ============================================================================================
def _gene_col(q, gene: str) -> int:
    return int(q.var_names.get_loc(gene))


def _with_x(q, fn):
    a = q.copy()
    x = a.X.toarray()
    fn(x, a)
    a.X = sp.csr_matrix(x)
    return a


def _case_missing_genes(q, genes):
    return q[:, [g for g in q.var_names if g not in set(genes[:30])]].copy(), [
        "30 of the model's 2000 genes are missing",
        repr(genes[0]),
        repr(genes[9]),
        'missing_genes="zero"',
    ]


def _case_zero_genes(q, genes):
    return q[:, []].copy(), ["none of the model's 2000 genes", "identifiers may differ"]


def _case_duplicated_var_names(q, genes):
    a = q.copy()
    names = list(a.var_names)
    j = names.index(genes[3])
    names[j + 1 if j + 1 < len(names) else j - 1] = genes[3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        a.var_names = names
    return a, ["duplicated", repr(genes[3]), "var_names_make_unique"]


def _case_nan(q, genes):
    def f(x, a):
        x[3, _gene_col(a, genes[0])] = np.nan

    return _with_x(q, f), ["NaN", repr(q.obs_names[3]), "clean"]


def _case_inf(q, genes):
    def f(x, a):
        x[5, _gene_col(a, genes[1])] = np.inf

    return _with_x(q, f), ["infinite", repr(q.obs_names[5]), "clean"]


def _case_negative(q, genes):
    def f(x, a):
        x[7, _gene_col(a, genes[2])] = -2.0

    return _with_x(q, f), ["negative", repr(q.obs_names[7]), "raw non-negative counts"]


def _case_empty(q, genes):
    return q[:0].copy(), ["0 cells", "at least one cell"]


def _case_zero_library(q, genes):
    def f(x, a):
        x[[2, 5]] = 0.0

    return _with_x(q, f), [
        "2 cells",
        "zero total counts",
        repr(q.obs_names[2]),
        repr(q.obs_names[5]),
        "filter",
    ]


def _case_zero_library_over_model_genes(q, genes):
    # counts only in genes the model ignores: the library over the model's genes is zero
    def f(x, a):
        cols = [_gene_col(a, g) for g in genes]
        x[11, cols] = 0.0

    a = _with_x(q, f)
    assert a.X[11].sum() > 0
    return a, ["1 cell", "zero total counts over the model's genes", repr(q.obs_names[11])]


def _case_no_batch_column(q, genes):
    a = q.copy()
    del a.obs["batch"]
    return a, ["no column 'batch'", "Add the column"]


def _case_unseen_batch(q, genes):
    a = q.copy()
    a.obs["batch"] = a.obs["batch"].astype(str)
    a.obs.iloc[4, a.obs.columns.get_loc("batch")] = "pbmc_99k"
    return a, ["'pbmc_99k'", "never seen in training", "'pbmc_5k', 'pbmc_10k'", "1 cell"]


def _case_float_batch(q, genes):
    a = q.copy()
    a.obs["batch"] = np.full(a.n_obs, 1.5)
    return a, ["'batch'", "1.5", "never seen in training"]


def _case_int_coded_batch(q, genes):
    # codes instead of names: 1 is not "pbmc_10k", refused rather than silently mapped
    a = q.copy()
    a.obs["batch"] = np.ones(a.n_obs, dtype=np.int64)
    return a, ["'batch'", "never seen in training", "200 cells"]


def _case_nan_batch(q, genes):
    a = q.copy()
    a.obs["batch"] = a.obs["batch"].astype(object)
    a.obs.iloc[6, a.obs.columns.get_loc("batch")] = np.nan
    return a, ["'batch'", "NaN", "1 cell"]


BAD_DATA = {
    "missing-genes": (_case_missing_genes, MissingGenesError),
    "zero-genes": (_case_zero_genes, MissingGenesError),
    "duplicated-var-names": (_case_duplicated_var_names, InputDataError),
    "nan": (_case_nan, InvalidValuesError),
    "inf": (_case_inf, InvalidValuesError),
    "negative": (_case_negative, InvalidValuesError),
    "empty": (_case_empty, InputDataError),
    "zero-library": (_case_zero_library, ZeroLibrarySizeError),
    "zero-library-over-model-genes": (_case_zero_library_over_model_genes, ZeroLibrarySizeError),
    "no-batch-column": (_case_no_batch_column, MissingColumnError),
    "unseen-batch": (_case_unseen_batch, UnknownCategoryError),
    "float-batch": (_case_float_batch, UnknownCategoryError),
    "int-coded-batch": (_case_int_coded_batch, UnknownCategoryError),
    "nan-batch": (_case_nan_batch, UnknownCategoryError),
}


#: Cases the shipped model's latent space does not depend on: its encoder does not take the
#: batch (encode_covariates=False), so the latent space is computed (as scvi-tools' zero-shot
#: query model does) and only the scoring methods, whose decoder takes the batch, refuse.
LATENT_FREE = {"no-batch-column", "unseen-batch", "float-batch", "int-coded-batch", "nan-batch"}


def _all_methods(model, adata, **kw):
    return [lambda: model.get_latent_representation(adata, **kw), *_scoring(model, adata, **kw)]


def _scoring(model, adata, **kw):
    return [
        lambda: model.get_elbo(adata, **kw),
        lambda: model.get_reconstruction_error(adata, **kw),
        lambda: model.get_marginal_ll(adata, n_mc_samples=3, **kw),
    ]


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_python_api(model, query, case):
    build, exc_type = BAD_DATA[case]
    adata, needles = build(query, model.genes)
    methods = _scoring if case in LATENT_FREE else _all_methods
    for call in methods(model, adata):
        _raises(exc_type, call, *needles)
    for call in methods(model, adata, batch_size=7):
        _raises(exc_type, call, *needles)
    if case in LATENT_FREE:
        np.testing.assert_array_equal(
            model.get_latent_representation(adata, batch_size=7),
            model.get_latent_representation(query),
        )


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, query, model):
    d = tmp_path_factory.mktemp("bad_files")
    files = {}
    for case, (build, _) in BAD_DATA.items():
        adata, needles = build(query, model.genes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adata.write_h5ad(d / f"{case}.h5ad")
        files[case] = (d / f"{case}.h5ad", needles)
    return files


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_cli(capsys, out_dir, bad_files, case):
    path, needles = bad_files[case]
    # the CLI names its flags where the library names keywords
    needles = [n.replace('missing_genes="zero"', "--missing-genes zero") for n in needles]
    latent = [
        ["latent", SHIPPED_BUNDLE, path, "-o", out_dir / "z.h5ad"],  # read into memory
        ["latent", SHIPPED_BUNDLE, path, "-o", out_dir / "z.csv", "--batch-size", 7],  # backed
    ]
    commands = [
        ["elbo", SHIPPED_BUNDLE, path, "--per-cell", out_dir / "e.npy"],
        ["reconstruction-error", SHIPPED_BUNDLE, path, "--json"],
        ["marginal-ll", SHIPPED_BUNDLE, path, "--n-mc-samples", 3, "--per-cell", out_dir / "m.csv"],
    ]
    if case not in LATENT_FREE:
        commands = latent + commands
    for argv in commands:
        _assert_refused(_cli(capsys, *argv, *CPU), *needles)
    assert list(out_dir.iterdir()) == []


def test_missing_genes_zero_fill_is_opt_in(capsys, out_dir, model, bad_files):
    path, _ = bad_files["missing-genes"]
    adata = ad.read_h5ad(path)
    z = model.get_latent_representation(adata, missing_genes="zero")
    assert z.shape == (200, model.n_latent) and np.isfinite(z).all()
    code, _, err = _cli(
        capsys, "latent", SHIPPED_BUNDLE, path, "-o", out_dir / "z.npy", "--missing-genes", "zero"
    )
    assert code == 0, err
    np.testing.assert_array_equal(np.load(out_dir / "z.npy"), z)
    # zero-filling is not a licence to score data that shares almost no genes with the model
    path, _ = bad_files["zero-genes"]
    _raises(
        MissingGenesError,
        lambda: model.get_elbo(ad.read_h5ad(path), missing_genes="zero", min_gene_overlap=0),
        "identifiers may differ",
    )


def test_extra_and_reordered_genes_give_identical_results(model, query):
    genes = list(model.genes)
    assert query.n_vars > len(genes) and list(query.var_names[: len(genes)]) != genes
    ordered = query[:, genes].copy()
    reversed_ = query[:, genes[::-1]].copy()
    for a in (ordered, reversed_):
        np.testing.assert_array_equal(
            model.get_latent_representation(a), model.get_latent_representation(query)
        )
        np.testing.assert_array_equal(
            model.get_elbo(a, return_mean=False), model.get_elbo(query, return_mean=False)
        )
        np.testing.assert_array_equal(
            model.get_marginal_ll(a, n_mc_samples=10, return_mean=False),
            model.get_marginal_ll(query, n_mc_samples=10, return_mean=False),
        )


def test_non_integer_counts_accepted_with_exactly_one_warning(capsys, tmp_path, model, query):
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonIntegerCountsWarning)
        model.get_elbo(query)  # integer-valued float32 counts: no warning

    frac = query.copy()
    frac.X = frac.X * np.float32(1.5)
    x = frac[:, list(model.genes)].X.toarray()
    nonint = x != np.floor(x)
    n_values, n_cells = int(nonint.sum()), int(nonint.any(axis=1).sum())
    assert n_values > 0
    for call in _all_methods(model, frac, batch_size=13):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = call()
        ours = [w for w in caught if issubclass(w.category, NonIntegerCountsWarning)]
        assert len(ours) == 1, [str(w.message) for w in caught]
        assert f"{n_values} non-integer value(s) in {n_cells} cells" in str(ours[0].message)
        values = res["reconstruction_loss"] if isinstance(res, dict) else res
        assert np.isfinite(values).all()

    path = tmp_path / "frac.h5ad"
    frac.write_h5ad(path)
    code, out, err = _cli(capsys, "elbo", SHIPPED_BUNDLE, path, *CPU)
    assert code == 0 and out.startswith("elbo: ")
    # one warning line, then the success summary line
    lines = err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("scvi-onnx: warning: "), err
    assert lines[1].startswith("scvi-onnx: elbo (mean "), err
    assert f"{n_values} non-integer" in lines[0]


@pytest.fixture(scope="module")
def reference(model, query):
    """Results on the query as shipped (CSR float32), default batch size."""
    return {
        "latent": model.get_latent_representation(query),
        "elbo": model.get_elbo(query, return_mean=False, seed=3),
        "mll": model.get_marginal_ll(query, n_mc_samples=20, return_mean=False, seed=3),
    }


def _results(model, adata, **kw):
    return {
        "latent": model.get_latent_representation(adata, **kw),
        "elbo": model.get_elbo(adata, return_mean=False, seed=3, **kw),
        "mll": model.get_marginal_ll(adata, n_mc_samples=20, return_mean=False, seed=3, **kw),
    }


def _assert_same(got: dict, want: dict) -> None:
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.parametrize(
    "dtype", [np.int32, np.int64, np.uint16, np.float64], ids=lambda d: d.__name__
)
@pytest.mark.parametrize("layout", ["dense", "csr"])
def test_integer_and_float64_matrices_equal_float32(model, query, reference, dtype, layout):
    a = query.copy()
    x = query.X.toarray().astype(dtype)
    assert np.array_equal(x.astype(np.float32), query.X.toarray())  # counts are exact
    a.X = x if layout == "dense" else sp.csr_matrix(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonIntegerCountsWarning)
        _assert_same(_results(model, a), reference)


@pytest.mark.parametrize("layout", ["dense", "csr", "csc", "backed-csr", "backed-dense"])
def test_dense_sparse_and_backed_inputs_are_identical(tmp_path, model, query, reference, layout):
    a = query.copy()
    if layout in ("dense", "backed-dense"):
        a.X = query.X.toarray()
    elif layout == "csc":
        a.X = sp.csc_matrix(query.X)
    if layout.startswith("backed"):
        path = tmp_path / "q.h5ad"
        a.write_h5ad(path)
        a = ad.read_h5ad(path, backed="r")
        assert a.isbacked
    try:
        _assert_same(_results(model, a), reference)
        idx = np.array([150, 3, 77, 199, 0])
        part = _results(model, a, indices=idx, batch_size=2)
        for key in reference:
            np.testing.assert_array_equal(part[key], reference[key][idx], err_msg=key)
    finally:
        if layout.startswith("backed"):
            a.file.close()


def test_boolean_mask_equals_integer_indices(model, query):
    rng = np.random.default_rng(1)
    mask = rng.random(query.n_obs) < 0.3
    idx = np.flatnonzero(mask)
    by_mask = _results(model, query, indices=mask)
    by_idx = _results(model, query, indices=idx)
    by_list = _results(model, query, indices=idx.tolist())
    _assert_same(by_mask, by_idx)
    _assert_same(by_list, by_idx)


@pytest.mark.parametrize(
    ("indices", "needles"),
    [
        ([0, 200], ["out of range", "0..199", "200"]),
        ([5, 10**12], ["out of range", "1000000000000"]),
        ([-1, 3], ["negative", "-1"]),
        ([5, 9, 5], ["more than once", "5"]),
        ([1.5, 2], ["non-integer", "1.5"]),
        (np.ones(199, dtype=bool), ["length 199", "200 cells"]),
        (np.zeros(200, dtype=bool), ["all False"]),
        ([], ["empty"]),
        (["AAACCCAAGGCCCAAA-1-pbmc_10k"], ["obs_names.get_indexer"]),
        (3, ["scalar", "[3]"]),
    ],
    ids=[
        "too-large",
        "huge",
        "negative",
        "duplicated",
        "float",
        "mask-length",
        "mask-empty",
        "empty",
        "names",
        "scalar",
    ],
)
def test_bad_indices(model, query, indices, needles):
    for call in _all_methods(model, query, indices=indices):
        _raises(InvalidArgumentError, call, *needles)


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "8"])
def test_bad_batch_size_and_mc_samples(model, query, value):
    for call in _all_methods(model, query, batch_size=value):
        _raises(InvalidArgumentError, call, "batch_size", repr(value))
    for kw in ("n_mc_samples", "n_mc_samples_per_pass"):
        _raises(
            InvalidArgumentError,
            lambda kw=kw: model.get_marginal_ll(query, **{kw: value}),
            kw,
            repr(value),
        )


def test_not_anndata_is_a_typed_error(model, tmp_path):
    for data in (str(tmp_path / "missing.h5ad"), str(EXAMPLE_H5AD), np.ones((3, 2000))):
        for call in _all_methods(model, data):
            _raises(InputDataError, call, "anndata.read_h5ad")


# ============================================================================================
# 3b. covariates: a tiny model with categorical and continuous covariates
# ============================================================================================
@pytest.fixture(scope="session")
def cov_bundle(tmp_path_factory):
    """A 1-epoch SCVI on 100 genes with batch, a categorical and a continuous covariate."""
    pytest.importorskip("torch")
    scvi = pytest.importorskip("scvi")
    pytest.importorskip("onnx")
    from scvi_onnx.exporter import export_model

    a = ad.read_h5ad(MODELS / "example" / "pbmc_train.h5ad")
    top = np.argsort(-np.asarray(a.X.sum(0)).ravel(), kind="stable")[:100]
    a = a[:, np.sort(top)].copy()
    a = a[np.asarray(a.X.sum(1)).ravel() > 0].copy()
    rng = np.random.default_rng(0)
    a.obs["pct"] = rng.normal(size=a.n_obs).astype(np.float32)
    a.obs["donor"] = np.array(["d1", "d2", "d3"])[rng.integers(0, 3, a.n_obs)]
    scvi.model.SCVI.setup_anndata(
        a,
        batch_key="batch",
        categorical_covariate_keys=["donor"],
        continuous_covariate_keys=["pct"],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = scvi.model.SCVI(a, n_hidden=16, n_latent=4)
        m.train(
            max_epochs=1,
            accelerator="cpu",
            enable_progress_bar=False,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
        )
    path = export_model(m, tmp_path_factory.mktemp("cov") / "bundle")
    return path, a[:60].copy()


def _cov_pct_strings(a):
    a.obs["pct"] = [f"{v:.2f}" for v in a.obs["pct"]]
    return InvalidValuesError, ["'pct'", "must be numeric", "astype(float)"]


def _cov_pct_nan(a):
    a.obs["pct"] = a.obs["pct"].astype(np.float64)
    a.obs.iloc[8, a.obs.columns.get_loc("pct")] = np.nan
    return InvalidValuesError, ["'pct'", "NaN", repr(a.obs_names[8])]


def _cov_pct_missing(a):
    del a.obs["pct"]
    return MissingColumnError, ["no column 'pct'", "continuous_covariate_keys"]


def _cov_donor_codes(a):
    a.obs["donor"] = np.arange(a.n_obs) % 3
    return UnknownCategoryError, ["'donor'", "never seen in training", "'d1', 'd2', 'd3'"]


def _cov_donor_unseen(a):
    a.obs["donor"] = a.obs["donor"].astype(str)
    a.obs.iloc[2, a.obs.columns.get_loc("donor")] = "d9"
    return UnknownCategoryError, ["'donor'", "'d9'", "1 cell"]


def _cov_donor_missing(a):
    del a.obs["donor"]
    return MissingColumnError, ["no column 'donor'", "categorical_covariate_keys"]


COV_CASES = {
    "pct-strings": _cov_pct_strings,
    "pct-nan": _cov_pct_nan,
    "pct-missing": _cov_pct_missing,
    "donor-int-codes": _cov_donor_codes,
    "donor-unseen": _cov_donor_unseen,
    "donor-missing": _cov_donor_missing,
}


def test_covariate_model_scores_good_data(capsys, out_dir, cov_bundle):
    path, adata = cov_bundle
    m = scvi_onnx.load(path, device="cpu")
    assert m.manifest.registry.continuous_covariates == ("pct",)
    z = m.get_latent_representation(adata)
    assert z.shape == (adata.n_obs, 4) and np.isfinite(z).all()
    assert np.isfinite(m.get_elbo(adata, return_mean=False)).all()
    # the covariates are used: changing them changes the numbers
    moved = adata.copy()
    moved.obs["pct"] = moved.obs["pct"] + 3.0
    assert not np.array_equal(
        m.get_elbo(moved, return_mean=False), m.get_elbo(adata, return_mean=False)
    )
    f = out_dir.parent / "cov_good.h5ad"
    adata.write_h5ad(f)
    code, _, err = _cli(capsys, "latent", path, f, "-o", out_dir / "z.npy", *CPU)
    assert code == 0, err
    np.testing.assert_array_equal(np.load(out_dir / "z.npy"), z)


@pytest.mark.parametrize("case", list(COV_CASES))
def test_covariate_columns_of_the_wrong_kind(capsys, out_dir, cov_bundle, case):
    path, adata = cov_bundle
    a = adata.copy()
    exc_type, needles = COV_CASES[case](a)
    m = scvi_onnx.load(path, device="cpu")
    # the encoder takes no covariate (encode_covariates=False): the latent space does not
    # depend on them and is computed; the decoder takes them: the scoring methods refuse
    for call in _scoring(m, a):
        _raises(exc_type, call, *needles)
    np.testing.assert_array_equal(
        m.get_latent_representation(a), m.get_latent_representation(adata)
    )
    f = out_dir.parent / f"{case}.h5ad"
    a.write_h5ad(f)
    _assert_refused(_cli(capsys, "elbo", path, f, "--per-cell", out_dir / "e.csv", *CPU), *needles)
    assert list(out_dir.iterdir()) == []


# ============================================================================================
# 4. CLI refusals of input files and arguments
# ============================================================================================
@pytest.fixture(scope="module")
def unreadable_inputs(tmp_path_factory):
    import h5py

    d = tmp_path_factory.mktemp("unreadable")
    (d / "text.h5ad").write_text("cell,gene\nc1,3\n")
    (d / "empty.h5ad").write_bytes(b"")
    with h5py.File(d / "plain.h5ad", "w") as f:
        f["x"] = np.zeros(3)
    (d / "folder.h5ad").mkdir()
    return d


@pytest.mark.parametrize(
    ("name", "needles"),
    [
        ("nonexistent.h5ad", ["input file not found", "nonexistent.h5ad"]),
        ("text.h5ad", ["cannot read", "text.h5ad", "write_h5ad"]),
        ("empty.h5ad", ["cannot read", "empty.h5ad"]),
        ("plain.h5ad", ["cannot read", "plain.h5ad"]),
        ("folder.h5ad", ["not a file", "folder.h5ad"]),
    ],
)
def test_cli_refuses_unreadable_input(capsys, out_dir, unreadable_inputs, name, needles):
    path = unreadable_inputs / name
    for argv in (
        ["latent", SHIPPED_BUNDLE, path, "-o", out_dir / "z.h5ad"],
        ["latent", SHIPPED_BUNDLE, path, "-o", out_dir / "z.npy"],
        ["elbo", SHIPPED_BUNDLE, path, "--per-cell", out_dir / "e.csv"],
        ["marginal-ll", SHIPPED_BUNDLE, path, "--json"],
    ):
        _assert_refused(_cli(capsys, *argv, *CPU), *needles)
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize(
    "extra",
    [
        ["--batch-size", "0"],
        ["--batch-size", "-4"],
        ["--batch-size", "x"],
        ["--seed", "1.5"],
        ["--n-mc-samples", "0"],
        ["--n-mc-samples", "-2"],
        ["--device", "tpu"],
        ["--missing-genes", "guess"],
    ],
)
def test_cli_refuses_bad_arguments(capsys, out_dir, extra):
    argv = ["marginal-ll", SHIPPED_BUNDLE, EXAMPLE_H5AD, "--per-cell", out_dir / "m.csv", *extra]
    _assert_refused(_cli(capsys, *argv), extra[0])
    if extra[0] != "--n-mc-samples":
        argv = ["latent", SHIPPED_BUNDLE, EXAMPLE_H5AD, "-o", out_dir / "z.csv", *extra]
        _assert_refused(_cli(capsys, *argv), extra[0])
    assert list(out_dir.iterdir()) == []


# ============================================================================================
# 5. determinism
# ============================================================================================
def test_same_seed_bit_identical_on_repeat_and_any_batch_size(model, query):
    def run(bs):
        return {
            "latent": model.get_latent_representation(query, batch_size=bs),
            "elbo": model.get_elbo(query, return_mean=False, seed=11, batch_size=bs),
            "mll": model.get_marginal_ll(
                query, n_mc_samples=20, return_mean=False, seed=11, batch_size=bs
            ),
        }

    ref = run(None)
    _assert_same(run(None), ref)
    for bs in (1, 13, 128, 200):
        _assert_same(run(bs), ref)
    # a fresh load of the same bundle gives the same numbers too
    _assert_same(
        {
            "latent": (
                fresh := scvi_onnx.load(SHIPPED_BUNDLE, device="cpu")
            ).get_latent_representation(query),
            "elbo": fresh.get_elbo(query, return_mean=False, seed=11),
            "mll": fresh.get_marginal_ll(query, n_mc_samples=20, return_mean=False, seed=11),
        },
        ref,
    )
    assert not np.array_equal(model.get_elbo(query, return_mean=False, seed=12), ref["elbo"])


def _cuda_usable() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover
        return False
    return (
        "CUDAExecutionProvider" in ort.get_available_providers()
        and Path("/proc/driver/nvidia/version").exists()
    )


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_usable(), reason="needs onnxruntime-gpu and an NVIDIA GPU")
def test_cpu_and_cuda_agree(model, query):
    gpu = scvi_onnx.load(SHIPPED_BUNDLE, device="cuda")
    assert gpu.provider == "CUDAExecutionProvider"
    assert gpu.module.scores_on_graph  # on CUDA the likelihood is reduced on the device
    np.testing.assert_allclose(
        gpu.get_latent_representation(query), model.get_latent_representation(query), atol=1e-4
    )
    np.testing.assert_allclose(
        gpu.get_elbo(query, return_mean=False, seed=5),
        model.get_elbo(query, return_mean=False, seed=5),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        gpu.get_marginal_ll(query[:64], n_mc_samples=50, return_mean=False, seed=5),
        model.get_marginal_ll(query[:64], n_mc_samples=50, return_mean=False, seed=5),
        rtol=1e-5,
    )
    host = scvi_onnx.load(SHIPPED_BUNDLE, device="cuda", scoring="host")
    np.testing.assert_allclose(
        host.get_elbo(query, return_mean=False, seed=5),
        model.get_elbo(query, return_mean=False, seed=5),
        rtol=1e-5,
    )
    report = scvi_onnx.verify(SHIPPED_BUNDLE, device="cuda")
    assert report.ok and report.provider == "CUDAExecutionProvider"


# ============================================================================================
# 6. threads and memory
# ============================================================================================
def test_eight_threads_mixed_calls_equal_serial(model, query):
    tasks = [
        (model.get_latent_representation, {}),
        (model.get_latent_representation, {"give_mean": False, "seed": 4}),
        (model.get_elbo, {"return_mean": False, "seed": 1}),
        (model.get_elbo, {"return_mean": False, "seed": 2, "batch_size": 13}),
        (model.get_reconstruction_error, {"return_mean": False, "seed": 3}),
        (model.get_marginal_ll, {"n_mc_samples": 10, "return_mean": False, "seed": 5}),
        (model.get_marginal_ll, {"n_mc_samples": 10, "return_mean": False, "seed": 6}),
        (model.get_latent_representation, {"return_dist": True, "indices": np.arange(0, 200, 3)}),
    ]

    def flat(res):
        if isinstance(res, dict):
            return [res["reconstruction_loss"]]
        return list(res) if isinstance(res, tuple) else [res]

    serial = [flat(fn(query, **kw)) for fn, kw in tasks]
    barrier = threading.Barrier(len(tasks))

    def call(fn, kw):
        barrier.wait()
        return flat(fn(query, **kw))

    for _ in range(2):
        with cf.ThreadPoolExecutor(len(tasks)) as ex:
            futures = [ex.submit(call, fn, kw) for fn, kw in tasks]
            parallel = [f.result(timeout=60) for f in futures]
        for want, got in zip(serial, parallel, strict=True):
            for a, b in zip(want, got, strict=True):
                np.testing.assert_array_equal(a, b)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc (Linux)")
def test_repeated_calls_do_not_grow_memory(model, query):
    for _ in range(5):
        model.get_elbo(query, seed=1)
    gc.collect()
    before = _rss_bytes()
    for i in range(30):
        model.get_elbo(query, seed=i)
    gc.collect()
    grown = _rss_bytes() - before
    assert grown < 30 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 30 calls"
