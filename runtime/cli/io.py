"""Input and output files: one-line read errors, atomic writes, tables."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import CLIError, error_message

logger = logging.getLogger("scvi_onnx.cli")


def check_input(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise CLIError(f"input file not found: {p}")
    if not p.is_file():
        raise CLIError(f"input {p} is not a file; pass an .h5ad file")
    return p


def read_h5ad(path: str, *, backed: bool):
    """Read an AnnData (or, from an .h5mu file, a MuData in memory: models set up with
    ``setup_mudata``); any failure to read is a one-line error (and only that line)."""
    p = check_input(path)
    if p.suffix.lower() == ".h5mu":
        return _read_h5mu(p)
    import anndata

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # anndata's own chatter about the file's encoding is not the user's problem
        warnings.simplefilter("ignore", FutureWarning)
        # duplicated gene names are refused with a clearer error when the data is used
        warnings.filterwarnings("ignore", message="Variable names are not unique")
        try:
            adata = anndata.read_h5ad(p, backed="r" if backed else None)
        except Exception as e:
            # the warnings of a failed read are dropped: the error line says it all
            raise CLIError(
                f"cannot read {p} as an .h5ad file: {error_message(e)}; pass an AnnData file "
                "written by anndata (AnnData.write_h5ad)"
            ) from e
    seen = set()
    for w in caught:  # re-emit once each, as the default warning filter would
        key = (w.category, str(w.message))
        if key not in seen:
            seen.add(key)
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return adata


def _read_h5mu(p: Path):
    try:
        import mudata
    except ImportError as e:
        raise CLIError(
            f"reading {p} needs the mudata package: pip install 'scvi-onnx[mudata]'"
        ) from e
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            return mudata.read_h5mu(p)
        except Exception as e:
            raise CLIError(
                f"cannot read {p} as an .h5mu file: {error_message(e)}; pass a MuData file "
                "written by mudata (MuData.write)"
            ) from e


def close(adata: Any) -> None:
    f = getattr(adata, "file", None)
    if f is not None and getattr(adata, "isbacked", False):
        with contextlib.suppress(Exception):
            f.close()


def check_output(path: str, suffixes: tuple[str, ...], what: str, *, overwrite: bool) -> Path:
    """Refuse an output path early (bad extension, existing file, missing folder)."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in suffixes:
        raise CLIError(
            f"unsupported {what} extension {p.suffix or '(none)'!r} in {p}; "
            f"use one of {', '.join(suffixes)}"
        )
    if p.is_dir():
        raise CLIError(f"output {p} is a folder; pass a file name")
    if p.exists() and not overwrite:
        raise CLIError(f"output {p} exists; pass --overwrite to replace it")
    parent = p.parent
    if not parent.is_dir():
        raise CLIError(f"output folder {parent} does not exist")
    return p


def replacement_refusal(
    out: Path,
    replaceable: Callable[[Path], bool],
    kind: str,
    source: Path | None = None,
    source_is: str = "the input",
) -> str | None:
    """Why replacing the existing folder ``out`` (``--overwrite``: removed, then written
    again) would lose what is not an earlier output, or ``None`` where it may be replaced: a
    file, the current folder or one above it, ``source`` (``source_is``) or a folder holding
    it, or a non-empty folder that ``replaceable`` does not recognise as ``kind``."""
    if out.is_symlink():
        return "it is a symbolic link"
    if not out.is_dir():
        return "it is not a folder"
    target = out.resolve()
    here = Path.cwd().resolve()
    if target == here or target in here.parents:
        return "it is the current folder or one above it"
    if source is not None:
        src = source.resolve()
        if target == src or target in src.parents:
            return f"it is (or holds) {source_is}, {source}"
    if any(out.iterdir()) and not replaceable(out):
        return f"it is not {kind}"
    return None


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path, write: Callable[[Path], None], *, overwrite: bool) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it to ``path``."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it private; outputs are normal files
        if path.exists() and not overwrite:
            raise CLIError(f"output {path} exists; pass --overwrite to replace it")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    logger.info("wrote %s", path)


def save_npy(arr: Any) -> Callable[[Path], None]:
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, arr)

    return write


def save_csv(frame: Any) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        frame.to_csv(tmp)

    return write


def frame(values: Any, obs_names: Any, columns: list[str]):
    import pandas as pd

    index = pd.Index([str(x) for x in obs_names], name=obs_names.name or "cell")
    return pd.DataFrame(values, index=index, columns=columns)
