"""The bundle: a folder with the ONNX graphs, a versioned manifest and numpy arrays.

This module is the single home of the bundle format. The exporter writes what is declared here;
the runtime reads it. A bundle can be read with ``json`` + ``onnx`` + ``numpy`` alone:

``manifest.json``
    schema version, model class, config, genes, registry, graph IO names, versions, sha256 of
    every other file.
``encoder.onnx`` / ``decoder.onnx``
    float32 graphs with a dynamic cell axis; no randomness, no BatchNormalization node.
``arrays.npz``
    parameters the numpy side needs (dispersion, library-size prior); loaded with
    ``allow_pickle=False``.
``probes.npz``
    probe inputs and the exporter's torch outputs for them, for ``verify``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BundleError, BundleIntegrityError, BundleVersionError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
#: Oldest schema version this runtime still reads.
MIN_SCHEMA_VERSION = 1
FORMAT_NAME = "scvi-onnx-bundle"

MANIFEST_FILE = "manifest.json"
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
ARRAYS_FILE = "arrays.npz"
PROBES_FILE = "probes.npz"

OPSET = 17

# Graph input / output names: one home, used by exporter and runtime.
IN_X = "x"
#: Encoder input of models with ``log_variational`` (exporters from 0.2): ``log1p(counts)``,
#: computed by the runtime in numpy (ONNX Runtime's CPU ``Log`` kernel is ~5x slower than
#: numpy's ``log1p``, and was half the encoder's time). Bundles whose encoder takes ``x``
#: apply ``log1p`` inside the graph; both load.
IN_X_LOG1P = "x_log1p"
IN_CONT = "cont_covs"
IN_BATCH = "batch_index"
IN_CAT = "cat_covs"
IN_Z = "z"
IN_LIBRARY = "library"
OUT_QZ_M = "qz_m"
OUT_QZ_V = "qz_v"
OUT_QL_M = "ql_m"
OUT_QL_V = "ql_v"
OUT_PX_RATE = "px_rate"
OUT_PX_R = "px_r"
OUT_PX_DROPOUT = "px_dropout"

#: Files every bundle lists with their sha256: the runtime reads each of them, so none may be
#: loaded unchecked (graph files named in ``graphs`` are required as well).
REQUIRED_FILES = (ENCODER_FILE, DECODER_FILE, ARRAYS_FILE, PROBES_FILE)

#: ``config`` entries the runtime's maths reads, and the values it implements. A bundle with
#: another value is refused rather than computed with the wrong formula.
CONFIG_CHOICES: dict[str, tuple] = {
    "gene_likelihood": ("zinb", "nb", "poisson", "normal"),
    "dispersion": ("gene", "gene-batch", "gene-label", "gene-cell"),
    "latent_distribution": ("normal", "ln"),
    "use_observed_lib_size": (True, False),
    "use_size_factor_key": (True, False),
}
REQUIRED_CONFIG = ("n_latent", *CONFIG_CHOICES)

_SHA256 = re.compile(r"[0-9a-f]{64}")

# Optional scoring graph (exporters from 0.2; SCVI and LinearSCVI without gene-cell dispersion):
#   scorer.onnx  decoder inputs + counts (N, G) [+ labels (N, 1)] -> log_px (S, N)
# log p(x | z) summed over genes without the count terms, for execution providers where the
# reduction should run beside the decoder (CUDA); the runtime adds the per-cell count terms.
SCORER_FILE = "scorer.onnx"
IN_COUNTS = "counts"
IN_LABELS = "labels"
OUT_LOG_PX = "log_px"

# Arrays in arrays.npz
ARR_PX_R = "px_r"
ARR_LIB_MEANS = "library_log_means"
ARR_LIB_VARS = "library_log_vars"

# LinearSCVI: scvi-tools' own ``get_loadings()`` values (genes x n_latent), stored at export.
ARR_LOADINGS = "loadings"

# SCANVI: three more graphs (no randomness; the runtime draws z2) and the label prior.
#   classifier.onnx  z (S, N, L) -> probs (S, N, K)          softmax of the classifier
#   z2_encoder.onnx  z (S, N, L) -> qz2_m, qz2_v (S, N, K, L) q(z2 | z1, y) for every label y
#   z1_decoder.onnx  z2 (S, N, K, L) -> pz1_m, pz1_v          p(z1 | z2, y), label y on axis 2
CLASSIFIER_FILE = "classifier.onnx"
Z2_ENCODER_FILE = "z2_encoder.onnx"
Z1_DECODER_FILE = "z1_decoder.onnx"
IN_Z2 = "z2"
OUT_PROBS = "probs"
OUT_QZ2_M = "qz2_m"
OUT_QZ2_V = "qz2_v"
OUT_PZ1_M = "pz1_m"
OUT_PZ1_V = "pz1_v"
ARR_Y_PRIOR = "y_prior"
#: SCANVI graph name in ``manifest.graphs`` -> (probe input prefix, probe output prefix).
SCANVI_GRAPHS = {
    "classifier": ("cls_in.", "cls_out."),
    "z2_encoder": ("z2e_in.", "z2e_out."),
    "z1_decoder": ("z1d_in.", "z1d_out."),
}

# Numerical constants of scvi-tools 1.4.2 that the maths depends on.
LIKELIHOOD_EPS = 1e-8  # scvi.distributions: eps inside logs
VAR_EPS = 1e-4  # scvi.nn.Encoder: q_v = exp(.) + var_eps

# Default export-validation tolerances (float32 graphs vs torch float32 modules).
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-4


@dataclass(frozen=True)
class CategoricalField:
    """A categorical obs column and its training-time category order."""

    key: str | None
    categories: tuple

    @property
    def n_categories(self) -> int:
        return len(self.categories)


@dataclass(frozen=True)
class Registry:
    """What scvi-tools' ``setup_anndata`` registered: where each input comes from."""

    layer: str | None
    batch: CategoricalField
    labels: CategoricalField
    size_factor_key: str | None = None
    categorical_covariates: tuple[CategoricalField, ...] = ()
    continuous_covariates: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "batch": {"key": self.batch.key, "categories": list(self.batch.categories)},
            "labels": {"key": self.labels.key, "categories": list(self.labels.categories)},
            "size_factor_key": self.size_factor_key,
            "categorical_covariates": [
                {"key": c.key, "categories": list(c.categories)}
                for c in self.categorical_covariates
            ],
            "continuous_covariates": list(self.continuous_covariates),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Registry:
        def cat(x: dict[str, Any]) -> CategoricalField:
            return CategoricalField(key=x.get("key"), categories=tuple(x["categories"]))

        return cls(
            layer=d.get("layer"),
            batch=cat(d["batch"]),
            labels=cat(d["labels"]),
            size_factor_key=d.get("size_factor_key"),
            categorical_covariates=tuple(cat(c) for c in d.get("categorical_covariates", [])),
            continuous_covariates=tuple(d.get("continuous_covariates", [])),
        )


