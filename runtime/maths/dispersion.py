"""The dispersion of the gene likelihood, selected as scvi-tools' ``generative`` selects it.

``gene``: ``exp(px_r)`` per gene; ``gene-batch`` / ``gene-label``: one row per batch / label,
each cell takes its batch's / label's row; ``gene-cell``: ``exp`` of a decoder head (per sample
and cell). The runtime, the exporter's validation and ``verify`` all select it here, so export
validation checks the runtime's own selection.
"""

from __future__ import annotations

import numpy as np


def dispersion_table(px_r: np.ndarray) -> np.ndarray:
    """``exp(px_r)``: ``(G,)`` for ``gene``, one row per batch / label ``(C, G)`` for
    ``gene-batch`` / ``gene-label`` (``px_r`` as scvi-tools stores it: ``(G,)`` or ``(G, C)``)."""
    return np.exp(px_r) if px_r.ndim == 1 else np.ascontiguousarray(np.exp(px_r.T))


def cell_codes(dispersion: str, batch: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each cell's row of a ``(C, G)`` dispersion table: its batch or label code."""
    return (batch if dispersion == "gene-batch" else labels).reshape(-1)


def cell_dispersion(
    dispersion: str,
    px_r: np.ndarray | None,
    px_r_graph: np.ndarray | None,
    batch: np.ndarray,
    labels: np.ndarray,
) -> np.ndarray:
    """Dispersion (NB inverse dispersion, or Normal scale) of each cell, as scvi-tools.

    ``gene``: ``(G,)``; ``gene-batch`` / ``gene-label``: ``(N, G)``; ``gene-cell``: ``exp`` of
    the decoder head output ``px_r_graph``.
    """
    if dispersion == "gene-cell":
        return np.exp(px_r_graph)
    table = dispersion_table(px_r)
    return table if table.ndim == 1 else table[cell_codes(dispersion, batch, labels)]
