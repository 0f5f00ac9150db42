"""The public methods on a Dask-backed AnnData (the client's side).

Each method checks its arguments and the input exactly as in memory (the same checks, in the
same order, so the same typed errors), then builds one Dask task per row chunk
(:func:`~scvi_onnx.distributed.chunks.run_chunk`) and returns:

* per-cell results as lazy Dask arrays, one row chunk per input row chunk, with their dtype
  and ``meta`` (nothing runs until they are computed);
* with ``return_mean=True``, a float computed on the cluster: each chunk's task reduces its
  cells, and the client adds the chunks' partial results (one number per chunk or minibatch).

Tasks are cut on the minibatch grid: a task's rows start on a multiple of ``batch_size``
(the input's chunk boundaries moved to the nearest multiple; chunks smaller than
``MIN_CHUNK_ROWS``, Dask config ``scvi-onnx.min-chunk-rows``, grouped), so every minibatch of
the in-memory run lies in one task: the same values are checked together, the same error names
the same cells, and ``get_marginal_ll``'s mean of per-minibatch means has the same
minibatches. A task reads the input blocks it spans itself where each is one task with no input
(a file read); otherwise the input is rechunked to the tasks' rows. Outputs are given the
input's row chunks back.

A model with proteins (TOTALVI) reads them from the registered ``obsm`` entry (``setup_anndata``)
or from a MuData modality (``setup_mudata``: the MuData's modalities are gathered on the client
as in memory, the RNA matrix a Dask array), in memory or as a Dask array: the client checks
them as in memory, and each chunk's task gets its rows
(:mod:`~scvi_onnx.distributed.proteins`). A MuData for a model set up with ``setup_anndata``
is refused with what to pass instead.

The means: ``get_elbo`` / ``get_reconstruction_error`` sum each chunk's cells in float64 on
its worker (numpy's pairwise sum), add the chunk sums with ``math.fsum`` (correctly rounded)
and divide by the number of cells: equal to the in-memory ``mean`` to float64 rounding (a few
ulps; the in-memory run sums all cells pairwise). ``get_marginal_ll`` computes each
minibatch's mean on the worker (bit-identical to in memory), gathers those (one float per
minibatch) and takes their numpy mean: bit-identical to the in-memory value.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..arguments import check_positive_int
from ..data import AnnDataSource, resolve_indices
from ..data.mudata import ModelInput
from ..errors import InputDataError, InvalidArgumentError
from ..methods.engine import DEFAULT_BATCH_SIZE
from . import _registered_matrix, is_dask_array
from .cache import ModelRef, manifest_digest
from .chunks import SCORING, BlockRead, ChunkJob, ChunkObs, run_chunk
from .proteins import Proteins, modality_proteins, obsm_placeholders, protein_input

logger = logging.getLogger(__name__)

DASK_HINT = "pip install 'scvi-onnx[dask]'"


def _import_dask():
    try:
        import dask
        import dask.array as da
    except ImportError as e:  # pragma: no cover - the dask extra is installed with tests
        raise InvalidArgumentError(
            f"a Dask-backed AnnData needs dask (and distributed for a cluster): {DASK_HINT}"
        ) from e
    return dask, da


# =============================================================================================
# the plan of a run: aligned chunks, their obs and keys, the job
# =============================================================================================
@dataclass
class Plan:
    """One run's chunks: the aligned matrix, each chunk's obs rows and keys, and the job."""

    matrix: Any  # dask array (the input's rows; rechunked to ``chunks`` without ``reads``)
    obs: pd.DataFrame  # the registered obs columns of the selected cells (in memory)
    keys: np.ndarray  # global key of every selected cell
    out_chunks: tuple[int, ...]  # row chunks of the outputs (the input's)
    job: ChunkJob
    chunks: tuple[int, ...]  # row chunks of the tasks (on the minibatch grid)
    proteins: Proteins | None = None  # TOTALVI's protein rows, in the tasks' row chunks
    reads: list[BlockRead] | None = None  # each task's own read of its rows, where it has one

    @property
    def n(self) -> int:
        return int(self.keys.size)

    def bounds(self) -> list[tuple[int, int]]:
        edges = _edges(self.chunks).tolist()
        return list(zip(edges[:-1], edges[1:], strict=True))

    def write_rows(self) -> int:
        """Rows per chunk of an output store that no two tasks share (the largest that
        divides every task boundary)."""
        inner = np.cumsum(self.chunks)[:-1]
        return int(np.gcd.reduce(inner)) if inner.size else max(1, self.n)

    def results(self) -> list:
        """One delayed ``run_chunk`` per chunk (each computed once, however many outputs)."""
        dask, _ = _import_dask()
        from dask.base import tokenize

        blocks = self.reads if self.reads is not None else self.matrix.to_delayed().ravel()
        bounds = self.bounds()
        job = dask.delayed(self.job, pure=True)
        # the obs columns' dtypes (categories included) travel once, as one shared task; each
        # chunk carries its codes, values and names compactly (ChunkObs)
        schema = dask.delayed(self.obs.iloc[:0], pure=True)
        prot = [None] * len(bounds) if self.proteins is None else self.proteins.parts(bounds)
        # the tasks' names tell apart runs on other cells, obs or proteins (a task of the same
        # name would be taken for a result already computed)
        token = tokenize(
            self.matrix.name,
            self.job,
            self.keys,
            self.obs,
            None if self.proteins is None else self.proteins.token(),
        )
        out = []
        for j, (a, b) in enumerate(bounds):
            keys = self.keys[a:b]
            contiguous = keys[-1] - keys[0] + 1 == keys.size and bool(np.all(np.diff(keys) == 1))
            out.append(
                dask.delayed(run_chunk, pure=True)(
                    blocks[j],
                    ChunkObs.of(self.obs.iloc[a:b]),
                    schema,
                    int(keys[0]) if contiguous else keys,
                    job,
                    prot[j],
                    dask_key_name=f"scvi-onnx-{self.job.method}-{token}-{j}",
                )
            )
        return out

    def array(self, results: list, name: str, tail: tuple[int, ...], dtype: Any):
        """The per-cell output ``name`` of every chunk, as one lazy Dask array with the
        input's row chunks."""
        dask, da = _import_dask()
        from operator import getitem

        dtype = np.dtype(dtype)
        parts = [
            da.from_delayed(
                dask.delayed(getitem, pure=True)(r, name),
                shape=(b - a, *tail),
                dtype=dtype,
                meta=np.empty((0,) * (1 + len(tail)), dtype=dtype),
            )
            for r, (a, b) in zip(results, self.bounds(), strict=True)
        ]
        arr = da.concatenate(parts, axis=0)
        if arr.chunks[0] != self.out_chunks:
            arr = arr.rechunk({0: self.out_chunks})
        return arr


