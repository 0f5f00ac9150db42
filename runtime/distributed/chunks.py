"""What a worker runs for one row chunk: the in-memory loops on the chunk's cells.

A chunk arrives as its expression block (numpy or scipy CSR, as Dask computed it) or as the
read of the input blocks it spans (:class:`BlockRead`, run here), the registered obs columns
of its rows (:class:`ChunkObs`, rebuilt as a pandas DataFrame indexed by the cells' names), the
global key of its rows and, for a model with proteins (TOTALVI), its rows of the protein counts
(:mod:`~scvi_onnx.distributed.proteins`). It becomes a plain in-memory AnnData (the proteins in
its registered ``obsm`` entry; for a model set up with ``setup_mudata``, beside it, as the
in-memory run gathers a MuData's modalities) and goes through exactly the
code an in-memory call runs (:func:`scvi_onnx.methods.inputs.minibatches`, then the loop of
:mod:`scvi_onnx.methods`), with the rows keyed by their global position: the chunk gives its
cells' numbers in the whole run, bit for bit. Chunks start on a multiple of ``batch_size``
(the client aligns them), so its minibatches are the in-memory run's minibatches: the same
value checks on the same cells (the same error, naming the same cells), and the same groups
for ``get_marginal_ll``'s mean of per-minibatch means.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..data.mudata import ModelInput
from ..data.obs import ObsUse
from ..errors import NonIntegerCountsWarning
from .cache import ModelRef, cached_model
from .proteins import ProteinCarry

#: Methods a chunk runs, and whether their minibatches carry what the scoring methods need.
SCORING = {
    "latent": False,
    "predict": False,
    "depth": False,
    "elbo": True,
    "marginal_ll": True,
}

#: The non-integer counts of the data layer's warning (see data/checks.py), summed over
#: chunks by the client, which words the one warning of the run as in memory.
_NONINT = re.compile(r"holds (\d+) non-integer value\(s\) in (\d+) cells?\b")


@dataclass(frozen=True)
class ChunkJob:
    """Everything but the data that a chunk's task needs (one object per run, shared by
    every task of the run: Dask ships it to a worker once).

    Attributes
    ----------
    model
        The bundle to load (:class:`~scvi_onnx.distributed.cache.ModelRef`).
    method
        ``"latent"``, ``"predict"``, ``"depth"`` (PEAKVI's depth factors), ``"elbo"`` (the
        ELBO terms) or ``"marginal_ll"``.
    options
        The method's arguments, as ``(name, value)`` pairs (seed, give_mean, ...).
    var_names
        The input's gene names, in its column order.
    layer
        The registered layer (None: ``X``).
    batch_size
        As given to the method.
    read
        The data options, as ``(name, value)`` pairs: ``missing_genes``, ``min_gene_overlap``,
        ``gene_key``, ``unseen_as``, ``what`` (see :class:`~scvi_onnx.data.AnnDataSource`).
    n_total
        The whole input's number of cells (value errors say where in it the cells are).
    gene_names
        The input's gene names in ``read``'s ``gene_key`` column (None: ``var_names``).
    proteins
        For a model with proteins (TOTALVI): how a chunk's protein rows become its AnnData's
        ``obsm`` entry, or a modality's counts
        (:class:`~scvi_onnx.distributed.proteins.ProteinCarry`).
    """

    model: ModelRef
    method: str
    options: tuple[tuple[str, Any], ...]
    var_names: Any
    layer: str | None
    batch_size: int
    read: tuple[tuple[str, Any], ...]
    n_total: int
    gene_names: Any = None
    proteins: ProteinCarry | None = None

    def option(self, name: str) -> Any:
        return dict(self.options)[name]

    def read_option(self, name: str) -> Any:
        return dict(self.read)[name]


@dataclass(frozen=True, eq=False)
class ChunkObs:
    """A chunk's registered obs columns and cell names, as they travel in the task graph.

    As a DataFrame slice, every chunk would carry each categorical column's categories and one
    Python string per cell name: ~300 KB per 8,192-row chunk with 10,000 batch categories (a
    Census-shaped run: gigabytes of objects in the scheduler for 50M cells), 65 MB of names per
    million cells. Here a chunk carries the codes of its categorical columns (their dtypes,
    categories included, travel once per run: the ``schema``, an empty frame that is one shared
    task), the other columns as they are, and its names as one string with their end
    offsets. :meth:`frame` rebuilds, on the worker, a DataFrame equal to the client's slice."""

    columns: dict[str, Any]  # name -> codes (categorical) or the column's values
    text: str | None  # the names, concatenated (names that are all str)
    ends: np.ndarray | None  # where each name ends in ``text``
    index: pd.Index | None  # the names themselves, when some are not str

    @classmethod
    def of(cls, obs: pd.DataFrame) -> ChunkObs:
        columns: dict[str, Any] = {}
        for name in obs.columns:
            col = obs[name]
            if isinstance(col.dtype, pd.CategoricalDtype):
                columns[name] = col.cat.codes.to_numpy()
            else:
                columns[name] = col.array
        if obs.index.inferred_type == "string" and obs.index.dtype == object:
            names = obs.index.tolist()
            ends = np.cumsum(np.fromiter(map(len, names), dtype=np.int64, count=len(names)))
            if ends.size and ends[-1] < 1 << 31:
                ends = ends.astype(np.int32)
            return cls(columns, "".join(names), ends, None)
        return cls(columns, None, None, obs.index)

    def frame(self, schema: pd.DataFrame) -> pd.DataFrame:
        """The chunk's obs: ``schema`` gives the columns' dtypes (``obs.iloc[:0]``)."""
        if self.index is not None:
            index = self.index
        else:
            starts = np.concatenate([[0], self.ends[:-1]]).tolist()
            text = self.text
            index = pd.Index(
                [text[a:b] for a, b in zip(starts, self.ends.tolist(), strict=True)], dtype=object
            )
        data = {}
        for name, values in self.columns.items():
            dtype = schema[name].dtype
            if isinstance(dtype, pd.CategoricalDtype):
                data[name] = pd.Categorical.from_codes(values, dtype=dtype)
            else:
                data[name] = values
        return pd.DataFrame(data, index=index, columns=schema.columns)


