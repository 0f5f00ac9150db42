"""How far float32 rounding alone moves a graph's outputs on its probe cells.

The export compares each ONNX output with scvi-tools' torch modules, both float32, within
``atol + rtol * |torch|``. A model with large activations (a library size in the thousands
times a softmax of large logits, an encoder that reads raw counts through batch norm) can have
outputs that two correct float32 computations give a few 1e-4 apart: torch's own float32 is as
far from the exact value. Such an output is refused by the default tolerance although nothing is
wrong with it.

When an output fails, :func:`float32_spread` runs the graph module that was traced (the same
function as the ONNX graph) on the same probe inputs in float32 and in float64. How far its
float32 result is from its float64 one measures how much float32 rounding moves that output.
The output is accepted when ONNX Runtime is within a few times that spread of torch
(:data:`SPREAD_FACTOR`), never past :data:`MAX_WIDENED`, and the tolerance it passed with is
written to the manifest for that output alone, so that ``verify`` applies it too.

The spread comes from the traced graph against itself, not from scvi-tools' module: a graph that
computes something else than scvi-tools does still has a small float32 spread and fails.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import replace

import numpy as np
import torch

from scvi_onnx.selfcheck import VerifyRow, deviation

logger = logging.getLogger(__name__)

#: ONNX Runtime may differ from torch by this many times the graph's own float32-vs-float64
#: spread: two float32 computations of the same function, each about one spread from the exact
#: value, with a margin for the spread being measured on one run.
SPREAD_FACTOR = 4.0
#: The widest tolerance (atol and rtol) an output is given: past it, float32 cannot tell this
#: model's output from a defect and the export refuses it (the user can still pass one).
MAX_WIDENED = 1e-2


def float32_spread(graph) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """The graph module's float32 and float64 outputs on its probe feeds, by output name:
    ``{name: (out32, out64)}``; None when the module cannot run in float64."""
    inputs = graph.io.inputs
    args32 = tuple(torch.as_tensor(graph.feeds[name]) for name in inputs)
    args64 = tuple(a.double() if a.dtype == torch.float32 else a for a in args32)
    try:
        m64 = copy.deepcopy(graph.module).double().eval()
        graph.module.eval()
        with torch.no_grad():
            out32, out64 = graph.module(*args32), m64(*args64)
    except Exception as e:  # noqa: BLE001 - a graph that only runs in float32: no widening
        logger.info("%s does not run in float64 (%s): no rounding spread", graph.name, e)
        return None
    if isinstance(out32, torch.Tensor):
        out32, out64 = (out32,), (out64,)
    names = graph.io.outputs
    return {
        k: (a.detach().numpy(), b.detach().numpy())
        for k, a, b in zip(names, out32, out64, strict=True)
        if b.dtype == torch.float64
    }


def tolerance_scale(out32: np.ndarray, out64: np.ndarray, atol: float, rtol: float) -> float:
    """By how much ``atol`` and ``rtol`` must grow (>= 1) for an output that may be
    :data:`SPREAD_FACTOR` times its float32 rounding spread away: the spread is measured in
    the tolerance's own units, ``|out32 - out64| / (atol + rtol * |out64|)``, at its worst
    finite entry."""
    a, b = np.asarray(out32, np.float64), np.asarray(out64, np.float64)
    finite = np.isfinite(a) & np.isfinite(b)
    if not finite.any() or (atol <= 0 and rtol <= 0):
        return 1.0
    diff = np.abs(a[finite] - b[finite])
    allowed = atol + rtol * np.abs(b[finite])
    if np.any(diff[allowed == 0] > 0):  # an exact entry required (atol 0 at a zero) moved
        return float("inf")
    spread = np.divide(diff, allowed, out=np.zeros_like(diff), where=allowed > 0)
    return max(1.0, SPREAD_FACTOR * float(spread.max()))


def within_rounding(row: VerifyRow, got, want, spread) -> VerifyRow:
    """``row`` (a failed output) checked again with its tolerance widened by the output's float32
    rounding spread (``(out32, out64)``: of the traced graph, or a quantity derived from its
    outputs as a spec's check derives it; or None), up to :data:`MAX_WIDENED`; the row that
    decides."""
    if spread is None:
        return row
    scale = tolerance_scale(*spread, row.atol, row.rtol)
    if scale <= 1.0:
        return row
    if max(row.atol, row.rtol) * scale > MAX_WIDENED:
        return replace(
            row,
            reason=(row.reason + "; " if row.reason else "")
            + f"float32 rounding alone moves it by {scale / SPREAD_FACTOR:.3g} times the "
            f"tolerance: too much to tell from a defect (past {MAX_WIDENED:g})",
        )
    wider = deviation(row.output, got, want, row.atol * scale, row.rtol * scale)
    if not wider.ok:
        return row
    return replace(
        wider,
        reason=f"max_rel_diff {row.max_rel_diff:.3g} past rtol {row.rtol:g}, within "
        f"{SPREAD_FACTOR:g} x its float32 rounding spread: atol {wider.atol:.3g}, rtol "
        f"{wider.rtol:.3g}" + (f" ({wider.reason})" if wider.reason else ""),
    )