def _edges(chunks: tuple[int, ...]) -> np.ndarray:
    """Where row chunks start, and the end: ``(0, c0, c0 + c1, ..., n)``."""
    return np.concatenate([[0], np.cumsum(chunks)]).astype(np.int64)


def root_nodes(matrix) -> list | None:
    """Each row block's graph node, when every block of the (optimized) matrix is computed by
    one task that needs no other (a root: a file read such as ``read_elem_lazy``'s or
    ``read_soma``'s, or a literal chunk); else None (blocks that gather other tasks' outputs:
    a ``rechunk``, an ``indices=`` selection; or a Dask before task-spec graphs)."""
    try:
        from dask._task_spec import Alias, GraphNode, convert_legacy_graph
        from dask.core import flatten
    except ImportError:  # pragma: no cover - dask before 2024.12
        return None
    keys = list(flatten(matrix.__dask_keys__()))
    graph = convert_legacy_graph(dict(matrix.__dask_optimize__(matrix.__dask_graph__(), keys)))
    nodes = []
    for key in keys:
        node = graph.get(key)
        while isinstance(node, Alias) and node.target != node.key:
            node = graph.get(node.target)
        if not isinstance(node, GraphNode) or isinstance(node, Alias) or node.dependencies:
            return None
        nodes.append(node)
    return nodes