@dataclass(frozen=True)
class Manifest:
    """The parsed ``manifest.json`` of a bundle."""

    schema_version: int
    model_class: str
    config: dict[str, Any]
    genes: tuple[str, ...]
    registry: Registry
    graphs: dict[str, dict[str, Any]]
    versions: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "schema_version": self.schema_version,
            "model_class": self.model_class,
            "config": self.config,
            "genes": list(self.genes),
            "registry": self.registry.to_json(),
            "graphs": self.graphs,
            "versions": self.versions,
            "validation": self.validation,
            "files": self.files,
            **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Manifest:
        return cls(
            schema_version=int(d["schema_version"]),
            model_class=d["model_class"],
            config=d["config"],
            genes=tuple(d["genes"]),
            registry=Registry.from_json(d["registry"]),
            graphs=d["graphs"],
            versions=d.get("versions", {}),
            validation=d.get("validation", {}),
            files=d.get("files", {}),
            extra=d.get("extra", {}),
        )


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def read_manifest(path: str | Path, *, check_files: bool = True) -> Manifest:
    """Read and check a bundle's manifest.

    Parameters
    ----------
    path
        The bundle folder.
    check_files
        Verify the sha256 of every file listed in the manifest (default). Loading never
        executes code from the bundle.

    Raises
    ------
    BundleError
        The folder or manifest is missing or not a scvi-onnx manifest.
    BundleVersionError
        The schema version is newer (or older) than this runtime reads.
    BundleIntegrityError
        A listed file is missing or its checksum differs.
    """
    root = Path(path)
    if not root.exists():
        raise BundleError(f"bundle not found: {root} does not exist")
    if not root.is_dir():
        raise BundleError(
            f"{root} is a file, not a bundle folder; pass the folder written by "
            "`scvi-onnx export` (it holds manifest.json)"
        )
    mpath = root / MANIFEST_FILE
    if not mpath.is_file():
        raise BundleError(
            f"{root} is not a scvi-onnx bundle: {MANIFEST_FILE} is missing; "
            "export one with `scvi-onnx export` or `scvi_onnx.exporter.export_model`"
        )
    try:
        text = mpath.read_text(encoding="utf-8")
    except OSError as e:
        raise BundleError(f"cannot read {mpath}: {e.strerror or e}; check its permissions") from e
    except UnicodeDecodeError as e:
        raise BundleIntegrityError(
            f"{mpath} is not valid JSON ({e}); the bundle is corrupt: restore it from the "
            "original bundle or re-export the model"
        ) from e
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise BundleIntegrityError(
            f"{mpath} is not valid JSON ({e}); the bundle is corrupt: restore it from the "
            "original bundle or re-export the model"
        ) from e
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise BundleError(
            f"{mpath} is not a scvi-onnx manifest (format {found!r}, expected "
            f"{FORMAT_NAME!r}); pass a bundle folder written by `scvi-onnx export`"
        )
    version = raw.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise BundleError(f"{mpath} has no integer schema_version (got {version!r}); re-export")
    if version > SCHEMA_VERSION:
        raise BundleVersionError(
            f"bundle schema version {version} is newer than this runtime reads "
            f"(up to {SCHEMA_VERSION}); upgrade scvi-onnx"
        )
    if version < MIN_SCHEMA_VERSION:
        raise BundleVersionError(
            f"bundle schema version {version} is older than this runtime reads "
            f"(from {MIN_SCHEMA_VERSION}); re-export the model or use an older scvi-onnx"
        )
    _check_manifest_fields(raw, mpath)
    try:
        manifest = Manifest.from_json(raw)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BundleIntegrityError(f"{mpath} lacks a required field ({e}); re-export") from e
    if check_files:
        verify_checksums(root, manifest)
    return manifest


