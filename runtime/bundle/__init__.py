"""The bundle: the contract between the exporter and the runtime.

:mod:`~scvi_onnx.bundle.format` names every file, graph input and output, array and probe;
:mod:`~scvi_onnx.bundle.manifest` reads and checks ``manifest.json`` (and typed configs);
:mod:`~scvi_onnx.bundle.files` checks sha256 and reads ``.npz`` files without pickle.
A bundle can be read with ``json`` + ``onnx`` + ``numpy`` alone.
"""

from __future__ import annotations

from .files import NpzArrays, load_npz, sha256_file, verify_checksums
from .format import *  # noqa: F403  (the format's names are the package's surface)
from .manifest import (
    CategoricalField,
    Manifest,
    ProteinField,
    Registry,
    count,
    normalize_digest,
    option,
    read_config,
    read_manifest,
)

__all__ = [
    "CategoricalField",
    "Manifest",
    "NpzArrays",
    "ProteinField",
    "Registry",
    "count",
    "load_npz",
    "normalize_digest",
    "option",
    "read_config",
    "read_manifest",
    "sha256_file",
    "verify_checksums",
]
