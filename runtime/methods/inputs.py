"""Where a method's minibatches come from: an AnnData, or a user's dataloader."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from ..arguments import check_positive_int
from ..bundle import Manifest
from ..data import AnnDataSource, DataNeeds, Minibatch, normalize_dataloader, resolve_indices
from ..data.mudata import split_input
from ..data.obs import ObsUse
from ..errors import InvalidArgumentError
from .engine import DEFAULT_BATCH_SIZE


def minibatches(
    manifest: Manifest,
    adata: Any,
    indices: Sequence[int] | None,
    batch_size: int | None,
    dataloader: Iterable[dict[str, Any]] | None,
    *,
    needs: DataNeeds,
    prefetch: int = 0,
    missing_genes: str = "error",
    min_gene_overlap: float = 0.8,
    missing_labels_code: int | None = None,
    first_key: int = 0,
    n_total: int | None = None,
    use: ObsUse | None = None,
    layer: str | None = None,
    gene_key: str | None = None,
    progress: bool = False,
    read_cells: int | None = None,
) -> Iterator[Minibatch]:
    """Checked, completed minibatches of ``adata`` (or of a user's ``dataloader``).

    ``adata`` is the AnnData (or, for a model set up with ``setup_mudata``, the MuData) to read
    (the caller resolves the model's bound default);
    ``prefetch`` reader threads prepare the next minibatches; ``first_key`` keys row 0's noise
    (a chunk of a larger input passes its first global row, and ``n_total``, the whole's
    number of cells); ``progress`` shows a bar over minibatches; ``use``, ``layer``,
    ``gene_key``: see
    :class:`~scvi_onnx.data.anndata.AnnDataSource`; ``read_cells``: for methods whose results
    do not depend on how cells are grouped, minibatches are cut to at most this many cells
    (memory: :meth:`~scvi_onnx.methods.engine.Engine.read_cells`; a user's dataloader is
    taken as it comes).
    """
    batch_size = check_positive_int("batch_size", batch_size, allow_none=True)
    if dataloader is not None:
        if adata is not None:
            raise InvalidArgumentError("pass either adata or dataloader, not both")
        if first_key:
            raise InvalidArgumentError(
                f"first_key={first_key!r} applies to adata; a dataloader's cells are keyed by "
                "their running position from 0"
            )
        it = normalize_dataloader(
            dataloader, manifest, needs=needs, missing_labels_code=missing_labels_code
        )
        total = None
    else:
        if adata is None:
            raise InvalidArgumentError(
                "no data: pass adata= (or dataloader=), or bind an AnnData at "
                "scvi_onnx.load(path, adata=...)"
            )
        # a model set up with setup_mudata: its modalities as an AnnData
        adata, proteins = split_input(adata, manifest.registry)
        src = AnnDataSource(
            adata,
            manifest,
            missing_genes=missing_genes,
            min_gene_overlap=min_gene_overlap,
            missing_labels_code=missing_labels_code,
            first_key=first_key,
            n_total=n_total,
            use=use,
            layer=layer,
            gene_key=gene_key,
            proteins=proteins,
        )
        idx = resolve_indices(indices, src.n_obs)
        bs = batch_size or DEFAULT_BATCH_SIZE
        if read_cells:
            bs = min(bs, read_cells)
        it = src.minibatches(idx, bs, needs=needs, prefetch=prefetch)
        total = math.ceil(len(idx) / bs)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=total, unit="batch", leave=False)
    yield from it