#: Most rows the tasks may read, over the input's rows, when each reads the blocks it spans (a
#: block cut by a task boundary is read by both tasks); beyond it the input is rechunked.
MAX_SPAN_READS = 1.5


def _spans(
    nodes: list, in_chunks: tuple[int, ...], chunks: tuple[int, ...]
) -> list[BlockRead] | None:
    """Each task's read of its rows: the blocks it spans, and where its rows are in them; None
    when the tasks would read more than ``MAX_SPAN_READS`` times the rows (input chunks cut
    into slivers: large chunks off the minibatch grid), which a rechunk reads once."""
    in_edges, edges = _edges(in_chunks), _edges(chunks)
    reads, rows_read = [], 0
    for a, b in zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True):
        j0 = int(np.searchsorted(in_edges, a, side="right")) - 1
        j1 = int(np.searchsorted(in_edges, b, side="left")) - 1
        first = int(in_edges[j0])
        rows_read += int(in_edges[j1 + 1]) - first
        reads.append(BlockRead(tuple(nodes[j0 : j1 + 1]), a - first, b - first))
    if rows_read > MAX_SPAN_READS * int(edges[-1]):
        return None
    return reads


def _model_ref(model) -> ModelRef:
    from ..sessions import CUDA

    opts = getattr(model, "load_options", {})
    device = opts.get("device", "auto")
    if device == "auto":
        # the client's provider, so that every worker computes what the client would
        device = "cuda" if model.provider == CUDA else "cpu"
    return ModelRef(
        path=str(Path(model.path).resolve()),
        digest=manifest_digest(model.path),
        device=device,
        intra_op_threads=opts.get("intra_op_threads"),
        scoring=opts.get("scoring", "auto"),
        input_layer=opts.get("input_layer", "auto"),
    )


def _obs_frame(adata: Any, model, use) -> pd.DataFrame:
    """The registered obs columns, in memory, indexed by the cell names (a lazily read obs,
    ``anndata``'s ``Dataset2D``, loads those columns only). A registered column that is
    absent where ``use`` reads it raises the in-memory error."""
    from ..data.obs import read_obs

    obs = adata.obs
    reg = model.manifest.registry
    present = [str(c) for c in obs.columns]
    keys = [k for k, _ in reg.obs_columns() if k in present]
    if len(keys) < len(reg.obs_columns()):
        # the same MissingColumnError as in memory (it names the columns present)
        read_obs(
            pd.DataFrame(columns=present),
            reg,
            use,
            missing_labels_code=getattr(model.module, "missing_labels_code", None),
        )
    keys = list(dict.fromkeys(keys))
    if isinstance(obs, pd.DataFrame):
        frame = obs[keys]
    else:
        frame = obs[keys].to_memory() if keys else pd.DataFrame(index=adata.obs_names)
    frame = frame.copy()
    frame.index = pd.Index(adata.obs_names)
    return frame


def _var_frame(adata: Any, gene_key: str | None) -> pd.DataFrame:
    """The genes' table the checks need: the names, and the ``gene_key`` column if given (a
    lazily read var loads that column only; an absent one raises the in-memory error)."""
    var = pd.DataFrame(index=pd.Index(adata.var_names))
    if gene_key is not None and gene_key in adata.var.columns:
        col = adata.var[gene_key]
        values = col.to_memory() if hasattr(col, "to_memory") else col
        var[gene_key] = np.asarray(values)
    return var


#: The fewest rows a task reads by default: smaller input chunks are grouped (a chunk's
#: fixed cost, scheduling, reading and setting up its minibatches, is ~20-30 ms, and anndata's
#: ``read_lazy`` reads h5ad in blocks of 1,000 rows: 4x slower than 8,192 on 2 workers).
#: Dask config ``scvi-onnx.min-chunk-rows`` sets it (1: the input's chunks, aligned).
MIN_CHUNK_ROWS = 8192


