"""The four methods (and SCANVI's ``predict``) over Dask: cells in row chunks, on any scheduler.

An AnnData whose expression matrix (``X`` or the registered layer) is a Dask array, dense or of
scipy CSR chunks (as ``anndata.experimental.read_lazy`` / ``read_elem_lazy`` give from an
``.h5ad`` or ``.zarr`` store, :func:`read_soma` from a TileDB-SOMA experiment, or as a user
builds it) is run chunk by chunk on the active scheduler: a ``distributed.Client`` if one is
active, else Dask's default. The public methods dispatch here by themselves
(:func:`dask_dispatch`); per-cell results come back as lazy Dask arrays.

A TOTALVI model's protein counts (the registered ``obsm`` entry: a DataFrame, an array, a Dask
array or a lazily read DataFrame; or, for a model set up with ``setup_mudata``, a MuData whose
RNA modality holds a Dask array, the protein modality's counts) travel with each chunk
(:mod:`~scvi_onnx.distributed.proteins`).

The same numbers as in memory: a cell's noise is keyed by its global row, so per-cell outputs
are bit-identical whatever the chunking and the number of workers. Models travel as paths: each
worker process loads a bundle once (:mod:`~scvi_onnx.distributed.cache`).

Importing this package imports neither dask nor distributed (the ``dask`` extra): only
:func:`is_dask_anndata` and :func:`dask_dispatch` live here, and both work without them.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

__all__ = [
    "WORKER_CONFIG",
    "ModelInput",
    "dask_dispatch",
    "is_dask_anndata",
    "is_dask_array",
    "read_soma",
    "read_soma_proteins",
]

#: Dask config for the clusters that run scvi-onnx: ``with dask.config.set(WORKER_CONFIG):
#: cluster = LocalCluster(...)`` (or ``MALLOC_MMAP_THRESHOLD_=33554432
#: MALLOC_TRIM_THRESHOLD_=67108864 dask worker ...``). glibc's malloc settings for the worker
#: processes, which Dask's nanny sets for them (``pre-spawn-environ``; a Nanny's ``env=`` is
#: too late: glibc reads them when the process starts):
#:
#: * ``MALLOC_MMAP_THRESHOLD_``, 32 MiB (glibc's own dynamic ceiling). The nanny's
#:   ``MALLOC_TRIM_THRESHOLD_`` turns off glibc's dynamic mmap threshold: every array over 128
#:   KiB is then mapped and unmapped afresh and the scoring methods need 2x the CPU (ELBO of
#:   8192 PBMC cells in a worker: 0.90 vs 0.44 s CPU, 168,000 vs 9,000 page faults).
#: * ``MALLOC_TRIM_THRESHOLD_``, 64 MiB instead of the nanny's 64 KiB. At 64 KiB glibc hands
#:   the heap's free top back to the kernel after every large free, and each chunk's arrays
#:   (its CSR block, ~35 MB per 8,192 PBMC cells, and the minibatches) are paged in afresh:
#:   ~20,000 page faults and ~0.2 s of kernel CPU per 200,000 cells (latent), ~8% of the run.
#:   A worker keeps up to 64 MiB of freed heap for the next chunk instead.
WORKER_CONFIG = {
    "distributed.nanny.pre-spawn-environ.MALLOC_MMAP_THRESHOLD_": str(32 << 20),
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": str(64 << 20),
}


def is_dask_array(a: Any) -> bool:
    """True for a ``dask.array.Array`` (checked by type name: dask need not be imported)."""
    return any(
        c.__name__ == "Array" and c.__module__.startswith("dask.array") for c in type(a).__mro__
    )


def _registered_matrix(adata: Any, layer: str | None) -> Any:
    if layer is None:
        return getattr(adata, "X", None)
    layers = getattr(adata, "layers", None)
    try:
        return layers[layer] if layers is not None and layer in layers else None
    except Exception:  # a layers mapping that refuses lookups is not a Dask input
        return None


def is_dask_anndata(adata: Any, layer: str | None = None) -> bool:
    """True when ``adata``'s registered expression matrix (``X``, or ``layers[layer]``) is a
    Dask array: such an AnnData runs on Dask."""
    return adata is not None and is_dask_array(_registered_matrix(adata, layer))


def _is_dask_mudata(data: Any, registry: Any) -> bool:
    """A MuData that runs on Dask: for a model set up with ``setup_mudata``, one whose RNA
    modality's registered matrix is a Dask array (as for an AnnData; other Dask arrays, e.g.
    the proteins, are read in memory); for any other model, one holding a Dask array in any
    modality, which the Dask methods refuse with the reason (the in-memory path would read it
    on the client)."""
    from ..data.mudata import is_mudata

    if not is_mudata(data):
        return False
    mods = getattr(registry, "modalities", None)
    if mods is not None:
        rna = data.mod[mods["X"]] if mods.get("X") in data.mod else None
        return rna is not None and is_dask_anndata(rna, registry.layer)
    for mod in data.mod.values():
        layers = getattr(mod, "layers", None) or {}
        if is_dask_array(getattr(mod, "X", None)) or any(
            is_dask_array(layers[k]) for k in layers.keys()
        ):
            return True
    return False


def _is_dask_gathered(data: Any, layer: str | None) -> bool:
    """A :class:`~scvi_onnx.data.mudata.ModelInput` whose AnnData's registered matrix is a
    Dask array (e.g. a SOMA experiment's RNA and protein measurements)."""
    from ..data.mudata import ModelInput

    return isinstance(data, ModelInput) and is_dask_anndata(data.adata, layer)


def dask_dispatch(method: Callable) -> Callable:
    """Run a public method on Dask when its AnnData's registered matrix is a Dask array.

    The wrapped method is unchanged for any other input; with a Dask input the call goes,
    with the arguments given (the defaults are the same), to the method of the same name in
    :mod:`scvi_onnx.distributed.methods`; an argument it does not take is refused by name.
    """
    sig = inspect.signature(method)

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        bound = sig.bind(self, *args, **kwargs)
        given = dict(bound.arguments)
        del given["self"]
        if given.get("dataloader") is not None:
            return method(self, *args, **kwargs)
        data = given.get("adata")
        if data is None:
            data = self.adata
        layer = given.get("layer") or self.manifest.registry.layer
        if not (
            is_dask_anndata(data, layer)
            or _is_dask_mudata(data, self.manifest.registry)
            or _is_dask_gathered(data, layer)
        ):
            return method(self, *args, **kwargs)
        from ..errors import InvalidArgumentError
        from . import methods

        target = getattr(methods, method.__name__)
        accepted = inspect.signature(target).parameters
        unknown = sorted(k for k in given if k not in accepted)
        if unknown:
            raise InvalidArgumentError(
                f"{', '.join(unknown)}: not available for an AnnData whose matrix is a Dask "
                "array; leave them out, or compute the AnnData into memory"
            )
        given["adata"] = data
        return target(self, **given)

    return run


def __getattr__(name: str):
    if name in ("read_soma", "read_soma_proteins"):
        from . import soma

        return getattr(soma, name)
    if name == "ModelInput":
        from ..data.mudata import ModelInput

        return ModelInput
    raise AttributeError(f"module 'scvi_onnx.distributed' has no attribute {name!r}")
