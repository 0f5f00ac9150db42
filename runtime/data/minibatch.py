"""The minibatch: everything the maths needs about a group of cells, completed once.

The data layer (:class:`~scvi_onnx.data.anndata.AnnDataSource`, or
:func:`~scvi_onnx.data.dataloader.normalize_dataloader` for a user's minibatches) builds it,
checks its values and completes it with what the model asked for (:class:`DataNeeds`): the
non-zero entries and the observed log-library. Nothing downstream computes them again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from .entries import Entries


@dataclass(frozen=True)
class DataNeeds:
    """What a model needs of its minibatches, decided once from its config.

    Attributes
    ----------
    entries
        Attach the non-zero entries (the count terms and checks of scoring methods read them).
    log_library
        Attach the observed log-library ``log(sum_g x)`` (models with an observed library
        size); implies ``entries``.
    positive_library
        Refuse cells with zero total counts (their log-library is ``-inf``).
    count_data
        The likelihood is a count likelihood: non-integer values give one warning.
    latent_entries
        The encoder reads the entries too (a first layer computed from them: PEAKVI's sparse
        encoders), so the latent space attaches them.
    dense
        The model reads the dense rows (``Minibatch.x``). ``False``: only the entries, and a
        sparse source's rows are never densified (``x`` is ``None`` where the entries come
        from the source; a dense source still gives ``x``).
    """

    entries: bool = False
    log_library: bool = False
    positive_library: bool = False
    count_data: bool = True
    latent_entries: bool = False
    dense: bool = True

    def for_latent(self) -> DataNeeds:
        """What the latent space and predictions need: the checks, no library, no entries
        unless the encoder reads them (holding them longer only keeps memory busy)."""
        return dataclasses.replace(self, entries=self.latent_entries, log_library=False)


#: Checks only: no entries, no library (what a plain read needs).
NO_NEEDS = DataNeeds()


@dataclass(frozen=True, eq=False)
class Minibatch:
    """A group of cells, dense and typed, in the model's gene order.

    Attributes
    ----------
    x
        ``(n, n_genes)`` float32 C-contiguous counts; ``None`` for a model that reads the
        entries only (``DataNeeds.dense``), where the source gave them.
    cells
        ``(n,)`` int64 key of each cell: its row in the AnnData (or its running position in a
        user's dataloader). The Monte-Carlo noise of a cell is keyed by it, so results do not
        depend on batching.
    batch, labels
        ``(n, 1)`` int64 training-category codes (0 where the model registered none).
    cat_covs, cont_covs, size_factor
        ``(n, K)`` int64 codes, ``(n, C)`` float32 values, ``(n, 1)`` float32 size factors, where
        the model registered them.
    entries
        x's non-zero :class:`~scvi_onnx.data.entries.Entries`, where needed.
    log_library
        ``(n,)`` float64 log of each cell's total count, where needed.
    y
        ``(n, n_proteins)`` float32 protein counts in the model's protein order (TOTALVI),
        where the model registered proteins.
    panel
        ``(n, 1)`` int64 panel codes (TOTALVI's ``panel_key``), where registered.
    obs_names
        The source's cell names (all of them, shared, not copied): cell ``i`` is
        ``obs_names[cells[i] - first_key]``. ``None`` for a user's dataloader (cells are named by
        position).
    first_key
        The key of the source's first row (0, unless the source is one chunk of a larger
        input whose global rows key the noise).
    """

    x: np.ndarray | None
    cells: np.ndarray
    batch: np.ndarray
    labels: np.ndarray
    cat_covs: np.ndarray | None = None
    cont_covs: np.ndarray | None = None
    size_factor: np.ndarray | None = None
    entries: Entries | None = None
    log_library: np.ndarray | None = None
    y: np.ndarray | None = None
    panel: np.ndarray | None = None
    obs_names: Any = None
    first_key: int = 0

    @property
    def n(self) -> int:
        return self.cells.shape[0]

    def cell_names(self, rows: Any = slice(None)) -> list:
        """Names of the cells at positions ``rows`` of this minibatch (for messages)."""
        keys = self.cells[rows]
        if self.obs_names is None:
            return [f"cell {int(c)}" for c in keys]
        return [self.obs_names[int(c) - self.first_key] for c in keys]

    def rows(self, sl: slice) -> Minibatch:
        """The same cells' data for a contiguous range of them (``sl`` without a step)."""

        def part(v: Any) -> Any:
            if v is None:
                return None
            return v.rows(sl) if isinstance(v, Entries) else v[sl]

        return Minibatch(
            **{
                f.name: part(getattr(self, f.name))
                for f in dataclasses.fields(self)
                if f.name not in ("obs_names", "first_key")
            },
            obs_names=self.obs_names,
            first_key=self.first_key,
        )

    def complete(self, needs: DataNeeds) -> Minibatch:
        """This minibatch with the entries and log-library ``needs`` asks for, computed here
        once (entries listed from the dense rows where the source gave none)."""
        want_entries = needs.entries or needs.log_library
        entries = self.entries
        if want_entries and entries is None:
            entries = Entries.from_dense(self.x)
        log_library = self.log_library
        if needs.log_library and log_library is None:
            log_library = np.log(entries.row_sums(entries.vals))
        if entries is self.entries and log_library is self.log_library:
            return self
        return dataclasses.replace(self, entries=entries, log_library=log_library)
