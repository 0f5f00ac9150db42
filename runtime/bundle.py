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

# Arrays in arrays.npz
ARR_PX_R = "px_r"
ARR_LIB_MEANS = "library_log_means"
ARR_LIB_VARS = "library_log_vars"

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
        raw = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleIntegrityError(f"{mpath} is not valid JSON ({e}); the bundle is corrupt") from e
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise BundleError(f"{mpath} is not a scvi-onnx manifest (format != {FORMAT_NAME!r})")
    version = raw.get("schema_version")
    if not isinstance(version, int):
        raise BundleError(f"{mpath} has no integer schema_version")
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
    try:
        manifest = Manifest.from_json(raw)
    except (KeyError, TypeError, ValueError) as e:
        raise BundleIntegrityError(f"{mpath} lacks a required field ({e}); re-export") from e
    if check_files:
        verify_checksums(root, manifest)
    return manifest


def verify_checksums(root: str | Path, manifest: Manifest) -> None:
    """Check every file listed in the manifest against its sha256."""
    root = Path(root)
    if not manifest.files:
        raise BundleIntegrityError(f"{root / MANIFEST_FILE} lists no file checksums")
    for name, digest in manifest.files.items():
        p = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BundleIntegrityError(f"manifest lists a file outside the bundle: {name!r}")
        if not p.is_file():
            raise BundleIntegrityError(f"bundle file missing: {name} (expected in {root})")
        actual = sha256_file(p)
        if actual != digest:
            raise BundleIntegrityError(
                f"bundle file {name} is altered or truncated: sha256 {actual[:16]}... "
                f"!= manifest {digest[:16]}...; restore it from the original bundle"
            )


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Load an ``.npz`` without pickle (object arrays are refused)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise BundleIntegrityError(f"cannot read {path}: {e}") from e
