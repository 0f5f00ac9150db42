"""The model classes scvi-onnx knows: one line each, read by the runtime and the exporter.

A bundle's ``model_class`` (scvi-tools' model class name) names its entry: the public runtime
class, the module that computes its terms, and the exporter's spec that writes its bundle.
Paths are ``"module:attribute"`` strings, imported on first use (importing this registry loads
no model, and the runtime never imports the exporter).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..bundle import format as F
from ..bundle import load_npz, read_config, read_manifest
from ..errors import BundleError

if TYPE_CHECKING:
    from .base import BundleContents


@dataclass(frozen=True)
class ModelEntry:
    """Where the pieces of one model class live."""

    api: str  # the public runtime class
    module: str  # its scvi-tools module's terms (a Module subclass)
    export_spec: str  # the exporter's spec (needs the export extra)
    features: str = "genes"  # what the bundle's features (manifest ``genes``) are, in messages

    def load(self, which: str) -> Any:
        path, _, name = getattr(self, which).partition(":")
        return getattr(importlib.import_module(path), name)


MODELS: dict[str, ModelEntry] = {
    "SCVI": ModelEntry(
        "scvi_onnx.api.scvi:OnnxSCVI",
        "scvi_onnx.models.vae:VAE",
        "scvi_onnx.exporter.specs.vae:SCVISpec",
    ),
    "LinearSCVI": ModelEntry(
        "scvi_onnx.api.linear:OnnxLinearSCVI",
        "scvi_onnx.models.ldvae:LDVAE",
        "scvi_onnx.exporter.specs.ldvae:LinearSCVISpec",
    ),
    "SCANVI": ModelEntry(
        "scvi_onnx.api.scanvi:OnnxSCANVI",
        "scvi_onnx.models.scanvae:SCANVAE",
        "scvi_onnx.exporter.specs.scanvae:SCANVISpec",
    ),
    "TOTALVI": ModelEntry(
        "scvi_onnx.api.totalvi:OnnxTOTALVI",
        "scvi_onnx.models.totalvae:TOTALVAE",
        "scvi_onnx.exporter.specs.totalvae:TOTALVISpec",
    ),
    "PEAKVI": ModelEntry(
        "scvi_onnx.api.peakvi:OnnxPEAKVI",
        "scvi_onnx.models.peakvae:PEAKVAE",
        "scvi_onnx.exporter.specs.peakvae:PEAKVISpec",
        features="regions",
    ),
}


def entry(model_class: str) -> ModelEntry:
    """The registry entry of ``model_class``; a :class:`BundleError` for an unknown one."""
    if model_class not in MODELS:
        raise BundleError(
            f"bundle holds a {model_class} model; this runtime reads {', '.join(MODELS)}"
        )
    return MODELS[model_class]


def feature_name(model_class: str) -> str:
    """What ``model_class``'s features are called in messages ("genes"; PEAKVI's "regions")."""
    return MODELS[model_class].features if model_class in MODELS else "genes"


def open_bundle(
    path: str | Path, *, check_files: bool = True, expected_digest: str | None = None
) -> tuple[ModelEntry, BundleContents]:
    """Read a bundle: its manifest (checksums verified, digest pinned when
    ``expected_digest`` is given), typed config and arrays.

    Raises
    ------
    BundleError
        The bundle is unreadable, tampered, too new, of an unknown model class, or its config
        holds a value this runtime does not implement.
    """
    from .base import BundleContents

    manifest = read_manifest(path, check_files=check_files, expected_digest=expected_digest)
    e = entry(manifest.model_class)
    config = read_config(manifest, e.load("module").Config)
    arrays = load_npz(Path(path) / F.ARRAYS_FILE)
    return e, BundleContents(Path(path), manifest, config, arrays)
