"""The manifest: what a bundle holds, read and checked once; typed model configs.

``manifest.json`` holds the schema version, the model class, the config of the scvi-tools
module, the genes, the registry (where each input comes from in an AnnData), the graphs and
their IO names, the versions that made the bundle and the sha256 of every other file.

The config is kept as written (``Manifest.config``, shown by ``scvi-onnx info``); each model
reads the entries its maths depends on into a frozen dataclass of its own with
:func:`read_config`, which refuses a missing entry or a value the runtime does not implement.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..errors import BundleError, BundleIntegrityError, BundleVersionError
from . import format as F
from .files import check_inside, verify_checksums

_SHA256 = re.compile(r"[0-9a-f]{64}")
#: A bundle digest as written by ``info`` (``sha256:<hex>``); the bare hex is accepted too.
DIGEST_PREFIX = "sha256:"
_C = TypeVar("_C")


@dataclass(frozen=True)
class CategoricalField:
    """A categorical obs column and its training-time category order."""

    key: str | None
    categories: tuple

    @property
    def n_categories(self) -> int:
        return len(self.categories)

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "categories": list(self.categories)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CategoricalField:
        return cls(key=d.get("key"), categories=tuple(d["categories"]))


@dataclass(frozen=True)
class ProteinField:
    """Where a model's protein counts come from (TOTALVI), and the proteins' names.

    ``attr_name`` is ``"obsm"`` (``setup_anndata``: ``attr_key`` is the obsm key) or ``"X"`` /
    ``"layers"`` of a MuData modality (``setup_mudata``: ``attr_key`` is the layer).
    ``named`` is False when scvi-tools numbered the proteins (an obsm array registered
    without names): inputs are then matched by position, not by name.
    """

    attr_name: str
    attr_key: str | None
    names: tuple[str, ...]
    named: bool = True
    names_uns_key: str | None = None

    @property
    def n_proteins(self) -> int:
        return len(self.names)

    def to_json(self) -> dict[str, Any]:
        return {
            "attr_name": self.attr_name,
            "attr_key": self.attr_key,
            "names": list(self.names),
            "named": self.named,
            "names_uns_key": self.names_uns_key,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ProteinField:
        return cls(
            attr_name=d["attr_name"],
            attr_key=d.get("attr_key"),
            names=tuple(str(n) for n in d["names"]),
            named=bool(d.get("named", True)),
            names_uns_key=d.get("names_uns_key"),
        )


@dataclass(frozen=True)
class Registry:
    """What scvi-tools' ``setup_anndata`` (or ``setup_mudata``) registered: where each input
    comes from.

    ``proteins`` and ``panel`` are TOTALVI's protein counts and panel column (``panel_key``);
    ``modalities`` maps each registered field (``"X"``, ``"proteins"``, ``"batch"``,
    ``"labels"``, ``"panel"``, ``"size_factor"``, ``"extra_categorical_covs"``,
    ``"extra_continuous_covs"``) to the MuData modality it is read from (``None``: the
    MuData's own obs) for models set up with ``setup_mudata``; ``None`` for ``setup_anndata``.
    """

    layer: str | None
    batch: CategoricalField
    labels: CategoricalField
    size_factor_key: str | None = None
    categorical_covariates: tuple[CategoricalField, ...] = ()
    continuous_covariates: tuple[str, ...] = ()
    proteins: ProteinField | None = None
    panel: CategoricalField | None = None
    modalities: dict[str, str | None] | None = None

    def obs_columns(self) -> list[tuple[str, str]]:
        """``(obs column, what it is)`` of every registered obs column, in registry order."""
        cols = []
        if self.batch.key is not None:
            cols.append((self.batch.key, "batch_key"))
        if self.labels.key is not None:
            cols.append((self.labels.key, "labels_key"))
        cols += [(f.key, "categorical_covariate_keys") for f in self.categorical_covariates]
        cols += [(k, "continuous_covariate_keys") for k in self.continuous_covariates]
        if self.size_factor_key is not None:
            cols.append((self.size_factor_key, "size_factor_key"))
        if self.panel is not None and self.panel.key is not None:
            cols.append((self.panel.key, "panel_key"))
        return cols

    def to_json(self) -> dict[str, Any]:
        out = {
            "layer": self.layer,
            "batch": self.batch.to_json(),
            "labels": self.labels.to_json(),
            "size_factor_key": self.size_factor_key,
            "categorical_covariates": [c.to_json() for c in self.categorical_covariates],
            "continuous_covariates": list(self.continuous_covariates),
        }
        # written only where set: the manifests of models without them are unchanged
        if self.proteins is not None:
            out["proteins"] = self.proteins.to_json()
        if self.panel is not None:
            out["panel"] = self.panel.to_json()
        if self.modalities is not None:
            out["modalities"] = dict(self.modalities)
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Registry:
        return cls(
            layer=d.get("layer"),
            batch=CategoricalField.from_json(d["batch"]),
            labels=CategoricalField.from_json(d["labels"]),
            size_factor_key=d.get("size_factor_key"),
            categorical_covariates=tuple(
                CategoricalField.from_json(c) for c in d.get("categorical_covariates", [])
            ),
            continuous_covariates=tuple(d.get("continuous_covariates", [])),
            proteins=ProteinField.from_json(d["proteins"]) if d.get("proteins") else None,
            panel=CategoricalField.from_json(d["panel"]) if d.get("panel") else None,
            modalities=dict(d["modalities"]) if d.get("modalities") is not None else None,
        )


@dataclass(frozen=True)
class Manifest:
    """The parsed ``manifest.json`` of a bundle."""

    schema_version: int
    model_class: str
    config: dict[str, Any]
    genes: tuple[str, ...]
    registry: Registry
    graphs: dict[str, Any]
    versions: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    #: The folder it was read from (``None`` for a manifest being written).
    root: Path | None = field(default=None, compare=False)
    #: ``sha256:<hex>`` of the manifest.json bytes read (``""`` for one being written). The
    #: manifest lists every other file's sha256, so this one digest pins the whole bundle.
    digest: str = field(default="", compare=False)

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @functools.cached_property
    def gene_index(self) -> Any:
        """The genes as a ``pandas.Index`` of ``str``, built once per manifest (gene matching
        reads it on every call)."""
        import pandas as pd

        return pd.Index([str(g) for g in self.genes])

    @property
    def graph_names(self) -> tuple[str, ...]:
        """The ONNX graphs of the bundle, in manifest order."""
        return tuple(k for k, v in self.graphs.items() if k in F.GRAPH_FILES and _has_file(v))

    def graph_file(self, name: str) -> str:
        """The file of graph ``name`` (the manifest's, else the format's default)."""
        spec = self.graphs.get(name)
        fname = spec.get("file") if isinstance(spec, dict) else None
        fname = fname or F.GRAPH_FILES.get(name)
        if not isinstance(fname, str):
            raise BundleIntegrityError(
                f"{self._where()} names no file for the {name} graph; re-export the bundle"
            )
        return fname

    def has_graph(self, name: str) -> bool:
        return name in self.graphs

    def _where(self) -> str:
        return str(self.root / F.MANIFEST_FILE) if self.root else F.MANIFEST_FILE

    def to_json(self) -> dict[str, Any]:
        return {
            "format": F.FORMAT_NAME,
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
    def from_json(cls, d: dict[str, Any], root: Path | None = None, digest: str = "") -> Manifest:
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
            root=root,
            digest=digest,
        )


def _has_file(entry: Any) -> bool:
    return isinstance(entry, dict) and "file" in entry


def normalize_digest(digest: Any) -> str:
    """``sha256:<64 hex>`` from a digest written with or without the ``sha256:`` prefix.

    Raises
    ------
    InvalidArgumentError
        Not a sha256 digest.
    """
    from ..errors import InvalidArgumentError

    text = digest.strip().lower() if isinstance(digest, str) else ""
    hexpart = text[len(DIGEST_PREFIX) :] if text.startswith(DIGEST_PREFIX) else text
    if not _SHA256.fullmatch(hexpart):
        raise InvalidArgumentError(
            f"expected_digest must be a bundle digest 'sha256:<64 hex digits>' (as "
            f"`scvi-onnx info` shows it), got {digest!r}"
        )
    return DIGEST_PREFIX + hexpart


def read_manifest(
    path: str | Path, *, check_files: bool = True, expected_digest: str | None = None
) -> Manifest:
    """Read and check a bundle's manifest.

    Parameters
    ----------
    path
        The bundle folder.
    check_files
        Verify the sha256 of every file listed in the manifest (default). Loading never
        executes code from the bundle.
    expected_digest
        Refuse any bundle whose digest (``sha256:`` of its manifest.json bytes, shown by
        ``scvi-onnx info``) is not this one. Checksums prove a bundle is whole; the digest
        proves it is the one that was validated (anyone can rewrite a manifest).

    Raises
    ------
    BundleError
        The folder or manifest is missing or not a scvi-onnx manifest.
    BundleVersionError
        The schema version is newer (or older) than this runtime reads.
    BundleIntegrityError
        A listed file is missing or its checksum differs, or the digest is not
        ``expected_digest``.
    """
    expected = None if expected_digest is None else normalize_digest(expected_digest)
    root = Path(path)
    if not root.exists():
        raise BundleError(f"bundle not found: {root} does not exist")
    if not root.is_dir():
        raise BundleError(
            f"{root} is a file, not a bundle folder; pass the folder written by "
            "`scvi-onnx export` (it holds manifest.json)"
        )
    mpath = root / F.MANIFEST_FILE
    if not mpath.is_file():
        raise BundleError(
            f"{root} is not a scvi-onnx bundle: {F.MANIFEST_FILE} is missing; "
            "export one with `scvi-onnx export` or `scvi_onnx.exporter.export_model`"
        )
    try:
        data = mpath.read_bytes()
    except OSError as e:
        raise BundleError(f"cannot read {mpath}: {e.strerror or e}; check its permissions") from e
    # the digest of the very bytes parsed below (no second read that could differ)
    digest = DIGEST_PREFIX + hashlib.sha256(data).hexdigest()
    if expected is not None and digest != expected:
        raise BundleIntegrityError(
            f"{mpath} has digest {digest}, not the expected {expected}: this is not the "
            "bundle that was pinned; use the validated bundle, or pin this one's digest if it "
            "was validated"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_json(mpath, e) from e
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise _not_json(mpath, e) from e
    if not isinstance(raw, dict) or raw.get("format") != F.FORMAT_NAME:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise BundleError(
            f"{mpath} is not a scvi-onnx manifest (format {found!r}, expected "
            f"{F.FORMAT_NAME!r}); pass a bundle folder written by `scvi-onnx export`"
        )
    version = raw.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise BundleError(f"{mpath} has no integer schema_version (got {version!r}); re-export")
    if version > F.SCHEMA_VERSION:
        raise BundleVersionError(
            f"bundle schema version {version} is newer than this runtime reads "
            f"(up to {F.SCHEMA_VERSION}); upgrade scvi-onnx"
        )
    if version < F.MIN_SCHEMA_VERSION:
        raise BundleVersionError(
            f"bundle schema version {version} is older than this runtime reads "
            f"(from {F.MIN_SCHEMA_VERSION}); re-export the model or use an older scvi-onnx"
        )
    _check_fields(raw, mpath)
    try:
        manifest = Manifest.from_json(raw, root, digest)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BundleIntegrityError(f"{mpath} lacks a required field ({e}); re-export") from e
    if check_files:
        graph_files = [
            manifest.graphs[g]["file"] for g in manifest.graphs if _has_file(manifest.graphs[g])
        ]
        verify_checksums(root, manifest.files, graph_files)
    return manifest


def _not_json(mpath: Path, e: Exception) -> BundleIntegrityError:
    return BundleIntegrityError(
        f"{mpath} is not valid JSON ({e}); the bundle is corrupt: restore it from the "
        "original bundle or re-export the model"
    )


def _corrupt(mpath: Path | str, what: str) -> BundleIntegrityError:
    return BundleIntegrityError(f"{mpath}: {what}; the manifest is corrupt: re-export the model")


def _check_fields(raw: dict[str, Any], mpath: Path) -> None:
    """Refuse a manifest whose fields the runtime would misread (before any maths runs)."""
    for key, kind in (
        ("config", dict),
        ("registry", dict),
        ("graphs", dict),
        ("genes", list),
        ("files", dict),
    ):
        if key in raw and not isinstance(raw[key], kind):
            noun = "object" if kind is dict else "array"
            raise _corrupt(mpath, f"{key!r} must be a JSON {noun}")
    for name, digest in raw.get("files", {}).items():
        check_inside(name)
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise _corrupt(
                mpath, f"the checksum of {name!r} is not a sha256 hex digest ({digest!r})"
            )


# --------------------------------------------------------------------------------------------
# typed configs
# --------------------------------------------------------------------------------------------
def option(*choices: Any, default: Any = dataclasses.MISSING) -> Any:
    """A config field that must hold one of ``choices`` (a bundle with another value is
    refused rather than computed with the wrong formula)."""
    return field(default=default, metadata={"choices": choices})


def count(*, minimum: int = 0, default: Any = dataclasses.MISSING) -> Any:
    """A config field holding an integer ``>= minimum``."""
    return field(default=default, metadata={"minimum": minimum})


def read_config(manifest: Manifest, cls: type[_C]) -> _C:
    """Read the entries of ``manifest.config`` that the frozen dataclass ``cls`` declares.

    Fields without a default are required. :func:`option` fields must hold one of their
    choices (booleans must be booleans); :func:`count` fields non-negative (or positive)
    integers. Other entries of the config are left to ``info``.

    Raises
    ------
    BundleIntegrityError
        A required entry is missing, or a count is not an integer of the right range.
    BundleError
        An option holds a value this runtime does not implement.
    """
    where = manifest._where()
    raw = manifest.config
    values = {}
    absent = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in raw
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if absent:
        raise _corrupt(where, f"config lacks {', '.join(map(repr, absent))}")
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        value = raw[f.name]
        choices = f.metadata.get("choices")
        if choices is not None:
            wrong_kind = isinstance(value, bool) != isinstance(choices[0], bool)
            if wrong_kind or value not in choices:
                raise BundleError(
                    f"{where}: config {f.name}={value!r} is not one this runtime implements "
                    f"({', '.join(map(repr, choices))}); upgrade scvi-onnx or re-export"
                )
        minimum = f.metadata.get("minimum")
        if minimum is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < minimum
        ):
            kind = "a positive" if minimum == 1 else "a non-negative"
            raise _corrupt(where, f"config {f.name} must be {kind} integer, got {value!r}")
        if isinstance(value, list):
            value = tuple(value)
        values[f.name] = value
    return cls(**values)