@dataclass(frozen=True, eq=False)
class BlockRead:
    """A task's read of its rows, run by the task itself: the blocks it spans (nodes of
    Dask's graph that need no other task: :func:`~scvi_onnx.distributed.methods.root_nodes`)
    and its rows ``start:stop`` of their concatenation. Held in a plain object, so Dask ships
    it as it is, whatever its version does with graph nodes among a task's arguments."""

    nodes: tuple
    start: int
    stop: int

    def __call__(self) -> Any:
        import scipy.sparse as sp

        parts, pos = [], 0
        for node in self.nodes:
            block = node({})
            n = int(block.shape[0])
            lo, hi = max(self.start - pos, 0), min(self.stop - pos, n)
            parts.append(block if (lo, hi) == (0, n) else block[lo:hi])
            pos += n
        if len(parts) == 1:
            return parts[0]
        if sp.issparse(parts[0]):
            return sp.vstack(parts, format=parts[0].format)
        return np.concatenate([np.asarray(p) for p in parts])


def run_chunk(
    block: Any,
    obs: ChunkObs,
    obs_schema: pd.DataFrame,
    keys: Any,
    job: ChunkJob,
    proteins: Any = None,
) -> dict[str, np.ndarray]:
    """One chunk's outputs: a dict of per-cell arrays (and, for the marginal LL, the means of
    its minibatches), plus ``"nonint"``: the (values, cells) of non-integer counts seen.

    ``block`` is the chunk's expression block, or the :class:`BlockRead` that reads it.
    ``keys`` is the global key of the chunk's first row (an int) when its rows are
    consecutive in the input, else the key of every row (an ``indices=`` selection).
    ``proteins``: the chunk's rows of the protein counts (a model with proteins), which go
    into the chunk's AnnData as ``job.proteins`` says. ``obs`` is the chunk's rows of the
    registered obs columns (:class:`ChunkObs`), ``obs_schema`` their dtypes.
    """
    import anndata

    from ..methods import elbo as elbo_loop
    from ..methods import inputs
    from ..methods import latent as latent_loop
    from ..methods import marginal_ll as mll_loop

    if isinstance(block, BlockRead):
        block = block()
    obs = obs.frame(obs_schema)
    model = cached_model(job.model)
    module = model.module
    var = pd.DataFrame(index=job.var_names)
    gene_key = job.read_option("gene_key")
    if gene_key is not None:
        var[gene_key] = np.asarray(job.gene_names)
    obsm, uns, modality_proteins = {}, {}, None
    if job.proteins is not None and job.proteins.modality is not None:
        modality_proteins = job.proteins.modality_input(proteins)
    elif job.proteins is not None:
        obsm, uns = job.proteins.obsm_and_uns(proteins, obs.index)
    if job.layer is None:
        adata = anndata.AnnData(X=block, obs=obs, var=var, obsm=obsm, uns=uns)
    else:
        adata = anndata.AnnData(obs=obs, var=var, layers={job.layer: block}, obsm=obsm, uns=uns)
    data: Any = adata
    if modality_proteins is not None or model.manifest.registry.modalities is not None:
        # gathered on the client (a MuData's modalities, a SOMA experiment's measurements)
        data = ModelInput(adata, modality_proteins)
    scoring = SCORING[job.method]
    needs = module.needs if scoring else module.needs.for_latent()
    engine = model.engine
    first_key = int(keys) if np.ndim(keys) == 0 else 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NonIntegerCountsWarning)
        mbs: Iterator = inputs.minibatches(
            model.manifest,
            data,
            None,
            job.batch_size,
            None,
            needs=needs,
            prefetch=engine.prefetch if scoring else engine.latent_prefetch,
            missing_genes=job.read_option("missing_genes"),
            min_gene_overlap=job.read_option("min_gene_overlap"),
            missing_labels_code=getattr(module, "missing_labels_code", None),
            first_key=first_key,
            n_total=job.n_total,
            use=ObsUse(
                used=module.obs_use(scoring),
                unseen_as=dict(job.read_option("unseen_as") or {}),
                what=job.read_option("what"),
            ),
            layer=job.layer,
            gene_key=gene_key,
        )
        if np.ndim(keys) == 1:
            # an indices= selection: the chunk's rows are keyed by their rows in the input
            # (the checks have named the cells by then; names are not read again)
            keyed = np.asarray(keys, dtype=np.int64)
            mbs = (dataclasses.replace(mb, cells=keyed[mb.cells], obs_names=None) for mb in mbs)
        out = _compute(job, module, engine, mbs, elbo_loop, latent_loop, mll_loop)
    nonint = [0, 0]
    for w in caught:
        if issubclass(w.category, NonIntegerCountsWarning):
            m = _NONINT.search(str(w.message))
            if m:
                nonint[0] += int(m.group(1))
                nonint[1] += int(m.group(2))
        else:  # anything else is the worker's to show, as it would be in memory
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    out["nonint"] = np.array(nonint, dtype=np.int64)
    return out