def _min_chunk_rows() -> int:
    import dask

    value = dask.config.get("scvi-onnx.min-chunk-rows", MIN_CHUNK_ROWS)
    try:
        return check_positive_int("dask config scvi-onnx.min-chunk-rows", int(value))
    except (TypeError, ValueError):
        raise InvalidArgumentError(
            f"dask config scvi-onnx.min-chunk-rows must be a positive integer, got {value!r}"
        ) from None


def _task_chunks(chunks: tuple[int, ...], bs: int, min_rows: int) -> tuple[int, ...]:
    """The tasks' row chunks: every boundary on a multiple of ``bs`` (so each minibatch of the
    in-memory run lies in one task), at the input's boundaries moved to the nearest multiple,
    skipping those that would leave a task of fewer than ``min_rows`` rows (the last task may
    have fewer). Aligned input chunks of at least ``min_rows`` rows are kept as they are."""
    n = int(sum(chunks))
    edges = [0]
    for e in np.cumsum(chunks)[:-1].tolist():
        m = int(np.rint(e / bs)) * bs
        if m - edges[-1] >= min_rows and m < n:
            edges.append(m)
    edges.append(n)
    return tuple(int(x) for x in np.diff(edges))


def plan(
    model,
    adata: Any,
    indices: Sequence[int] | None,
    batch_size: int | None,
    *,
    method: str,
    options: dict[str, Any],
    read: dict[str, Any],
) -> Plan:
    """Check the input as in memory (the same errors, in the same order) and chunk it.

    ``read``: the data options (``missing_genes``, ``min_gene_overlap``, ``layer``,
    ``gene_key``, ``unseen_as``) and ``what`` the method computes (for messages)."""
    import anndata

    from ..data.obs import ObsUse

    _import_dask()
    adata, gathered = _gather(model, adata)
    batch_size = check_positive_int("batch_size", batch_size, allow_none=True)
    bs = batch_size or DEFAULT_BATCH_SIZE
    layer = read.get("layer") or model.manifest.registry.layer
    gene_key = read.get("gene_key")
    use = ObsUse(
        used=model.module.obs_use(SCORING[method]),
        unseen_as=dict(read.get("unseen_as") or {}),
        what=read["what"],
    )
    source_options = {
        "missing_genes": read["missing_genes"],
        "min_gene_overlap": read["min_gene_overlap"],
        "missing_labels_code": getattr(model.module, "missing_labels_code", None),
        "use": use,
        "layer": read.get("layer"),
        "gene_key": gene_key,
    }
    matrix = _registered_matrix(adata, layer)
    if not is_dask_array(matrix):
        # no such layer, no X, or not a Dask array: the in-memory checks say what is wrong
        given = None if gathered is None else gathered.proteins
        AnnDataSource(adata, model.manifest, **source_options, proteins=given)
        raise InvalidArgumentError(
            f"the registered matrix is a {type(matrix).__name__}, not a Dask array: call the "
            "model's method for in-memory or backed data"
        )
    obs = _obs_frame(adata, model, use)
    var = _var_frame(adata, gene_key)
    field = model.manifest.registry.proteins
    if gathered is not None:  # gathered beside the AnnData (a MuData's, a SOMA experiment's)
        proteins = None if gathered.proteins is None else modality_proteins(gathered.proteins)
    else:
        proteins = None if field is None else protein_input(adata, field)
    # the in-memory checks (genes, layer, dtype, shape, obs columns and categories, then the
    # proteins) on a view holding the Dask matrix: nothing is read
    layers = {} if layer is None else {layer: matrix}
    missing = field is not None and proteins is None and gathered is None
    obsm = obsm_placeholders(adata) if missing else None
    view = anndata.AnnData(
        X=matrix if layer is None else None, obs=obs, var=var, layers=layers, obsm=obsm
    )
    AnnDataSource(
        view,
        model.manifest,
        **source_options,
        proteins=None if proteins is None else proteins.inp,
    )
    n_obs = int(matrix.shape[0])
    idx = resolve_indices(indices, n_obs)
    if idx.size != n_obs or np.any(idx != np.arange(n_obs)):
        matrix = matrix[idx]
        obs = obs.iloc[idx]
        if proteins is not None:
            proteins.select(idx)
    out_chunks = tuple(int(c) for c in matrix.chunks[0])
    chunks = _task_chunks(out_chunks, bs, _min_chunk_rows())
    # a task reads the blocks it spans itself where each block is one task with no input;
    # otherwise the matrix is rechunked to the tasks' rows
    nodes = root_nodes(matrix) if len(matrix.chunks[1]) == 1 else None
    reads = None if nodes is None else _spans(nodes, out_chunks, chunks)
    if reads is None and (chunks != out_chunks or len(matrix.chunks[1]) != 1):
        matrix = matrix.rechunk({0: chunks, 1: -1})
    if proteins is not None:
        proteins.align(chunks)
    job = ChunkJob(
        model=_model_ref(model),
        method=method,
        options=tuple(sorted(options.items())),
        var_names=var.index,
        layer=layer,
        batch_size=bs,
        read=tuple(
            sorted(
                {
                    "missing_genes": read["missing_genes"],
                    "min_gene_overlap": float(read["min_gene_overlap"]),
                    "gene_key": gene_key,
                    "unseen_as": tuple(sorted((read.get("unseen_as") or {}).items())) or None,
                    "what": read["what"],
                }.items()
            )
        ),
        n_total=int(matrix.shape[0]),
        gene_names=None if gene_key is None else np.asarray(var[gene_key]),
        proteins=None if proteins is None else proteins.carry,
    )
    return Plan(
        matrix=matrix,
        obs=obs,
        keys=idx,
        out_chunks=out_chunks,
        job=job,
        chunks=chunks,
        proteins=proteins,
        reads=reads,
    )


