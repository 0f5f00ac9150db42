"""Which operators an ONNX graph uses, read from its protobuf without the ``onnx`` package.

The runtime needs one fact about a graph before it runs it on the CPU: whether it holds an
operator whose ONNX Runtime kernel computes an element differently depending on where it lies
in its tensor (see :data:`POSITION_DEPENDENT_OPS`). ``onnx`` is an export-time dependency, so
this reads the few protobuf fields that name operators (``ModelProto.graph`` and
``.functions``, ``GraphProto.node``, ``NodeProto.op_type`` and the subgraphs in a node's
attributes) and skips everything else (the weights) by its length.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

#: Operators whose ONNX Runtime CPU kernel (Eigen's vectorised functions, scalar ones for the
#: last ``size % packet`` elements of a tensor) gives an element a result that can differ in the
#: last bit with the tensor's size: measured with onnxruntime 1.32 (x86-64, one thread) by
#: running each operator alone on 1-64 rows of 7 against the same rows among 256
#: (``tests/runtime/test_graph_rows.py`` checks this list against the installed ONNX Runtime).
#: A graph holding one is run with its cells padded (see ``Graph``); ``Exp``, ``Sigmoid``,
#: ``Tanh``, ``Softmax``, ``Erf``, ``Gelu`` (ONNX Runtime's own vectorised kernels) do not
#: depend on the position.
POSITION_DEPENDENT_OPS = frozenset(
    {"Log", "Softplus", "Elu", "Selu", "Celu", "Mish", "Sin", "Cos", "Atan"}
)

# protobuf wire types
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
# field numbers (onnx.proto3)
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_GRAPH_NODE = 1
_FUNCTION_NODE = 7
_NODE_OP_TYPE, _NODE_ATTRIBUTE = 4, 5
_ATTR_G, _ATTR_GRAPHS = 6, 11


class _Malformed(ValueError):
    pass


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise _Malformed("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _Malformed("varint too long")


def _fields(buf: memoryview):
    """``(field number, wire type, value)`` of one message: an int, or a memoryview for a
    length-delimited field."""
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = _varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
        elif wire == _I64:
            value, pos = None, pos + 8
        elif wire == _I32:
            value, pos = None, pos + 4
        elif wire == _LEN:
            n, pos = _varint(buf, pos)
            if pos + n > end:
                raise _Malformed("truncated field")
            value, pos = buf[pos : pos + n], pos + n
        else:
            raise _Malformed(f"unsupported wire type {wire}")
        yield field, wire, value


def _graph_ops(graph: memoryview, ops: set[str], node_field: int = _GRAPH_NODE) -> None:
    for field, wire, value in _fields(graph):
        if field == node_field and wire == _LEN:
            _node_ops(value, ops)


def _node_ops(node: memoryview, ops: set[str]) -> None:
    for field, wire, value in _fields(node):
        if wire != _LEN:
            continue
        if field == _NODE_OP_TYPE:
            ops.add(bytes(value).decode("utf-8", "replace"))
        elif field == _NODE_ATTRIBUTE:
            for f, w, v in _fields(value):
                if w == _LEN and f in (_ATTR_G, _ATTR_GRAPHS):
                    _graph_ops(v, ops)


def op_types(model: bytes | memoryview) -> frozenset[str]:
    """The operator types of a serialized ``ModelProto`` (its graph, subgraphs and local
    functions). Raises ``ValueError`` for bytes that are not a protobuf message."""
    ops: set[str] = set()
    for field, wire, value in _fields(memoryview(model)):
        if wire != _LEN:
            continue
        if field == _MODEL_GRAPH:
            _graph_ops(value, ops)
        elif field == _MODEL_FUNCTIONS:
            _graph_ops(value, ops, node_field=_FUNCTION_NODE)
    return frozenset(ops)


def file_op_types(path: str | Path) -> frozenset[str]:
    """:func:`op_types` of an ``.onnx`` file, memory-mapped: the weights are skipped by their
    length, never read (a 100,000-region PEAKVI graph is 126 MB)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return op_types(b"")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            view = memoryview(m)
            message = None
            try:
                ops = op_types(view)
            except ValueError as e:
                # the traceback's frames hold slices of the map: keep only the message, so
                # that they are gone before the map closes
                message = str(e)
            view.release()
    if message is not None:
        raise _Malformed(message)
    return ops
