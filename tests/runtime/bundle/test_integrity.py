"""Bundle integrity: a damaged, foreign or tampered bundle is refused by load, verify and every
CLI command, with a typed error that names the file and says what to do (helpers.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import scvi_onnx
from scvi_onnx import bundle as B
from scvi_onnx.bundle import format as F
from scvi_onnx.errors import BundleError, BundleIntegrityError, BundleVersionError

from ...conftest import EXAMPLE_H5AD, MODELS, SHIPPED_BUNDLE
from ..helpers import (
    CPU,
    assert_bundle_refused,
    assert_refused,
    bundle_commands,
    cli,
    copy_bundle,
    flip,
    raises,
    read_manifest_json,
    reseal,
    write_manifest_json,
)


def _listed_files(bundle: Path) -> list[str]:
    """Every file the bundle's manifest lists with a checksum (read from the manifest, so a
    file added to the format is damaged here too)."""
    return sorted(read_manifest_json(bundle)["files"])


SHIPPED_FILES = _listed_files(SHIPPED_BUNDLE)


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _delete(p: Path) -> None:
    p.unlink()


def test_manifest_lists_every_bundle_file():
    # the damage test below walks the manifest: it must cover every file of the folder
    # (scorer.onnx included, which the CPU never runs: only its checksum protects it)
    on_disk = {p.name for p in SHIPPED_BUNDLE.iterdir()} - {B.MANIFEST_FILE}
    assert set(SHIPPED_FILES) == on_disk
    assert B.SCORER_FILE in SHIPPED_FILES and set(F.REQUIRED_FILES) <= set(SHIPPED_FILES)


@pytest.mark.parametrize("damage", [flip, _truncate, _delete], ids=["flip", "truncate", "delete"])
@pytest.mark.parametrize("name", SHIPPED_FILES)
def test_damaged_bundle_file_is_refused(capsys, tmp_path, out_dir, name, damage):
    bundle = copy_bundle(tmp_path)
    damage(bundle / name)
    hint = "missing" if damage is _delete else "altered or truncated"
    assert_bundle_refused(capsys, bundle, out_dir, BundleIntegrityError, name, hint, "restore")


def _manifest_not_json(bundle: Path) -> None:
    (bundle / B.MANIFEST_FILE).write_text('{"format": "scvi-onnx-bundle", "schema_ver')


def _manifest_binary(bundle: Path) -> None:
    (bundle / B.MANIFEST_FILE).write_bytes(b"\xff\xfe\x00\x01garbage")


def _manifest_missing(bundle: Path) -> None:
    (bundle / B.MANIFEST_FILE).unlink()


def _manifest_foreign(bundle: Path) -> None:
    man = read_manifest_json(bundle)
    man["format"] = "some-other-tool"
    write_manifest_json(bundle, man)


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
    bundle = copy_bundle(tmp_path)
    damage(bundle)
    assert_bundle_refused(capsys, bundle, out_dir, exc_type, *needles)
    assert_refused(cli(capsys, "info", bundle), *needles)


def test_newer_schema_version_is_refused_naming_both(capsys, tmp_path, out_dir):
    bundle = copy_bundle(tmp_path)
    man = read_manifest_json(bundle)
    newer = B.SCHEMA_VERSION + 1
    man["schema_version"] = newer
    write_manifest_json(bundle, man)
    needles = (f"schema version {newer}", f"up to {B.SCHEMA_VERSION}", "upgrade scvi-onnx")
    assert_bundle_refused(capsys, bundle, out_dir, BundleVersionError, *needles)
    assert_refused(cli(capsys, "info", bundle), *needles)


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
    code, _, err = cli(capsys, "latent", SHIPPED_BUNDLE, EXAMPLE_H5AD, "-o", out_dir / "z.npy")
    assert code == 0, err
    np.testing.assert_array_equal(
        np.load(out_dir / "z.npy"), model.get_latent_representation(query)
    )
    (out_dir / "z.npy").unlink()

    # ... and once version 1 is dropped, it is refused, naming both versions.
    monkeypatch.setattr(F, "MIN_SCHEMA_VERSION", 2)
    needles = ("schema version 1", "from 2", "re-export")
    assert_bundle_refused(capsys, SHIPPED_BUNDLE, out_dir, BundleVersionError, *needles)


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
    assert_bundle_refused(capsys, path, out_dir, BundleError, str(path), *needles)
    assert_refused(cli(capsys, "info", path), str(path))


@pytest.mark.parametrize("kind", ["relative", "absolute"])
def test_manifest_listing_a_file_outside_the_bundle(capsys, tmp_path, out_dir, kind):
    bundle = copy_bundle(tmp_path)
    # a real file next to the bundle, named through ".." or by its absolute path
    target = tmp_path / "outside.bin"
    target.write_bytes(b"outside")
    name = "../outside.bin" if kind == "relative" else str(target)
    assert (bundle / name).resolve() == target.resolve()
    man = read_manifest_json(bundle)
    man["files"][name] = B.sha256_file(target)  # a correct checksum does not make it acceptable
    write_manifest_json(bundle, man)
    assert_bundle_refused(capsys, bundle, out_dir, BundleIntegrityError, "outside the bundle", name)


def test_unlisted_bundle_file_is_not_loaded_unchecked(capsys, tmp_path, out_dir):
    # A manifest that forgets a file's checksum must not let that file load unverified.
    bundle = copy_bundle(tmp_path)
    man = read_manifest_json(bundle)
    del man["files"][B.DECODER_FILE]
    write_manifest_json(bundle, man)
    flip(bundle / B.DECODER_FILE)
    assert_bundle_refused(capsys, bundle, out_dir, BundleIntegrityError, "decoder.onnx", "checksum")


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
    bundle = copy_bundle(tmp_path)
    man = read_manifest_json(bundle)
    edit(man)
    write_manifest_json(bundle, man)
    assert_bundle_refused(capsys, bundle, out_dir, exc_type, "manifest.json", *needles)


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
    bundle = copy_bundle(tmp_path)
    sentinel = tmp_path / "pwned"
    arrays = dict(B.load_npz(bundle / name))
    arrays["payload"] = np.array([_Payload(str(sentinel))], dtype=object)
    with open(bundle / name, "wb") as f:
        np.savez(f, **arrays)
    reseal(bundle, name)  # the checksum is right: only the pickle refusal protects us

    if name == B.ARRAYS_FILE:
        raises(BundleIntegrityError, lambda: scvi_onnx.load(bundle, device="cpu"), name, "Object")
    raises(BundleIntegrityError, lambda: scvi_onnx.verify(bundle, device="cpu"), name, "Object")
    commands = bundle_commands(bundle, out_dir)
    for argv in commands if name == B.ARRAYS_FILE else commands[-1:]:
        assert_refused(cli(capsys, *argv), name)
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
    bundle = copy_bundle(tmp_path)
    with open(bundle / B.ARRAYS_FILE, "wb") as f:
        np.savez(f, unrelated=np.zeros(3, np.float32))
    reseal(bundle, B.ARRAYS_FILE)

    def score():
        scvi_onnx.load(bundle, device="cpu").get_elbo(query)

    raises(BundleIntegrityError, score, B.ARRAYS_FILE, "'px_r'", "re-export")
    assert_refused(
        cli(capsys, "elbo", bundle, EXAMPLE_H5AD, "--per-cell", out_dir / "e.csv", *CPU),
        B.ARRAYS_FILE,
    )
    assert list(out_dir.iterdir()) == []


def test_npz_that_is_not_a_zip_is_a_typed_error(capsys, tmp_path, out_dir):
    bundle = copy_bundle(tmp_path)
    (bundle / B.ARRAYS_FILE).write_bytes(b"PK\x03\x04 not really a zip")
    reseal(bundle, B.ARRAYS_FILE)
    assert_bundle_refused(capsys, bundle, out_dir, BundleIntegrityError, B.ARRAYS_FILE)


def test_graph_that_is_not_onnx_is_a_typed_error(capsys, tmp_path, out_dir):
    bundle = copy_bundle(tmp_path)
    (bundle / B.ENCODER_FILE).write_bytes(b"not an onnx graph" * 10)
    reseal(bundle, B.ENCODER_FILE)
    assert_bundle_refused(capsys, bundle, out_dir, BundleError, B.ENCODER_FILE)


@pytest.mark.parametrize("name", SHIPPED_FILES)
def test_damage_found_when_hashed_on_threads(tmp_path, monkeypatch, name):
    """Large bundles are hashed on several threads: a damaged file is refused the same way,
    and an unreadable one is a BundleError naming it."""
    from scvi_onnx.bundle import files

    monkeypatch.setattr(files, "PARALLEL_HASH_BYTES", 0)
    monkeypatch.setattr(files.os, "cpu_count", lambda: 4)
    bundle = copy_bundle(tmp_path)
    scvi_onnx.load(bundle, device="cpu")  # whole: loads
    flip(bundle / name)
    with pytest.raises(BundleIntegrityError, match=f"{name} is altered or truncated"):
        scvi_onnx.load(bundle, device="cpu")
    real = files.sha256_file

    def unreadable(path, *a, **k):
        if Path(path).name == name:
            raise PermissionError(13, "Permission denied")
        return real(path, *a, **k)

    monkeypatch.setattr(files, "sha256_file", unreadable)
    with pytest.raises(BundleError, match=f"cannot read bundle file {name}.*Permission denied"):
        scvi_onnx.load(bundle, device="cpu")