def _gather(model, data: Any) -> tuple[Any, Any]:
    """The AnnData the Dask path reads, and what it reads gathered (a
    :class:`~scvi_onnx.data.mudata.ModelInput`: given as one, or, for a model set up with
    ``setup_mudata``, from the MuData's modalities; else ``None``): the in-memory gathering,
    checks and errors (a missing modality, layer or
    column, modalities of other cells, an AnnData given instead), reading nothing of the
    Dask arrays. A MuData for a model set up with ``setup_anndata`` is refused with what to
    pass instead."""
    from ..data.mudata import is_mudata, split_input

    reg = model.manifest.registry
    if isinstance(data, ModelInput):  # gathered by the caller (e.g. a SOMA experiment's two)
        return data.adata, data
    if reg.modalities is not None:
        gathered = split_input(data, reg)
        return gathered.adata, gathered
    if is_mudata(data):
        if reg.proteins is not None:
            hint = (
                "an AnnData whose matrix is a Dask array, with the protein counts in "
                f"obsm[{reg.proteins.attr_key!r}] (a DataFrame with the proteins' names as "
                "columns, or a numpy or Dask array in the model's protein order), e.g. the RNA "
                "modality with the protein modality's counts copied into its obsm"
            )
        else:
            hint = "an AnnData whose matrix is a Dask array (e.g. the RNA modality)"
        raise InputDataError(
            "this model was set up with setup_anndata (one AnnData), not setup_mudata: on "
            f"Dask, pass {hint}"
        )
    return data, None


# =============================================================================================
# running chunk summaries (return_mean, the CLI's writes)
# =============================================================================================
def active_client():
    """The active ``distributed.Client``, or None (then Dask's default scheduler runs)."""
    if "distributed" not in sys.modules:
        return None  # nothing imported distributed: no client can be active
    from distributed import default_client

    try:
        return default_client()
    except ValueError:
        return None


