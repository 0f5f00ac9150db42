"""Which operators an ONNX graph uses, and its inputs and outputs, read from its protobuf
without the ``onnx`` package.

The runtime needs one fact about a graph before it runs it on the CPU: whether it holds an
operator whose ONNX Runtime kernel computes an element differently depending on where it lies
in its tensor (see :data:`POSITION_DEPENDENT_OPS`); and, for a graph opened on first use, its
inputs' and outputs' names and shapes before it has a session. ``onnx`` is an export-time
dependency, so this reads the few protobuf fields that hold them (``ModelProto.graph`` and
``.functions``, ``GraphProto.node`` / ``.input`` / ``.output`` / initializer names,
``NodeProto.op_type`` and the subgraphs in a node's attributes) and skips everything else (the
weights) by its length.
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
_GRAPH_INITIALIZER, _GRAPH_INPUT, _GRAPH_OUTPUT = 5, 11, 12
_TENSOR_NAME = 8
_VALUE_NAME, _VALUE_TYPE = 1, 2
_TYPE_TENSOR, _TENSOR_SHAPE = 1, 2
_DIM_VALUE, _DIM_PARAM = 1, 2


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


def signature(model: bytes | memoryview) -> tuple[list[tuple[str, list]], list[tuple[str, list]]]:
    """``(inputs, outputs)`` of a serialized ``ModelProto``'s graph: ``(name, shape)`` pairs in
    order, as ONNX Runtime's ``get_inputs()`` / ``get_outputs()`` give them (a dimension is
    an ``int``, the name of a dynamic axis, or ``None``; graph inputs that are initializers
    are not inputs). Raises ``ValueError`` for bytes that are not a protobuf message."""
    for field, wire, value in _fields(memoryview(model)):
        if field == _MODEL_GRAPH and wire == _LEN:
            return _graph_signature(value)
    return [], []


def _graph_signature(graph: memoryview) -> tuple[list[tuple[str, list]], list[tuple[str, list]]]:
    inputs, outputs, initializers = [], [], set()
    for field, wire, value in _fields(graph):
        if wire != _LEN:
            continue
        if field == _GRAPH_INPUT:
            inputs.append(_value_info(value))
        elif field == _GRAPH_OUTPUT:
            outputs.append(_value_info(value))
        elif field == _GRAPH_INITIALIZER:
            initializers.add(_string_field(value, _TENSOR_NAME))
    return [i for i in inputs if i[0] not in initializers], outputs


def _string_field(message: memoryview, number: int) -> str:
    for field, wire, value in _fields(message):
        if field == number and wire == _LEN:
            return bytes(value).decode("utf-8", "replace")
    return ""


def _value_info(info: memoryview) -> tuple[str, list]:
    """``ValueInfoProto`` -> ``(name, shape)``."""
    name, shape = "", []
    for field, wire, value in _fields(info):
        if field == _VALUE_NAME and wire == _LEN:
            name = bytes(value).decode("utf-8", "replace")
        elif field == _VALUE_TYPE and wire == _LEN:
            for f, w, tensor in _fields(value):
                if f == _TYPE_TENSOR and w == _LEN:
                    for f2, w2, dims in _fields(tensor):
                        if f2 == _TENSOR_SHAPE and w2 == _LEN:
                            shape = [_dimension(d) for f3, w3, d in _fields(dims) if f3 == 1]
    return name, shape


def _dimension(dim: memoryview) -> int | str | None:
    for field, wire, value in _fields(dim):
        if field == _DIM_VALUE and wire == _VARINT:
            return value if value < 1 << 63 else None  # a negative int64: no size
        if field == _DIM_PARAM and wire == _LEN:
            return bytes(value).decode("utf-8", "replace")
    return None


# TensorProto fields
_TENSOR_DIMS, _TENSOR_DATA_TYPE, _TENSOR_FLOAT_DATA, _TENSOR_RAW_DATA = 1, 2, 4, 9
_TENSOR_DATA_LOCATION = 14
#: TensorProto.DataType FLOAT
FLOAT = 1


def _spans(buf: memoryview, start: int, end: int):
    """``(field number, wire type, value, start, end)`` of one message lying at
    ``buf[start:end]``: as :func:`_fields`, with each length-delimited value's position in
    ``buf``."""
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
            yield field, wire, value, pos, pos
        elif wire in (_I64, _I32):
            pos += 8 if wire == _I64 else 4
            yield field, wire, None, pos, pos
        elif wire == _LEN:
            n, pos = _varint(buf, pos)
            if pos + n > end:
                raise _Malformed("truncated field")
            yield field, wire, None, pos, pos + n
            pos += n
        else:
            raise _Malformed(f"unsupported wire type {wire}")


def initializer(model: bytes | memoryview, name: str) -> tuple[list[int], int, int, int] | None:
    """Where initializer ``name`` of a serialized ``ModelProto``'s graph keeps its values:
    ``(dims, data type, byte offset, byte length)`` of its ``raw_data`` (or packed
    ``float_data``: the same little-endian bytes) in ``model``; ``None`` when the graph has no
    initializer of that name or keeps its values elsewhere (external data). Raises
    ``ValueError`` for bytes that are not a protobuf message."""
    buf = memoryview(model)
    for field, wire, _, g0, g1 in _spans(buf, 0, len(buf)):
        if field != _MODEL_GRAPH or wire != _LEN:
            continue
        for f, w, _, t0, t1 in _spans(buf, g0, g1):
            if f != _GRAPH_INITIALIZER or w != _LEN:
                continue
            if _string_field(buf[t0:t1], _TENSOR_NAME) != name:
                continue
            dims: list[int] = []
            dtype, data, external = 0, None, False
            for tf, tw, value, d0, d1 in _spans(buf, t0, t1):
                if tf == _TENSOR_DIMS and tw == _VARINT:
                    dims.append(value)
                elif tf == _TENSOR_DIMS and tw == _LEN:  # packed
                    pos = d0
                    while pos < d1:
                        v, pos = _varint(buf, pos)
                        dims.append(v)
                elif tf == _TENSOR_DATA_TYPE and tw == _VARINT:
                    dtype = value
                elif tf in (_TENSOR_RAW_DATA, _TENSOR_FLOAT_DATA) and tw == _LEN:
                    data = (d0, d1 - d0)
                elif tf == _TENSOR_DATA_LOCATION and tw == _VARINT:
                    external = value == 1
            if data is None or external:
                return None
            return dims, dtype, data[0], data[1]
    return None


def _read_mapped(path: str | Path, parse):
    """``parse`` of an ``.onnx`` file, memory-mapped: the weights are skipped by their
    length, never read (a 100,000-region PEAKVI graph is 126 MB). A file system that cannot
    map files gets the file read whole instead."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return parse(b"")
        try:
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError:  # e.g. FUSE with direct_io (ENODEV)
            return parse(f.read())
    with m:
        view = memoryview(m)
        error = None
        try:
            result = parse(view)
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the map closes
            # its traceback's frames hold slices of the map, which could not close while
            # they live: drop the traceback first
            error = e.with_traceback(None)
        view.release()
    if error is not None:
        if isinstance(error, (ValueError, RecursionError)):  # RecursionError: nested too deep
            raise _Malformed(str(error))
        raise error
    return result


def file_op_types(path: str | Path) -> frozenset[str]:
    """:func:`op_types` of an ``.onnx`` file (memory-mapped)."""
    return _read_mapped(path, op_types)


def file_signature(path: str | Path) -> tuple[list[tuple[str, list]], list[tuple[str, list]]]:
    """:func:`signature` of an ``.onnx`` file (memory-mapped)."""
    return _read_mapped(path, signature)


def file_initializer(path: str | Path, name: str) -> tuple[list[int], int, int, int] | None:
    """:func:`initializer` of an ``.onnx`` file (memory-mapped: only the headers are read)."""
    return _read_mapped(path, lambda view: initializer(view, name))
