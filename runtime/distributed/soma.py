"""A TileDB-SOMA experiment (the CELLxGENE Census's storage) as a Dask-backed AnnData.

:func:`read_soma` reads the experiment's obs (the columns asked for) and var names on the
client, and makes its X layer a Dask array of scipy CSR row chunks: each chunk's task opens
the experiment where it runs and reads its cells' rows with ``tiledbsoma``. The result runs
through the methods like any Dask-backed AnnData. A TOTALVI's protein counts live in another
measurement of the experiment (CITE-seq's antibody counts, e.g. ``"ADT"``):
:func:`read_soma_proteins` reads them the same way, and
``ModelInput(read_soma(...), read_soma_proteins(...))`` is the methods' input. Needs the
``soma`` extra (``tiledbsoma``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import InputDataError, InvalidArgumentError

SOMA_HINT = "pip install 'scvi-onnx[soma]'"
#: Rows per chunk by default: a multiple of the default minibatch (128 cells).
DEFAULT_CHUNK_ROWS = 8192


def _tiledbsoma():
    try:
        import tiledbsoma
    except ImportError as e:
        raise InvalidArgumentError(
            f"reading a SOMA experiment needs tiledbsoma: {SOMA_HINT}"
        ) from e
    return tiledbsoma


def is_soma_experiment(uri: str) -> bool:
    """True when ``uri`` opens as a SOMA experiment (False without tiledbsoma)."""
    try:
        import tiledbsoma
    except ImportError:
        return False
    try:
        return bool(tiledbsoma.Experiment.exists(str(uri)))
    except Exception:  # anything that does not open is not an experiment
        return False


def read_soma(
    uri: str,
    *,
    measurement: str = "RNA",
    layer: str = "data",
    obs_columns: Sequence[str] | None = None,
    obs_names: str = "obs_id",
    var_names: str = "var_id",
    chunk_size: int = DEFAULT_CHUNK_ROWS,
) -> Any:
    """Open a SOMA experiment as an AnnData whose ``X`` is a lazy Dask array.

    Parameters
    ----------
    uri
        The experiment's URI (a local folder, or any URI tiledbsoma opens).
    measurement
        The measurement holding the counts (``"RNA"`` in the Census).
    layer
        The X layer of the counts (``"raw"`` in the Census, ``"data"`` as
        ``tiledbsoma.io.from_anndata`` writes it).
    obs_columns
        obs columns to load (default: all); pass the model's registered ones on large data.
    obs_names, var_names
        The obs and var columns holding cell and gene names (without ``obs_names`` in obs,
        as in the Census, cells are named by their ``soma_joinid``; the Census's genes are
        in ``feature_id``, Ensembl IDs, and ``feature_name``).
    chunk_size
        Cells per row chunk (a multiple of the minibatch size avoids a rechunk).

    Returns
    -------
    An ``anndata.AnnData`` with the cells in ``soma_joinid`` order, ``obs`` and ``var_names``
    in memory, and ``X`` a Dask array of scipy CSR chunks.
    """
    import anndata
    import dask
    import dask.array as da
    import pandas as pd
    import scipy.sparse as sp

    soma = _tiledbsoma()
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise InvalidArgumentError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    uri = str(uri)
    if not is_soma_experiment(uri):
        raise InputDataError(f"{uri} is not a SOMA experiment (tiledbsoma cannot open it)")
    with soma.Experiment.open(uri) as exp:
        if measurement not in exp.ms:
            raise InputDataError(
                f"the SOMA experiment {uri} has no measurement {measurement!r}; it has "
                f"{sorted(exp.ms.keys())}"
            )
        ms = exp.ms[measurement]
        if layer not in ms.X:
            raise InputDataError(
                f"measurement {measurement!r} of {uri} has no X layer {layer!r}; it has "
                f"{sorted(ms.X.keys())}"
            )
        names = exp.obs.schema.names
        if obs_names not in names:
            obs_names = "soma_joinid"  # the Census's obs has no name column: cells by joinid
        wanted = names if obs_columns is None else [c for c in obs_columns if c in names]
        cols = list(dict.fromkeys(["soma_joinid", obs_names, *wanted]))
        if var_names not in ms.var.schema.names:
            raise InputDataError(
                f"var of measurement {measurement!r} has no column {var_names!r} (gene names); "
                f"it has {sorted(ms.var.schema.names)}: pass var_names= the column that holds "
                "the model's gene names (the Census's: feature_id or feature_name)"
            )
        obs = exp.obs.read(column_names=cols).concat().to_pandas()
        var = ms.var.read(column_names=["soma_joinid", var_names]).concat().to_pandas()
        X = ms.X[layer]
        n_vars_shape = int(X.shape[1])
        dtype = np.dtype(X.schema.field("soma_data").type.to_pandas_dtype())
    obs = obs.sort_values("soma_joinid", kind="stable")
    var = var.sort_values("soma_joinid", kind="stable")
    obs_ids = obs["soma_joinid"].to_numpy(np.int64)
    var_ids = var["soma_joinid"].to_numpy(np.int64)
    if var_ids.size and var_ids[-1] >= n_vars_shape:
        n_vars_shape = int(var_ids[-1]) + 1
    frame = obs.set_index(obs_names, drop=obs_names != "soma_joinid")
    frame = frame.drop(columns=[c for c in ("soma_joinid",) if c in frame.columns])
    frame.index = frame.index.astype(str)
    frame.index.name = None
    n, g = obs_ids.size, var_ids.size
    read = dask.delayed(_read_rows, pure=True)
    parts = []
    for start in range(0, n, chunk_size):
        rows = obs_ids[start : start + chunk_size]
        block = read(uri, measurement, layer, rows, var_ids, str(dtype))
        parts.append(
            da.from_delayed(block, shape=(rows.size, g), dtype=dtype, meta=sp.csr_matrix((0, 0)))
        )
    X_dask = da.concatenate(parts, axis=0)
    var_index = pd.Index(var[var_names].astype(str).to_numpy())
    return anndata.AnnData(X=X_dask, obs=frame, var=pd.DataFrame(index=var_index))


def read_soma_proteins(
    uri: str,
    *,
    measurement: str = "ADT",
    layer: str = "data",
    var_names: str = "var_id",
    chunk_size: int = DEFAULT_CHUNK_ROWS,
) -> Any:
    """A SOMA experiment's protein counts (CITE-seq antibodies) for a TOTALVI model.

    The measurement's X layer as a Dask array of the experiment's cells in ``soma_joinid``
    order and ``chunk_size`` rows (as :func:`read_soma` reads the RNA), named by its
    ``var_names`` column: a :class:`~scvi_onnx.data.proteins.ProteinInput`, matched to the
    model's proteins by name as an ``obsm`` DataFrame would be. Pass
    ``ModelInput(read_soma(uri, ...), read_soma_proteins(uri, ...))`` to the methods (the same
    ``chunk_size`` for both).
    """
    from ..data.proteins import ProteinInput

    adt = read_soma(
        uri,
        measurement=measurement,
        layer=layer,
        obs_columns=[],
        var_names=var_names,
        chunk_size=chunk_size,
    )
    return ProteinInput(adt.X, adt.var_names, f"measurement {measurement!r} of {uri}")


def _read_rows(
    uri: str, measurement: str, layer: str, rows: np.ndarray, var_ids: np.ndarray, dtype: str
):
    """The CSR rows of cells ``rows`` (soma_joinids, increasing), columns in ``var_ids``'
    order."""
    import scipy.sparse as sp

    soma = _tiledbsoma()
    with soma.Experiment.open(uri) as exp:
        table = exp.ms[measurement].X[layer].read(coords=(rows,)).tables().concat()
    i = table.column("soma_dim_0").to_numpy()
    j = table.column("soma_dim_1").to_numpy()
    v = table.column("soma_data").to_numpy().astype(dtype, copy=False)
    r = np.searchsorted(rows, i)
    if var_ids.size and (var_ids[0] != 0 or var_ids[-1] != var_ids.size - 1):
        c = np.searchsorted(var_ids, j)
        keep = (c < var_ids.size) & (var_ids[np.minimum(c, var_ids.size - 1)] == j)
        r, c, v = r[keep], c[keep], v[keep]
    else:
        c = j
    m = sp.csr_matrix((v, (r, c)), shape=(rows.size, var_ids.size))
    m.sum_duplicates()  # canonical: sorted column indices, no duplicates
    return m