def compute_in_order(tasks: list, *, progress: bool, desc: str = "chunks") -> list:
    """Compute delayed tasks (one per chunk) on the active scheduler, results in task order.

    With a ``distributed.Client``, a progress bar advances as chunks finish; the first failure
    cancels the rest and is raised as the worker raised it (its type and message).
    """
    dask, _ = _import_dask()
    client = active_client()
    if client is None:
        ctx = contextlib.nullcontext()
        if progress:
            from dask.diagnostics import ProgressBar

            ctx = ProgressBar()
        with ctx:
            return list(dask.compute(*tasks))
    from distributed import as_completed

    futures = client.compute(tasks)
    try:
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(futures), unit="chunk", desc=desc, leave=False)
        for fut in as_completed(futures):
            if fut.status == "error":
                fut.result()  # raises the worker's exception
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return client.gather(futures)
    except BaseException:
        client.cancel([f for f in futures if not f.done()])
        # a task already running on a worker thread runs on after its cancellation: wait for
        # it, so that nothing of the failed run (a chunk written into an output being
        # discarded) happens after the error reaches the caller
        _wait_not_executing(client, {str(f.key) for f in futures})
        raise
    finally:
        client.cancel([f for f in futures if not f.done()])


def _executing_keys(dask_worker) -> list[str]:
    """On a worker: the keys of the tasks its threads are running (cancelled ones too)."""
    return [str(ts.key) for ts in dask_worker.state.executing]


def _wait_not_executing(client, keys: set[str], timeout: float = 60.0) -> None:
    """Until no worker runs one of ``keys`` (at most ``timeout`` seconds; best effort)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            running = client.run(_executing_keys)
        except Exception:  # a worker gone or the cluster closing: nothing more to wait for
            return
        if not any(k in keys for ks in running.values() for k in ks):
            return
        time.sleep(0.02)


def _summary(res: dict[str, np.ndarray], sums: tuple[str, ...]) -> dict[str, Any]:
    """What a chunk's task sends back for a mean: float64 sums of the per-cell outputs in
    ``sums``, the marginal LL's per-minibatch means, the non-integer counts."""
    out: dict[str, Any] = {"nonint": res["nonint"]}
    for k in sums:
        out[k] = float(np.asarray(res[k], dtype=np.float64).sum())
    if "minibatch_means" in res:
        out["minibatch_means"] = res["minibatch_means"]
    return out


def summaries(plan_: Plan, results: list, sums: tuple[str, ...], progress: bool) -> list[dict]:
    dask, _ = _import_dask()
    tasks = [
        dask.delayed(_summary, pure=True)(r, sums, dask_key_name=f"summary-{r.key}")
        for r in results
    ]
    return compute_in_order(tasks, progress=progress)


def warn_nonint(parts: list[dict], where: str) -> None:
    """The one non-integer-counts warning of the run, worded as in memory (totals)."""
    from ..data.checks import ValueChecker

    total = np.sum([p["nonint"] for p in parts], axis=0)
    checker = ValueChecker(require_positive_library=False, count_data=True, source=where)
    checker.record((int(total[0]), int(total[1])))
    checker.finish()


def mean_of(parts: list[dict], key: str, n: int) -> float:
    return math.fsum(p[key] for p in parts) / n


def mll_mean(parts: list[dict]) -> float:
    """scvi-tools' mean of per-minibatch means, from the minibatches' means in order."""
    return float(np.mean(np.concatenate([p["minibatch_means"] for p in parts])))


def _where(model) -> str:
    layer = model.manifest.registry.layer
    return "adata.X" if layer is None else f"adata.layers[{layer!r}]"


