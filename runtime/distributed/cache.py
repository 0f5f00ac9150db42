"""Models on workers: each worker process loads a bundle once and reuses it for every chunk.

A model travels to the workers as a :class:`ModelRef` (its path, the sha256 of its
``manifest.json`` and how to load it), never as a pickle: ONNX Runtime sessions are never
serialized. The first chunk a process runs loads the bundle with every file's checksum
checked and compares the manifest's digest with the client's, so a worker that sees another
bundle at that path (another machine, a bundle replaced mid-run) fails with a
:class:`~scvi_onnx.errors.BundleIntegrityError` instead of computing other numbers.

This is the one process-wide state of the runtime, and it is a cache: the models it holds are
immutable after loading and thread-safe, so concurrent tasks share them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..bundle import format as F
from ..errors import BundleIntegrityError

logger = logging.getLogger(__name__)

#: Models kept per process (least recently used dropped first).
MAX_CACHED_MODELS = 4


def manifest_digest(path: str | Path) -> str:
    """sha256 of a bundle's ``manifest.json`` (which holds every other file's sha256)."""
    with open(Path(path) / F.MANIFEST_FILE, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@dataclass(frozen=True)
class ModelRef:
    """What a worker needs to load the client's model: a path and how, not the model.

    Attributes
    ----------
    path
        Absolute bundle folder (the same path must hold the same bundle on every worker).
    digest
        sha256 of the client's ``manifest.json``.
    device, intra_op_threads, scoring, input_layer
        As given to :func:`scvi_onnx.load` on the client.
    task_threads
        Worker threads of one task's engine (1: Dask's worker threads are the parallelism).
    """

    path: str
    digest: str
    device: str = "cpu"
    intra_op_threads: int | None = None
    scoring: str = "auto"
    input_layer: str = "auto"
    task_threads: int = 1


_lock = threading.Lock()
_models: OrderedDict[ModelRef, Any] = OrderedDict()
_loading: dict[ModelRef, threading.Lock] = {}


def cached_model(ref: ModelRef) -> Any:
    """The loaded model for ``ref`` in this process (loaded and verified on first use)."""
    with _lock:
        model = _models.get(ref)
        if model is not None:
            _models.move_to_end(ref)
            return model
        load_lock = _loading.setdefault(ref, threading.Lock())
    with load_lock:  # one load per model, even when several worker threads start together
        with _lock:
            if ref in _models:
                return _models[ref]
        model = _load(ref)
        with _lock:
            _models[ref] = model
            while len(_models) > MAX_CACHED_MODELS:
                _models.popitem(last=False)
            _loading.pop(ref, None)
    return model


def _load(ref: ModelRef) -> Any:
    from ..api.base import load

    _check_malloc_environment()

    try:
        found = manifest_digest(ref.path)
    except OSError as e:
        raise BundleIntegrityError(
            f"this worker cannot read the bundle {ref.path} ({e}); every worker needs the "
            "bundle at the same path as the client (a shared file system, or a copy)"
        ) from e
    if found != ref.digest:
        raise BundleIntegrityError(
            f"the bundle at {ref.path} on this worker is not the client's: its manifest.json "
            f"sha256 is {found[:12]}..., the client's {ref.digest[:12]}...; give every worker "
            "the same bundle"
        )
    model = load(
        ref.path,
        device=ref.device,
        verify_checksums=True,
        intra_op_threads=ref.intra_op_threads,
        n_threads=ref.task_threads,
        scoring=ref.scoring,
        input_layer=ref.input_layer,
    )
    logger.info("worker loaded %s (%s) on %s", ref.path, ref.digest[:12], model.provider)
    return model


def _check_malloc_environment() -> None:
    """Say once per process when Dask's malloc setting costs this worker 2x in CPU."""
    if "MALLOC_TRIM_THRESHOLD_" in os.environ and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        logger.warning(
            "this worker runs with MALLOC_TRIM_THRESHOLD_ but no MALLOC_MMAP_THRESHOLD_ (Dask's "
            "nanny default): glibc then maps every array over 128 KiB afresh and the scoring "
            "methods need ~2x the CPU; start workers under "
            "dask.config.set(scvi_onnx.distributed.WORKER_CONFIG), or with "
            "MALLOC_MMAP_THRESHOLD_=33554432 in their environment"
        )


def cached_refs() -> list[ModelRef]:
    """The models this process holds (for tests and diagnostics)."""
    with _lock:
        return list(_models)
