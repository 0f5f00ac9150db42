"""Bundle files: checksums and the pickle-free ``.npz`` reader."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import BundleError, BundleIntegrityError
from .format import MANIFEST_FILE, REQUIRED_FILES


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (not memory-mapped: mapped pages count in the
    process's resident memory while mapped, 126 MB per graph of a wide model)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


#: Bytes of listed files from which :func:`verify_checksums` hashes them on several threads
#: (hashlib releases the GIL): a 100,000-region PEAKVI's ~510 MB took 0.50 s on one core and
#: 0.27 s on two.
PARALLEL_HASH_BYTES = 32 << 20


def check_inside(name: str) -> None:
    """A manifest may only name files inside its own bundle folder."""
    p = Path(name)
    if not name or p.is_absolute() or ".." in p.parts or p.drive:
        raise BundleIntegrityError(
            f"manifest lists a file outside the bundle: {name!r}; a bundle only refers to "
            "files inside its own folder: re-export it"
        )


def verify_checksums(
    root: str | Path, files: Mapping[str, str], graph_files: Iterable[str]
) -> None:
    """Check every file listed in the manifest (``files``: name -> sha256).

    Every file the runtime reads (:data:`~scvi_onnx.bundle.format.REQUIRED_FILES` and the
    ``graph_files`` named in the manifest's ``graphs``) must be listed: an unlisted file would
    be loaded unchecked. Every listed file is checked, whatever its name.
    """
    root = Path(root)
    if not files:
        raise BundleIntegrityError(f"{root / MANIFEST_FILE} lists no file checksums")
    for name in files:
        check_inside(name)
    unlisted = [n for n in dict.fromkeys([*REQUIRED_FILES, *graph_files]) if n not in files]
    if unlisted:
        raise BundleIntegrityError(
            f"{root / MANIFEST_FILE} lists no checksum for {', '.join(map(repr, unlisted))}; "
            "the file cannot be verified: re-export the bundle"
        )
    for name in files:
        if not (root / name).is_file():
            raise BundleIntegrityError(
                f"bundle file missing: {name} (expected in {root}); restore it from the "
                "original bundle"
            )

    def digest_of(name: str) -> str | OSError:
        try:
            return sha256_file(root / name)
        except OSError as e:
            return e

    sizes = {n: (root / n).stat().st_size for n in files}
    threads = min(len(sizes), os.cpu_count() or 1, 4)
    if threads > 1 and sum(sizes.values()) >= PARALLEL_HASH_BYTES:
        # largest first, so that the threads finish together
        order = sorted(sizes, key=lambda n: -sizes[n])
        with ThreadPoolExecutor(threads, thread_name_prefix="scvi-onnx-sha256") as ex:
            found = dict(zip(order, ex.map(digest_of, order), strict=True))
    else:
        found = {n: digest_of(n) for n in sizes}
    for name, digest in files.items():
        actual = found[name]
        if isinstance(actual, OSError):
            raise BundleError(
                f"cannot read bundle file {name} in {root}: {actual.strerror or actual}; "
                "check its permissions"
            ) from actual
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