# =============================================================================================
# the public methods (called by scvi_onnx.distributed.dask_dispatch with the same arguments)
# =============================================================================================
def get_latent_representation(
    model,
    adata=None,
    indices=None,
    give_mean=True,
    mc_samples=5_000,
    batch_size=None,
    return_dist=False,
    dataloader=None,
    *,
    seed=None,
    missing_genes="error",
    min_gene_overlap=0.8,
    layer=None,
    gene_key=None,
    unseen_as=None,
    progress_bar=False,
):
    """Lazy ``(n_cells, n_latent)`` float32 Dask array(s); see the in-memory method."""
    seed = model._seed(seed)
    if give_mean and model.module.ln and not return_dist:
        check_positive_int("mc_samples", mc_samples)
    p = plan(
        model,
        adata,
        indices,
        batch_size,
        method="latent",
        options={
            "seed": seed,
            "give_mean": bool(give_mean),
            "mc_samples": int(mc_samples),
            "return_dist": bool(return_dist),
        },
        read=_read(missing_genes, min_gene_overlap, layer, gene_key, unseen_as, "the latent space"),
    )
    results = p.results()
    L = (model.n_latent,)
    if return_dist:
        return (
            p.array(results, "qz_m", L, np.float32),
            p.array(results, "qz_v", L, np.float32),
        )
    return p.array(results, "latent", L, np.float32)


def _no_loader_kwargs(data_loader_kwargs):
    from ..api.base import _no_loader_kwargs as check

    check(data_loader_kwargs)


def _read(missing_genes, min_gene_overlap, layer, gene_key, unseen_as, what) -> dict:
    """The data options of a call, as :func:`plan` reads them."""
    return {
        "missing_genes": missing_genes,
        "min_gene_overlap": min_gene_overlap,
        "layer": layer,
        "gene_key": gene_key,
        "unseen_as": unseen_as,
        "what": what,
    }


def _elbo_plan(model, adata, indices, batch_size, seed, read):
    return plan(
        model,
        adata,
        indices,
        batch_size,
        method="elbo",
        options={"seed": model._seed(seed)},
        read=read,
    )


def get_elbo(
    model,
    adata=None,
    indices=None,
    batch_size=None,
    dataloader=None,
    return_mean=True,
    data_loader_kwargs=None,
    *,
    seed=None,
    missing_genes="error",
    min_gene_overlap=0.8,
    layer=None,
    gene_key=None,
    unseen_as=None,
    progress_bar=False,
):
    """The mean ELBO (float, computed on the cluster) or a lazy ``(n_cells,)`` float64 array."""
    _no_loader_kwargs(data_loader_kwargs)
    read = _read(missing_genes, min_gene_overlap, layer, gene_key, unseen_as, "the ELBO")
    p = _elbo_plan(model, adata, indices, batch_size, seed, read)
    results = p.results()
    if not return_mean:
        return p.array(results, "elbo", (), np.float64)
    parts = summaries(p, results, ("elbo",), progress_bar)
    warn_nonint(parts, _where(model))
    return mean_of(parts, "elbo", p.n)


def get_reconstruction_error(
    model,
    adata=None,
    indices=None,
    batch_size=None,
    dataloader=None,
    return_mean=True,
    data_loader_kwargs=None,
    *,
    seed=None,
    missing_genes="error",
    min_gene_overlap=0.8,
    layer=None,
    gene_key=None,
    unseen_as=None,
    progress_bar=False,
):
    """``{key: float}`` (computed on the cluster) or ``{key: lazy (n_cells,) array}``."""
    _no_loader_kwargs(data_loader_kwargs)
    what = "the reconstruction error"
    read = _read(missing_genes, min_gene_overlap, layer, gene_key, unseen_as, what)
    p = _elbo_plan(model, adata, indices, batch_size, seed, read)
    results = p.results()
    keys = model.module.reconstruction_keys
    if not return_mean:
        return {k: p.array(results, f"rec:{k}", (), np.float64) for k in keys}
    parts = summaries(p, results, tuple(f"rec:{k}" for k in keys), progress_bar)
    warn_nonint(parts, _where(model))
    return {k: mean_of(parts, f"rec:{k}", p.n) for k in keys}