def _compute(job, module, engine, mbs, elbo_loop, latent_loop, mll_loop) -> dict[str, np.ndarray]:
    if job.method == "depth":  # no draws: no seed
        tasks = engine.tasks(mbs, module.n_features, module.latent_call_rows)
        return {"depth": np.concatenate(list(engine.pmap(module.depth, tasks))).reshape(-1)}
    seed = job.option("seed")
    if job.method == "latent":
        res = latent_loop.latent(
            module,
            engine,
            mbs,
            give_mean=job.option("give_mean"),
            mc_samples=job.option("mc_samples"),
            return_dist=job.option("return_dist"),
            seed=seed,
        )
        if job.option("return_dist"):
            return {"qz_m": res[0], "qz_v": res[1]}
        return {"latent": res}
    if job.method == "predict":
        probs = latent_loop.class_probabilities(
            module, engine, mbs, use_posterior_mean=job.option("use_posterior_mean"), seed=seed
        )
        return {"probs": probs, "codes": probs.argmax(axis=1).astype(np.int64)}
    if job.method == "elbo":
        terms = elbo_loop.elbo_terms(module, engine, mbs, seed)
        out = {f"rec:{k}": v for k, v in terms.reconstruction.items()}
        out["elbo"] = terms.elbo()
        return out
    if job.method == "marginal_ll":
        per_minibatch = list(
            mll_loop.marginal_ll(
                module,
                engine,
                mbs,
                job.option("n_mc_samples"),
                job.option("n_mc_samples_per_pass"),
                seed,
            )
        )
        return {
            "marginal_ll": np.concatenate(per_minibatch),
            "minibatch_means": np.array([ll.mean() for ll in per_minibatch], dtype=np.float64),
        }
    raise ValueError(f"unknown chunk method {job.method!r}")  # pragma: no cover
