"""``--scheduler``: the per-cell commands on a Dask cluster, into an AnnData ``.zarr`` store.

``--scheduler ADDRESS`` connects to a running ``dask-scheduler``; ``--scheduler local:N``
starts a ``LocalCluster`` of N single-threaded worker processes for the run. The input
(``.h5ad``, AnnData ``.zarr``, or a TileDB-SOMA experiment) is read lazily in row chunks on the
workers; each chunk's task computes its cells and writes them into the output store itself
(``obsm[KEY]`` for ``latent``, an obs column per metric, ``obs[KEY]`` for ``predict``), so
nothing of size cells x genes reaches this process. The store is written next to the target
under a temporary name and renamed when every chunk is in; a failure removes it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .common import PROG, CLIError, print_json
from .io import replacement_refusal

#: Rows per chunk by default (a multiple of the default minibatch of 128 cells).
DEFAULT_CHUNK_ROWS = 8192
DASK_COMMANDS = ("latent", "predict", "elbo", "reconstruction-error", "marginal-ll")
_METRIC_NAMES = {
    "elbo": "elbo",
    "reconstruction-error": "reconstruction_loss",
    "marginal-ll": "marginal_ll",
}


# =============================================================================================
# the flag group, and the dispatch between the in-process and the Dask command
# =============================================================================================
def add_scheduler_options(parser: argparse.ArgumentParser) -> None:
    """Add the ``--scheduler`` group to a per-cell command; with ``--scheduler`` the command
    runs :func:`cmd_dask` instead of its in-process function."""
    g = parser.add_argument_group(
        "scale-out on Dask (needs the dask extra: pip install 'scvi-onnx[dask]')"
    )
    g.add_argument(
        "--scheduler",
        metavar="ADDRESS|local:N",
        help="run on Dask: the address of a running dask-scheduler (e.g. tcp://host:8786), or "
        "local:N for a LocalCluster of N worker processes. The input may then be .h5ad, an "
        "AnnData .zarr, a TileDB-SOMA experiment or (setup_mudata models) .h5mu; outputs are "
        "written to a .zarr store by the workers, chunk by chunk",
    )
    g.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_ROWS,
        metavar="N",
        help=f"cells per chunk read, rounded to a multiple of --batch-size (default: "
        f"{DEFAULT_CHUNK_ROWS}); a task reads at least 8,192 cells (Dask config "
        "scvi-onnx.min-chunk-rows), grouping smaller chunks",
    )
    g.add_argument(
        "--soma-measurement",
        default="RNA",
        metavar="NAME",
        help="SOMA input: the measurement holding the counts (default: RNA)",
    )
    g.add_argument(
        "--soma-layer",
        default="data",
        metavar="NAME",
        help="SOMA input: the X layer of the raw counts (default: data; the Census's is raw)",
    )
    g.add_argument(
        "--soma-var-names",
        default="var_id",
        metavar="COLUMN",
        help="SOMA input: the var column of the gene names the model knows (default: var_id; "
        "the Census's: feature_id or feature_name)",
    )
    g.add_argument(
        "--soma-protein-measurement",
        metavar="NAME",
        help="SOMA input for a TOTALVI: the measurement holding the protein (antibody) counts, "
        "e.g. ADT; its layer is --soma-protein-layer, its names --soma-protein-var-names",
    )
    g.add_argument(
        "--soma-protein-layer",
        metavar="NAME",
        help="SOMA input: the X layer of the protein counts (default: --soma-layer)",
    )
    g.add_argument(
        "--soma-protein-var-names",
        default="var_id",
        metavar="COLUMN",
        help="SOMA input: the var column of the protein names the model knows (default: var_id)",
    )
    local = parser.get_default("func")
    parser.set_defaults(func=_choose(local))


def _choose(local: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        if getattr(args, "scheduler", None):
            return cmd_dask(args)
        if Path(args.input).is_dir() and _input_kind(args.input) != "h5ad":
            raise CLIError(
                f"input {args.input} is {_KINDS[_input_kind(args.input)]}, read on Dask only: "
                "pass --scheduler local:N (or a scheduler's address)"
            )
        return local(args)

    return run


_KINDS = {"zarr": "an AnnData .zarr store", "soma": "a SOMA experiment"}


def _input_kind(path: str) -> str:
    """``"h5ad"``, ``"h5mu"``, ``"zarr"`` or ``"soma"``; a folder that is neither of the last
    two is ``"h5ad"`` (the reader then says what is wrong with it)."""
    p = Path(path)
    if p.suffix.lower() == ".h5mu":
        return "h5mu"
    if p.suffix.lower() == ".h5ad" or p.is_file():
        return "h5ad"
    if p.is_dir() and any((p / f).exists() for f in (".zgroup", "zarr.json", ".zattrs")):
        return "zarr"
    from ..distributed.soma import is_soma_experiment

    if is_soma_experiment(path):
        return "soma"
    return "h5ad"


# =============================================================================================
# the cluster, the input and the output store
# =============================================================================================
@contextlib.contextmanager
def connect(spec: str) -> Iterator[Any]:
    """A ``distributed.Client`` for ``--scheduler`` (``local:N`` starts and stops a
    LocalCluster of N single-threaded worker processes on the loopback)."""
    try:
        from distributed import Client, LocalCluster
    except ImportError as e:
        raise CLIError(
            f"--scheduler needs dask and distributed: pip install 'scvi-onnx[dask]' ({e})"
        ) from e
    if spec.startswith("local:"):
        try:
            n = int(spec[len("local:") :])
        except ValueError:
            n = 0
        if n < 1:
            raise CLIError(f"--scheduler local:N needs a positive number of workers, got {spec!r}")
        import dask

        from ..distributed import WORKER_CONFIG

        # no dashboard, so nobody reads the workers' statistical profiles: not sampled
        with dask.config.set({**WORKER_CONFIG, "distributed.worker.profile.enabled": False}):
            cluster = LocalCluster(
                n_workers=n,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
                # the workers' own logs (a task's traceback, a worker killed at Ctrl-C) are
                # not the command's: its errors are the one line the client raises
                silence_logs=logging.CRITICAL,
            )
        try:
            with Client(cluster) as client:
                yield client
        finally:
            cluster.close()
        return
    try:
        client = Client(spec, timeout="30s")
    except (OSError, TimeoutError, ValueError) as e:
        raise CLIError(f"cannot reach the Dask scheduler at {spec}: {e}") from e
    with client:
        yield client


def open_input(args: argparse.Namespace, model) -> Any:
    """The input as an AnnData whose registered matrix is a Dask array of ``chunk`` rows."""
    chunk = _chunk_rows(args)
    kind = _input_kind(args.input)
    if kind in ("h5ad", "h5mu") and not Path(args.input).exists():
        raise CLIError(f"input file not found: {args.input}")
    if kind == "h5mu":
        return lazy_mudata(args.input, model, chunk)
    if kind == "soma":
        from ..data.mudata import ModelInput
        from ..distributed.soma import read_soma, read_soma_proteins

        field = model.manifest.registry.proteins
        if field is not None and not args.soma_protein_measurement:
            raise CLIError(
                f"{args.bundle} holds a {model.manifest.model_class} model, which reads protein "
                "counts besides the genes; in a SOMA experiment they live in another "
                "measurement: pass --soma-protein-measurement NAME (e.g. ADT; and "
                "--soma-protein-layer, --soma-protein-var-names where they differ)"
            )
        keys = [k for k, _ in model.manifest.registry.obs_columns()]
        rna = read_soma(
            args.input,
            measurement=args.soma_measurement,
            layer=args.soma_layer,
            var_names=args.soma_var_names,
            obs_columns=keys,
            chunk_size=chunk,
        )
        if field is None:
            return rna
        proteins = read_soma_proteins(
            args.input,
            measurement=args.soma_protein_measurement,
            layer=args.soma_protein_layer or args.soma_layer,
            var_names=args.soma_protein_var_names,
            chunk_size=chunk,
        )
        return ModelInput(rna, proteins)
    from anndata.experimental import read_elem_lazy, read_lazy

    try:
        adata = read_lazy(args.input)
    except Exception as e:
        raise CLIError(f"cannot read {args.input} as an AnnData {kind} store: {e}") from e
    layer = model.manifest.registry.layer
    if kind == "h5ad":
        import h5py

        store = h5py.File(args.input, "r")
    else:
        import zarr

        store = zarr.open_group(args.input, mode="r")
    where = "X" if layer is None else f"layers/{layer}"
    if where not in store:
        return adata  # the methods raise the in-memory error (no X / no such layer)
    elem = store[where]
    n_vars = int(adata.n_vars)
    matrix = read_elem_lazy(elem, chunks=(chunk, n_vars))
    if layer is None:
        adata.X = matrix
    else:
        adata.layers[layer] = matrix
    return adata


def lazy_mudata(path: str, model, chunk: int) -> Any:
    """An ``.h5mu`` file as a MuData for a model set up with ``setup_mudata``: every modality's
    obs and var and the file's own obs in memory, their matrices (``X`` and layers) read lazily,
    ``chunk`` rows at a time (the RNA matrix is what the tasks split; the proteins' tens of
    columns come with each task's rows). The file stays open while the run reads it."""
    reg = model.manifest.registry
    if reg.modalities is None:
        field = reg.proteins
        hint = "" if field is None else f" with the proteins in obsm[{field.attr_key!r}]"
        raise CLIError(
            f"{path} is a MuData file, but this {model.manifest.model_class} model was set up "
            f"with setup_anndata (one AnnData): pass an .h5ad or .zarr{hint}"
        )
    try:
        import mudata
    except ImportError as e:
        raise CLIError(
            f"reading {path} needs the mudata package: pip install 'scvi-onnx[mudata]'"
        ) from e
    import anndata
    import h5py
    from anndata.experimental import read_elem_lazy
    from anndata.io import read_elem

    try:
        f = h5py.File(path, "r")
        mods = {}
        for name, g in f["mod"].items():
            obs, var = read_elem(g["obs"]), read_elem(g["var"])
            shape = (chunk, var.shape[0])
            x = None  # absent, or written as an encoded null (a modality of layers only)
            if "X" in g and g["X"].attrs.get("encoding-type") != "null":
                x = read_elem_lazy(g["X"], chunks=shape)
            layers = {k: read_elem_lazy(v, chunks=shape) for k, v in g.get("layers", {}).items()}
            mods[name] = anndata.AnnData(X=x, obs=obs, var=var, layers=layers)
        own = read_elem(f["obs"]) if "obs" in f else None
    except Exception as e:
        raise CLIError(
            f"cannot read {path} as an .h5mu file: {e}; pass a MuData file written by mudata "
            "(MuData.write)"
        ) from e
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mdata = mudata.MuData(mods)
    if own is not None:  # the MuData's own columns (modality columns are prefixed)
        own = own.reindex(mdata.obs_names)
        for col in own.columns:
            if col not in mdata.obs.columns:
                mdata.obs[col] = own[col].to_numpy()
    return mdata


def _chunk_rows(args: argparse.Namespace) -> int:
    from ..methods.engine import DEFAULT_BATCH_SIZE

    if args.chunk_size < 1:
        raise CLIError(f"--chunk-size must be a positive integer, got {args.chunk_size}")
    bs = args.batch_size or DEFAULT_BATCH_SIZE
    return max(bs, int(round(args.chunk_size / bs)) * bs)


def _check_store(path: str, what: str, overwrite: bool, source: str) -> Path:
    """The output store, refused before any work where writing it would lose data: the
    input itself (or a folder holding it, or inside it), or, with ``--overwrite``, anything
    but an AnnData store or an empty folder (``overwrite`` replaces the whole folder)."""
    p = Path(path)
    if p.suffix.lower() != ".zarr":
        raise CLIError(f"with --scheduler, {what} must be a .zarr store, got {p}")
    target = p.resolve()
    src = Path(source).resolve() if "://" not in source else None
    if src is not None and (target == src or target in src.parents or src in target.parents):
        raise CLIError(
            f"{what} {p} is the input {source} (or holds it, or is inside it); the input is "
            "read while the output is written: write the results to another store"
        )
    if p.exists() or p.is_symlink():
        if not overwrite:
            raise CLIError(f"output {p} exists; pass --overwrite to replace it")
        why = replacement_refusal(p, _anndata_store, "an AnnData store")
        if why is not None:
            raise CLIError(
                f"output {p} exists and {why}: --overwrite replaces only an AnnData .zarr "
                "store (an earlier run's) or an empty folder: remove it yourself or write to "
                "another path"
            )
    if not p.parent.is_dir():
        raise CLIError(f"output folder {p.parent} does not exist")
    return p


def _anndata_store(p: Path) -> bool:
    """Whether the folder ``p`` is an AnnData zarr store (an earlier run's results)."""
    try:
        import zarr

        attrs = dict(zarr.open_group(str(p), mode="r").attrs)
    except Exception:  # not a zarr group (zarr raises several types)
        return False
    return attrs.get("encoding-type") == "anndata"


class Store:
    """An AnnData ``.zarr`` store being written: obs names first, then arrays filled by the
    workers chunk by chunk; :meth:`commit` renames it to the target."""

    def __init__(self, target: Path, obs_names: Any, chunk_rows: int):
        import anndata
        import pandas as pd

        self.target = target
        self.chunk_rows = chunk_rows
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        self.path = self.tmp / target.name
        self.obs_columns: list[str] = []
        skeleton = anndata.AnnData(obs=pd.DataFrame(index=pd.Index(obs_names).astype(str)))
        with _quiet():
            skeleton.write_zarr(self.path)

    def _group(self):
        import zarr

        return zarr.open_group(str(self.path), mode="r+")

    def array(self, where: str, shape: tuple[int, ...], dtype: Any) -> str:
        """Create the array ``where`` (``obsm/KEY``, ``obs/COL``), chunked as the tasks."""
        g = self._group()
        chunks = (min(self.chunk_rows, max(1, shape[0])), *shape[1:])
        arr = g.create_array(where, shape=shape, chunks=chunks, dtype=np.dtype(dtype))
        arr.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        if where.startswith("obs/"):
            self.obs_columns.append(where[len("obs/") :])
        return where

    def categorical(self, where: str, n: int, categories: np.ndarray) -> str:
        """A categorical obs column: its categories now, its codes (returned) by the tasks."""
        from anndata.io import write_elem

        g = self._group()
        grp = g.create_group(where)
        grp.attrs.update(
            {"encoding-type": "categorical", "encoding-version": "0.2.0", "ordered": False}
        )
        write_elem(grp, "categories", np.asarray(categories, dtype=object))
        codes = f"{where}/codes"
        self.array(codes, (n,), np.int32)
        self.obs_columns[-1] = where[len("obs/") :]
        return codes

    def commit(self, overwrite: bool) -> None:
        import zarr

        g = self._group()
        obs = g["obs"]
        order = list(obs.attrs.get("column-order", [])) + self.obs_columns
        obs.attrs["column-order"] = order
        with _quiet():
            zarr.consolidate_metadata(str(self.path))
        if self.target.exists():
            if not overwrite:
                raise CLIError(f"output {self.target} exists; pass --overwrite to replace it")
            shutil.rmtree(self.target) if self.target.is_dir() else self.target.unlink()
        os.replace(self.path, self.target)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


@contextlib.contextmanager
def _quiet():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr format notices of anndata / zarr
        yield


def _write_chunk(res: dict, path: str, targets: tuple, rows: tuple[int, int], sums: tuple) -> dict:
    """On a worker: write a chunk's outputs into the store, return its summary."""
    import zarr

    from ..distributed.methods import _summary

    a, b = rows
    for name, where in targets:
        arr = zarr.open_array(store=path, path=where, mode="r+")
        arr[a:b] = res[name]
    return _summary(res, sums)


# =============================================================================================
# the command
# =============================================================================================
def cmd_dask(args: argparse.Namespace) -> int:
    from ..distributed import methods as dm
    from .commands import _load_model, _progress, _summary

    started = time.perf_counter()
    command = args.command
    if command in ("latent", "predict"):
        out = _check_store(args.output, "-o/--output", args.overwrite, args.input)
    else:
        out = (
            _check_store(args.per_cell, "--per-cell", args.overwrite, args.input)
            if args.per_cell
            else None
        )
    if command in ("latent", "predict"):
        if not args.key or "/" in args.key:
            raise CLIError(f"--key must be a non-empty name without '/', got {args.key!r}")
    model = _load_model(args)
    if command == "predict" and not hasattr(model, "predict"):
        raise CLIError(
            f"{args.bundle} holds a {model.manifest.model_class} model; predict needs a SCANVI "
            "bundle (export a scvi.model.SCANVI)"
        )
    with connect(args.scheduler) as client:
        adata = _with_obs(open_input(args, model), model, args.obs)
        plan = _plan(model, adata, args)
        n = plan.n
        store = None
        targets: list[tuple[str, str]] = []
        sums: tuple[str, ...] = ()
        if out is not None:
            store = Store(out, plan.obs.index, plan.write_rows())
        try:
            if command == "latent":
                L = model.n_latent
                names = ("qz_m", "qz_v") if args.return_dist else ("latent",)
                keys = (args.key, f"{args.key}_var")
                for name, key in zip(names, keys, strict=False):
                    targets.append((name, store.array(f"obsm/{key}", (n, L), np.float32)))
            elif command == "predict":
                labels = dm.label_names(model)
                targets.append(("codes", store.categorical(f"obs/{args.key}", n, labels)))
                if args.soft:
                    shape = (n, len(labels))
                    where = f"obsm/{args.key}_probabilities"
                    targets.append(("probs", store.array(where, shape, np.float32)))
            else:
                # one obs column per output: the metric, or each reconstruction term (TOTALVI:
                # genes and proteins, as the in-memory command's per-cell table)
                columns = _metric_columns(model, command)
                if command != "marginal-ll":
                    sums = tuple(columns)
                if store is not None:
                    for name, column in columns.items():
                        targets.append((name, store.array(f"obs/{column}", (n,), np.float64)))
            parts = _run(plan, store, targets, sums, _progress(args), client)
            if store is not None:
                store.commit(args.overwrite)
        except BaseException:
            if store is not None:
                store.discard()
            raise
    dm.warn_nonint(parts, dm._where(model))
    if command in _METRIC_NAMES:
        _report_metric(args, model, plan, parts, out, sums)
        what = f"{_METRIC_NAMES[command]} on Dask" + (f", per cell in {out}" if out else "")
    else:
        what = f"wrote {out}: {'the latent space' if command == 'latent' else 'predicted labels'}"
    _summary(args, what, plan.n, started)
    return 0


def _metric_columns(model, command: str) -> dict[str, str]:
    """``{chunk output: obs column}`` of a metric command: ``elbo``, ``marginal_ll``, or one
    column per reconstruction term, named by its key (``reconstruction_loss``; TOTALVI's
    ``reconst_loss_gene`` and ``reconst_loss_protein``)."""
    if command == "reconstruction-error":
        return {f"rec:{k}": k for k in model.module.reconstruction_keys}
    metric = _METRIC_NAMES[command]
    return {metric: metric}


def _with_obs(adata, model, assignments: list[tuple[str, str]]):
    """``--obs COLUMN=VALUE`` on a lazily read AnnData: the same AnnData with its obs (and var)
    in memory and the columns set (the matrix, layers and obsm entries stay lazy)."""
    if not assignments:
        return adata
    import anndata
    import pandas as pd

    from ..data.mudata import ModelInput, is_mudata
    from .commands import _set_obs

    if isinstance(adata, ModelInput):  # a SOMA experiment's RNA and proteins
        return ModelInput(_with_obs(adata.adata, model, assignments), adata.proteins)
    if is_mudata(adata):  # in memory: the MuData's own obs, as the in-memory command sets it
        _set_obs(model, adata, assignments)
        return adata

    def in_memory(frame, names):
        out = frame.to_memory() if hasattr(frame, "to_memory") else frame.copy()
        out.index = pd.Index(names)
        return out

    copy = anndata.AnnData(
        X=adata.X,
        obs=in_memory(adata.obs, adata.obs_names),
        var=in_memory(adata.var, adata.var_names),
        layers={k: adata.layers[k] for k in adata.layers.keys()},
        obsm={k: adata.obsm[k] for k in adata.obsm.keys()},  # TOTALVI's proteins
        uns=dict(adata.uns),
    )
    _set_obs(model, copy, assignments)
    return copy


def _plan(model, adata, args: argparse.Namespace):
    from ..distributed import methods as dm

    what = {
        "latent": "the latent space",
        "predict": "the predicted labels",
        "marginal-ll": "the marginal log-likelihood",
        "elbo": "the ELBO",
        "reconstruction-error": "the reconstruction error",
    }[args.command]
    read = dm._read(
        args.missing_genes,
        args.min_gene_overlap,
        args.layer,
        args.gene_key,
        dict(args.unseen_as) or None,
        what,
    )
    seed = model._seed(args.seed)
    if args.command == "latent":
        options = {
            "seed": seed,
            "give_mean": not args.sample,
            "mc_samples": args.mc_samples,
            "return_dist": args.return_dist,
        }
        return dm.plan(
            model, adata, None, args.batch_size, method="latent", options=options, read=read
        )
    if args.command == "predict":
        return dm.predict_plan(model, adata, None, args.batch_size, True, seed, read)
    if args.command == "marginal-ll":
        options = {"seed": seed, "n_mc_samples": args.n_mc_samples, "n_mc_samples_per_pass": None}
        return dm.plan(
            model, adata, None, args.batch_size, method="marginal_ll", options=options, read=read
        )
    return dm.plan(
        model, adata, None, args.batch_size, method="elbo", options={"seed": seed}, read=read
    )


def _run(plan, store, targets, sums, progress: bool, client) -> list[dict]:
    import dask

    from ..distributed.methods import _summary, compute_in_order

    results = plan.results()
    tasks = []
    for r, rows in zip(results, plan.bounds(), strict=True):
        if store is None:
            tasks.append(dask.delayed(_summary, pure=True)(r, sums, dask_key_name=f"sum-{r.key}"))
        else:
            tasks.append(
                dask.delayed(_write_chunk, pure=False)(
                    r, str(store.path), tuple(targets), rows, sums
                )
            )
    return compute_in_order(tasks, progress=progress, desc="chunks")


def _report_metric(args, model, plan, parts, out, sums) -> None:
    from ..distributed import methods as dm
    from .commands import _options

    metric = _METRIC_NAMES[args.command]
    # several reconstruction terms (TOTALVI): each one's mean, and their sum as the value, as
    # the in-memory command reports them
    values = None
    if args.command == "marginal-ll":
        value = dm.mll_mean(parts)
    else:
        columns = _metric_columns(model, args.command)
        means = {col: dm.mean_of(parts, name, plan.n) for name, col in columns.items()}
        if list(means) == [metric]:
            value = means[metric]
        else:
            values = means
            value = sum(means.values())
    if args.json:
        result = {
            "metric": metric,
            "value": float(value),
            **({"values": values} if values is not None else {}),
            "n_cells": plan.n,
            "bundle": str(args.bundle),
            "provider": model.provider,
            **_options(args),
            "scheduler": args.scheduler,
        }
        if args.command == "marginal-ll":
            result["n_mc_samples"] = args.n_mc_samples
        if out is not None:
            result["per_cell"] = str(out)
        if getattr(args, "notes", None):
            result["notes"] = list(args.notes)
        print_json(result)
    else:
        for key, v in (values or {}).items():
            print(f"{key}: {v:.4f}")
        print(f"{metric}: {value:.4f}")
    sys.stdout.flush()


__all__ = ["DASK_COMMANDS", "PROG", "add_scheduler_options", "cmd_dask"]