def get_marginal_ll(
    model,
    adata=None,
    indices=None,
    n_mc_samples=1_000,
    batch_size=None,
    return_mean=True,
    dataloader=None,
    data_loader_kwargs=None,
    *,
    n_mc_samples_per_pass=None,
    seed=None,
    missing_genes="error",
    min_gene_overlap=0.8,
    layer=None,
    gene_key=None,
    unseen_as=None,
    progress_bar=False,
):
    """scvi-tools' mean of per-minibatch means (float) or a lazy ``(n_cells,)`` array."""
    _no_loader_kwargs(data_loader_kwargs)
    seed = model._seed(seed)
    n_mc_samples = check_positive_int("n_mc_samples", n_mc_samples)
    per_pass = check_positive_int("n_mc_samples_per_pass", n_mc_samples_per_pass, allow_none=True)
    p = plan(
        model,
        adata,
        indices,
        batch_size,
        method="marginal_ll",
        options={"seed": seed, "n_mc_samples": n_mc_samples, "n_mc_samples_per_pass": per_pass},
        read=_read(
            missing_genes,
            min_gene_overlap,
            layer,
            gene_key,
            unseen_as,
            "the marginal log-likelihood",
        ),
    )
    results = p.results()
    if not return_mean:
        return p.array(results, "marginal_ll", (), np.float64)
    parts = summaries(p, results, (), progress_bar)
    warn_nonint(parts, _where(model))
    return mll_mean(parts)


def predict(
    model,
    adata=None,
    indices=None,
    soft=False,
    batch_size=None,
    use_posterior_mean=True,
    dataloader=None,
    *,
    seed=None,
    missing_genes="error",
    min_gene_overlap=0.8,
    layer=None,
    gene_key=None,
    unseen_as=None,
    progress_bar=False,
):
    """SCANVI's labels as a lazy ``(n_cells,)`` array of label names, or with ``soft`` a lazy
    ``(n_cells, n_labels)`` float32 array of probabilities (columns in ``model.labels``
    order; the in-memory method returns a DataFrame)."""
    read = _read(
        missing_genes, min_gene_overlap, layer, gene_key, unseen_as, "the predicted labels"
    )
    p = predict_plan(model, adata, indices, batch_size, use_posterior_mean, seed, read)
    results = p.results()
    if soft:
        return p.array(results, "probs", (model.n_labels,), np.float32)
    codes = p.array(results, "codes", (), np.int64)
    names = label_names(model)
    return codes.map_blocks(_label_of, names, dtype=names.dtype, meta=np.empty(0, names.dtype))


def predict_plan(model, adata, indices, batch_size, use_posterior_mean, seed, read) -> Plan:
    return plan(
        model,
        adata,
        indices,
        batch_size,
        method="predict",
        options={"seed": model._seed(seed), "use_posterior_mean": bool(use_posterior_mean)},
        read=read,
    )


def get_library_size_factors(
    model,
    adata=None,
    indices=None,
    batch_size=None,
    dataloader=None,
    *,
    missing_genes="error",
    min_gene_overlap=0.8,
    layer=None,
    gene_key=None,
    unseen_as=None,
    progress_bar=False,
):
    """PEAKVI's depth factors as a lazy ``(n_cells,)`` float32 array; see the in-memory
    method."""
    model._require_depth()
    p = plan(
        model,
        adata,
        indices,
        batch_size,
        method="depth",
        options={},  # the depth encoder draws nothing
        read=_read(
            missing_genes, min_gene_overlap, layer, gene_key, unseen_as, "the depth factors"
        ),
    )
    return p.array(p.results(), "depth", (), np.float32)


def label_names(model) -> np.ndarray:
    """The labels as the in-memory ``predict`` types them (``np.array`` of the names)."""
    return np.array(list(model.module.labels))


def _label_of(codes: np.ndarray, names: np.ndarray) -> np.ndarray:
    return names[codes]


__all__ = [
    "get_elbo",
    "get_latent_representation",
    "get_library_size_factors",
    "get_marginal_ll",
    "get_reconstruction_error",
    "predict",
]
