"""An AnnData's cells as checked, completed minibatches for one model."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pandas as pd

from ..arguments import check_choice, check_fraction, check_positive_int
from ..bundle import Manifest
from ..errors import InputDataError, InvalidArgumentError, InvalidValuesError, MissingColumnError
from ..threads import ordered_map
from .checks import ValueChecker, dtype_is_integer, dtype_is_numeric, where_phrase
from .entries import Entries
from .genes import MISSING_GENES_MODES, GeneMatch, gene_names
from .indices import resolve_indices
from .minibatch import NO_NEEDS, DataNeeds, Minibatch
from .obs import ObsUse, read_obs
from .proteins import ProteinInput, ProteinReader, obsm_proteins
from .readers import MatrixReader
from .text import preview


class AnnDataSource:
    """Validated access to an AnnData's cells as :class:`~scvi_onnx.data.minibatch.Minibatch`.

    What is cheap to check (genes, the layer, obs columns, categories, covariate values) is
    checked here, once; expression values are checked per minibatch as they are read, so the
    whole matrix is never densified or loaded.

    Parameters
    ----------
    adata
        In-memory or backed (``anndata.read_h5ad(path, backed="r")``) AnnData. The expression
        matrix may be dense (any numeric dtype) or scipy CSR/CSC (matrix or array).
    manifest
        The bundle's manifest: gene list and registry.
    missing_genes
        ``"error"`` (default): refuse data lacking some of the model's genes. ``"zero"``: fill
        them with zeros, as scvi-tools' ``prepare_query_anndata`` does.
    min_gene_overlap
        With ``missing_genes="zero"``, the smallest fraction of the model's genes that must be
        present (default 0.8); ``0`` disables the check.
    missing_labels_code
        When the registered labels column is absent from ``adata.obs``, give every cell this
        label code instead of raising (used by SCANVI for unlabeled query cells).
    first_key
        The key of row 0 (default 0): a cell's noise is keyed by ``first_key + row``, so a
        chunk of a larger input gives the numbers of its rows in the whole.
    n_total
        For a chunk of a larger input: the whole input's number of cells (value errors then
        say where in the whole the cells are, as an in-memory run would).
    use
        Which registered obs columns the computation reads (:class:`~scvi_onnx.data.obs.ObsUse`;
        default: all of them, with training categories).
    layer
        Read the counts from ``adata.layers[layer]`` (default: where the model was trained
        to read them, ``X`` or its registered layer).
    gene_key
        Match genes by ``adata.var[gene_key]`` instead of ``adata.var_names``.
    proteins
        For a model with proteins (TOTALVI): where the input's protein counts are when they are
        not the registered ``adata.obsm`` entry (a MuData's protein modality; see
        :mod:`~scvi_onnx.data.mudata`).

    Raises
    ------
    InputDataError
        (or a subclass) when the data cannot be used with the model; the message says why and
        what to do.
    """

    def __init__(
        self,
        adata: Any,
        manifest: Manifest,
        *,
        missing_genes: str = "error",
        min_gene_overlap: float = 0.8,
        missing_labels_code: int | None = None,
        first_key: int = 0,
        n_total: int | None = None,
        use: ObsUse | None = None,
        layer: str | None = None,
        gene_key: str | None = None,
        proteins: ProteinInput | None = None,
    ):
        try:
            import anndata
        except ImportError as e:  # pragma: no cover - anndata is a dependency
            raise InputDataError("reading AnnData input needs the anndata package") from e

        if not isinstance(adata, anndata.AnnData):
            raise InputDataError(
                f"expected an anndata.AnnData, got {type(adata).__name__}; load your data with "
                "anndata.read_h5ad(path) (or backed='r' for large files)"
            )
        check_choice("missing_genes", missing_genes, MISSING_GENES_MODES)
        min_gene_overlap = check_fraction("min_gene_overlap", min_gene_overlap)
        if adata.n_obs == 0:
            raise InputDataError(
                "empty AnnData: it holds 0 cells; nothing to score: pass an AnnData with at "
                "least one cell"
            )
        self._manifest = manifest
        self._first_key = int(first_key)
        self._n_total = n_total
        self._obs_names = adata.obs_names
        self._n_obs = int(adata.n_obs)
        from ..models.registry import feature_name  # (models import this module)

        names, names_where = gene_names(adata, gene_key)
        self.genes = GeneMatch(
            names,
            manifest.gene_index,
            missing_genes=missing_genes,
            min_gene_overlap=min_gene_overlap,
            what=feature_name(manifest.model_class),
            where=names_where,
            var=adata.var,
        )
        if layer is not None and not isinstance(layer, str):
            raise InvalidArgumentError(f"layer must be a layer name (str), got {layer!r}")
        self._layer_given = layer is not None
        matrix, where = self._expression(adata, manifest.registry.layer if layer is None else layer)
        self._adata = adata
        self._source_name = where
        self._integer_input = dtype_is_integer(matrix.dtype)
        self._reader = MatrixReader(matrix, self.genes, where)
        self._obs = read_obs(
            adata.obs, manifest.registry, use, missing_labels_code=missing_labels_code
        )
        self._proteins = None
        field = manifest.registry.proteins
        if field is not None:
            self._proteins = ProteinReader(
                proteins if proteins is not None else obsm_proteins(adata, field),
                field,
                self._n_obs,
                missing_genes=missing_genes,
                min_gene_overlap=min_gene_overlap,
            )

    def _expression(self, adata: Any, layer: str | None) -> tuple[Any, str]:
        """The registered expression matrix, checked for a numeric dtype and its shape."""
        if layer is None:
            matrix, where = adata.X, "adata.X"
            if matrix is None:
                raise InputDataError(
                    "adata.X is None but the model reads its counts from adata.X; put the raw "
                    "counts in adata.X"
                )
        else:
            if layer not in adata.layers:
                present = list(adata.layers.keys())
                why = (
                    "given as layer="
                    if self._layer_given
                    else "where the model reads its counts, registered at training"
                )
                raise MissingColumnError(
                    f"adata.layers has no layer {layer!r} ({why}); layers present: "
                    f"{preview(present, 10) if present else 'none'}. Put the raw counts in "
                    f"adata.layers[{layer!r}], or name the layer that holds them with "
                    "layer=... (CLI: --layer)"
                )
            matrix, where = adata.layers[layer], f"adata.layers[{layer!r}]"
        dtype = getattr(matrix, "dtype", None)
        if dtype is None or not dtype_is_numeric(dtype):
            raise InvalidValuesError(
                f"{where} must hold numbers, but its dtype is {dtype}; convert it to a numeric "
                "(integer or float) matrix of raw counts"
            )
        shape = getattr(matrix, "shape", None)
        n_vars = self.genes.n_input
        if shape is None or len(shape) != 2 or tuple(shape) != (self._n_obs, n_vars):
            raise InputDataError(
                f"{where} has shape {shape}, expected (n_obs, n_vars) = ({self._n_obs}, {n_vars})"
            )
        return matrix, where

    # ---- properties -------------------------------------------------------------------------

    @property
    def n_obs(self) -> int:
        """Number of cells in the AnnData."""
        return self._n_obs

    @property
    def obs_names(self) -> pd.Index:
        """The AnnData's cell names."""
        return self._obs_names

    @property
    def notes(self) -> tuple[str, ...]:
        """What was read differently from training (unseen categories, absent columns)."""
        return self._obs.notes

    @property
    def n_genes(self) -> int:
        """Number of model genes (columns of ``x`` in each minibatch)."""
        return self.genes.n_model

    # ---- reading ----------------------------------------------------------------------------

    def minibatches(
        self,
        indices: Any,
        batch_size: int,
        *,
        needs: DataNeeds = NO_NEEDS,
        prefetch: int = 0,
    ) -> Iterator[Minibatch]:
        """Yield checked, completed minibatches of the cells at ``indices``, in that order.

        Parameters
        ----------
        indices
            Row positions (see :func:`~scvi_onnx.data.indices.resolve_indices`; ``None``
            means all cells).
        batch_size
            Cells per minibatch; the last one may be smaller.
        needs
            What to attach and check (:class:`~scvi_onnx.data.minibatch.DataNeeds`). With
            ``entries``, a canonical CSR source in the model's gene order hands over its own
            non-zeros; other sources list them from the dense rows (one pass), and the value
            checks read the non-zeros only.
        prefetch
            Reader threads that densify, check and complete the next minibatches while the
            caller works on the current one (the file itself is read on the iterating thread).
            0: none. The minibatches, errors and warning are the same whatever the number.

        Raises
        ------
        InvalidValuesError
            NaN, infinite or negative expression values.
        ZeroLibrarySizeError
            With ``needs.positive_library``, cells with zero total counts.

        Warns
        -----
        NonIntegerCountsWarning
            Once, after the last minibatch, when ``needs.count_data`` and non-integer values
            were seen.
        """
        idx = resolve_indices(indices, self._n_obs)
        bs = check_positive_int("batch_size", batch_size)
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise InvalidArgumentError(f"prefetch must be an integer >= 0, got {prefetch!r}")
        return self._iterate(idx, bs, prefetch, needs)

    def _iterate(
        self, idx: np.ndarray, bs: int, prefetch: int, needs: DataNeeds
    ) -> Iterator[Minibatch]:
        checker = ValueChecker(
            require_positive_library=needs.positive_library,
            count_data=needs.count_data,
            source=self._source_name,
        )
        keep_entries = needs.entries or needs.log_library
        n_model = self._reader.genes.n_model
        # where value errors say the cells are: in this input, or in the whole of which it is
        # a chunk (n_total); a chunk of unknown size (a request keyed from first_key) says not
        total = self._n_total or (idx.size if self._first_key == 0 else None)
        prot = self._proteins
        prot_checker = None
        if prot is not None:
            prot_checker = ValueChecker(
                require_positive_library=False, count_data=needs.count_data, source=prot.where
            )

        def finish(
            start: int, rows: np.ndarray, dense_rows: Callable, dense_y: Callable | None
        ) -> tuple[Minibatch, tuple]:
            x, entries = dense_rows()
            if entries is None and keep_entries:
                # the scoring methods need the non-zeros anyway: listing them once here
                # (on a reader thread where there are some) lets the checks read them only
                entries = Entries.from_dense(x)
            y = None if dense_y is None else dense_y()
            mb = self._assemble(x, rows, entries if keep_entries or x is None else None, y)
            where = where_phrase(self._first_key + start, rows.size, total)
            counts = checker.check(
                x, mb.cell_names, self._integer_input, entries, where, width=n_model
            )
            y_counts = (0, 0)
            if y is not None:
                y_counts = prot_checker.check(y, mb.cell_names, prot.integer_input, where=where)
            return mb.complete(needs), (counts, y_counts)

        def record(counts: tuple) -> None:
            checker.record(counts[0])
            if prot_checker is not None:
                prot_checker.record(counts[1])

        reads = (  # the file is read here, on the iterating thread
            (
                start,
                rows,
                self._reader.read(rows, dense=needs.dense),
                None if prot is None else prot.read(rows),
            )
            for start, rows in ((s, idx[s : s + bs]) for s in range(0, idx.size, bs))
        )
        if prefetch:
            done = ordered_map(lambda r: finish(*r), reads, prefetch, "scvi-onnx-read")
            for mb, counts in done:
                record(counts)
                yield mb
                # not bound while the next read is densified: a minibatch's buffers go as soon
                # as its consumer lets them go
                del mb
        else:
            # Inline, the loop holds the last read's buffers until the next read: memory stays
            # flat over millions of backed cells, while freeing them at once (a plain map) let
            # glibc's heap fragment and grow.
            for start, rows, dense_rows, dense_y in reads:
                mb, counts = finish(start, rows, dense_rows, dense_y)
                record(counts)
                yield mb
        checker.finish(self._integer_layers_hint)
        if prot_checker is not None:
            prot_checker.finish()

    def _integer_layers_hint(self) -> str:
        """Where raw counts may be instead: layers of integer values (their first cells)."""
        found = []
        for name in self._adata.layers.keys():
            if f"adata.layers[{name!r}]" == self._source_name:
                continue
            try:
                m = self._adata.layers[name]
                if not dtype_is_numeric(m.dtype):
                    continue
                head = m[: min(50, self._n_obs)]
                head = head.toarray() if hasattr(head, "toarray") else np.asarray(head)
            except Exception:  # a layer that cannot be read cheaply is not a hint
                continue
            if head.size and np.all(head >= 0) and np.all(head == np.floor(head)):
                found.append(name)
        if not found:
            return ""
        return (
            f"; adata.layers[{found[0]!r}] holds integers: read the counts from it with "
            f"layer={found[0]!r} (CLI: --layer {found[0]})"
        )

    def _assemble(
        self, x: np.ndarray | None, rows: np.ndarray, entries: Any, y: np.ndarray | None = None
    ) -> Minibatch:
        o = self._obs

        def take(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else np.ascontiguousarray(a[rows])

        return Minibatch(
            x=x,
            cells=np.array(rows, dtype=np.int64) + self._first_key,
            batch=take(o.batch),
            labels=take(o.labels),
            cat_covs=take(o.cat_covs),
            cont_covs=take(o.cont_covs),
            size_factor=take(o.size_factor),
            entries=entries,
            y=y,
            panel=take(o.panel),
            obs_names=self._obs_names,
            first_key=self._first_key,
        )