def _check_manifest_fields(raw: dict[str, Any], mpath: Path) -> None:
    """Refuse a manifest whose fields the runtime would misread (before any maths runs)."""

    def bad(what: str) -> BundleIntegrityError:
        return BundleIntegrityError(
            f"{mpath}: {what}; the manifest is corrupt: re-export the model"
        )

    for key, kind in (
        ("config", dict),
        ("registry", dict),
        ("graphs", dict),
        ("genes", list),
        ("files", dict),
    ):
        if key in raw and not isinstance(raw[key], kind):
            raise bad(f"{key!r} must be a JSON {'object' if kind is dict else 'array'}")
    files = raw.get("files", {})
    for name, digest in files.items():
        _check_inside(name)
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise bad(f"the checksum of {name!r} is not a sha256 hex digest ({digest!r})")
    config = raw.get("config")
    if isinstance(config, dict):
        absent = [k for k in REQUIRED_CONFIG if k not in config]
        if absent:
            raise bad(f"config lacks {', '.join(map(repr, absent))}")
        for key, choices in CONFIG_CHOICES.items():
            value = config[key]
            if isinstance(value, bool) != isinstance(choices[0], bool) or value not in choices:
                raise BundleError(
                    f"{mpath}: config {key}={value!r} is not one this runtime implements "
                    f"({', '.join(map(repr, choices))}); upgrade scvi-onnx or re-export"
                )
        n_latent = config["n_latent"]
        if isinstance(n_latent, bool) or not isinstance(n_latent, int) or n_latent < 1:
            raise bad(f"config n_latent must be a positive integer, got {n_latent!r}")


def _check_inside(name: str) -> None:
    p = Path(name)
    if not name or p.is_absolute() or ".." in p.parts or p.drive:
        raise BundleIntegrityError(
            f"manifest lists a file outside the bundle: {name!r}; a bundle only refers to "
            "files inside its own folder: re-export it"
        )


def verify_checksums(root: str | Path, manifest: Manifest) -> None:
    """Check every file listed in the manifest against its sha256.

    Every file the runtime reads (:data:`REQUIRED_FILES` and the graph files named in
    ``graphs``) must be listed: an unlisted file would be loaded unchecked.
    """
    root = Path(root)
    if not manifest.files:
        raise BundleIntegrityError(f"{root / MANIFEST_FILE} lists no file checksums")
    for name in manifest.files:
        _check_inside(name)
    graph_files = [
        g["file"] for g in manifest.graphs.values() if isinstance(g, dict) and "file" in g
    ]
    unlisted = [
        n for n in dict.fromkeys([*REQUIRED_FILES, *graph_files]) if n not in manifest.files
    ]
    if unlisted:
        raise BundleIntegrityError(
            f"{root / MANIFEST_FILE} lists no checksum for {', '.join(map(repr, unlisted))}; "
            "the file cannot be verified: re-export the bundle"
        )
    for name, digest in manifest.files.items():
        p = root / name
        if not p.is_file():
            raise BundleIntegrityError(
                f"bundle file missing: {name} (expected in {root}); restore it from the "
                "original bundle"
            )
        try:
            actual = sha256_file(p)
        except OSError as e:
            raise BundleError(
                f"cannot read bundle file {name} in {root}: {e.strerror or e}; check its "
                "permissions"
            ) from e
        if actual != digest:
            raise BundleIntegrityError(
                f"bundle file {name} is altered or truncated: sha256 {actual[:16]}... "
                f"!= manifest {digest[:16]}...; restore it from the original bundle"
            )


class NpzArrays(dict):
    """The arrays of an ``.npz``; a missing name is a :class:`BundleIntegrityError`."""

    def __init__(self, path: Path, arrays: Mapping[str, np.ndarray]):
        super().__init__(arrays)
        self.path = path

    def __missing__(self, key: str) -> np.ndarray:
        raise BundleIntegrityError(
            f"{self.path.name} has no array {key!r} (it holds {sorted(self)}); the bundle is "
            "incomplete: re-export it"
        )


def load_npz(path: str | Path) -> NpzArrays:
    """Load an ``.npz`` without pickle (object arrays are refused).

    Any failure to read (not a zip, truncated member, object array) is a
    :class:`BundleIntegrityError`; so is looking up an array the file does not hold.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            return NpzArrays(path, {k: f[k] for k in f.files})
    except Exception as e:  # zipfile, zlib, numpy format errors: all mean a corrupt file
        raise BundleIntegrityError(
            f"cannot read {path.name} in {path.parent} ({type(e).__name__}: {e}); restore the "
            "bundle from its original or re-export it"
        ) from e
