"""Trace a graph module to ONNX and check what was written."""

from __future__ import annotations

import contextlib
import io as _io
import warnings
from pathlib import Path

import numpy as np
import torch

from scvi_onnx.bundle import format as F
from scvi_onnx.errors import ExportValidationError

from .graphs import GraphIO

_CELLS = {0: "n_cells"}
_SAMPLES_CELLS = {0: "n_samples", 1: "n_cells"}
#: Dynamic axes of every graph input and output name (the cell axis, and the sample axis of
#: what the decoders take and give).
DYNAMIC_AXES: dict[str, dict[int, str]] = {
    F.IN_X: _CELLS,
    F.IN_X_LOG1P: _CELLS,
    F.IN_X_PRODUCT: _CELLS,
    F.IN_COUNTS: _CELLS,
    F.IN_LABELS: _CELLS,
    F.IN_CONT: _CELLS,
    F.IN_BATCH: _CELLS,
    F.IN_CAT: _CELLS,
    F.OUT_QZ_M: _CELLS,
    F.OUT_QZ_V: _CELLS,
    F.OUT_QL_M: _CELLS,
    F.OUT_QL_V: _CELLS,
    F.IN_Z: _SAMPLES_CELLS,
    F.IN_LIBRARY: {0: "n_lib_samples", 1: "n_cells"},
    F.OUT_LOG_PX: _SAMPLES_CELLS,
    F.OUT_PX_RATE: _SAMPLES_CELLS,
    F.OUT_PX_R: _SAMPLES_CELLS,
    F.OUT_PX_DROPOUT: _SAMPLES_CELLS,
    F.OUT_PROBS: _SAMPLES_CELLS,
    F.OUT_QZ2_M: _SAMPLES_CELLS,
    F.OUT_QZ2_V: _SAMPLES_CELLS,
    F.IN_Z2: _SAMPLES_CELLS,
    F.OUT_PZ1_M: _SAMPLES_CELLS,
    F.OUT_PZ1_V: _SAMPLES_CELLS,
    F.IN_XY_NORM: _CELLS,
    F.OUT_PY_BACK_ALPHA: _SAMPLES_CELLS,
    F.OUT_PY_BACK_BETA: _SAMPLES_CELLS,
    F.OUT_PY_FORE_SCALE: _SAMPLES_CELLS,
    F.OUT_PY_MIXING: _SAMPLES_CELLS,
    F.OUT_DEPTH: _CELLS,  # also IN_DEPTH (the same name)
    F.OUT_PX: _SAMPLES_CELLS,
}


def trace(
    graph: torch.nn.Module,
    io: GraphIO,
    feeds: dict[str, np.ndarray],
    path: Path,
    dynamic: dict[str, dict[int, str]] | None = None,
) -> None:
    """Trace ``graph`` to ``path`` (ONNX, the format's opset) on ``feeds``, with the named axes
    ``dynamic`` (default :data:`DYNAMIC_AXES`) dynamic; refuse forbidden nodes and IO names
    that differ from ``io``."""
    dynamic = DYNAMIC_AXES if dynamic is None else dynamic
    args = tuple(torch.as_tensor(feeds[name]) for name in io.inputs)
    graph.eval()
    buf = _io.StringIO()
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(buf):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            args,
            str(path),
            input_names=list(io.inputs),
            output_names=list(io.outputs),
            dynamic_axes={k: v for k, v in dynamic.items() if k in io.inputs + io.outputs},
            opset_version=F.OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
    import onnx

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    bad = [n.op_type for n in proto.graph.node if n.op_type in ("BatchNormalization", "Dropout")]
    if bad or any(n.op_type.startswith("Random") for n in proto.graph.node):
        raise ExportValidationError(f"{path.name} contains forbidden nodes: {bad}")
    names_in = [i.name for i in proto.graph.input]
    names_out = [o.name for o in proto.graph.output]
    if names_in != list(io.inputs) or names_out != list(io.outputs):
        raise ExportValidationError(
            f"{path.name}: graph IO {names_in} -> {names_out} differs from the spec "
            f"{list(io.inputs)} -> {list(io.outputs)}"
        )
