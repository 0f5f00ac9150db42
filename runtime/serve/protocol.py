"""Open Inference Protocol (KServe V2) tensors over HTTP/REST: JSON and binary encodings.

An inference request is a JSON object, optionally followed by the raw bytes of some of its
input tensors (the *binary tensor data* extension that Triton's and KServe's clients use by
default). The ``Inference-Header-Content-Length`` HTTP header then gives the length of the JSON
part; each binary input carries ``parameters.binary_data_size``, and the binary parts follow the
JSON in the order of the inputs. Responses are built the same way: an output is sent as binary
when the request asks for it (``outputs[i].parameters.binary_data`` or the request parameter
``binary_data_output``).

Binary tensors are little-endian, row-major, without padding; a ``BYTES`` element is a 4-byte
little-endian length followed by that many bytes.

Nothing here knows about models: this module turns bytes into named numpy arrays and back, and
refuses what does not follow the protocol with :class:`ProtocolError` (an HTTP 400).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: V2 datatype -> numpy dtype (little-endian). BYTES elements are Python ``str`` here.
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
HEADER_LENGTH = "Inference-Header-Content-Length"
_LEN = struct.Struct("<I")


class ProtocolError(Exception):
    """A request that does not follow the protocol (answered with HTTP 400)."""


@dataclass
class RequestedOutput:
    name: str
    binary: bool


@dataclass
class InferRequest:
    """A decoded inference request: ``inputs`` maps each input name to its array (``BYTES``
    as an object array of ``str``), in request order."""

    id: str | None
    inputs: dict[str, np.ndarray]
    datatypes: dict[str, str]
    parameters: dict[str, Any]
    outputs: list[RequestedOutput] | None
    binary_output: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# requests
# ----------------------------------------------------------------------------------------------
def _shape(value: Any, name: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
        raise ProtocolError(
            f"input {name!r}: shape must be a list of non-negative integers, got {value!r}"
        )
    return tuple(value)


def _flatten(data: Any) -> list:
    """Row-major flattening of nested JSON lists (the protocol allows both forms)."""
    if not isinstance(data, list):
        return [data]
    if not data or not isinstance(data[0], list):
        if any(isinstance(v, list) for v in data):
            raise ProtocolError("tensor data mixes nested lists and scalars")
        return data
    out: list = []
    for v in data:
        out.extend(_flatten(v))
    return out


def _decode_bytes_element(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"input {name!r}: BYTES elements must be UTF-8 text") from None


def _json_tensor(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> np.ndarray:
    n = math.prod(shape)
    flat = _flatten(data)
    if len(flat) != n:
        raise ProtocolError(
            f"input {name!r}: shape {list(shape)} holds {n} elements but data has {len(flat)}"
        )
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in flat):
            raise ProtocolError(f"input {name!r}: BYTES data in JSON must be strings")
        arr = np.empty(n, dtype=object)
        arr[:] = flat
        return arr.reshape(shape)
    if datatype == "FP16":
        raise ProtocolError(f"input {name!r}: FP16 must be sent as binary data")
    dtype = DATATYPES[datatype]
    kind = dtype.kind
    for v in flat:
        ok = (
            isinstance(v, bool)
            if kind == "b"
            else isinstance(v, (int, float)) and not isinstance(v, bool)
            if kind == "f"
            else isinstance(v, int) and not isinstance(v, bool)
        )
        if not ok:
            raise ProtocolError(
                f"input {name!r}: {datatype} data must be "
                + ("booleans" if kind == "b" else "numbers" if kind == "f" else "integers")
                + f", got {v!r}"
            )
    try:
        arr = np.array(flat, dtype=dtype)
    except (OverflowError, ValueError) as e:
        raise ProtocolError(f"input {name!r}: data do not fit {datatype} ({e})") from None
    return arr.reshape(shape)


def _binary_tensor(name: str, datatype: str, shape: tuple[int, ...], buf: memoryview) -> np.ndarray:
    n = math.prod(shape)
    if datatype == "BYTES":
        # each element takes at least its 4-byte length: a shape the data cannot hold is
        # refused before anything is allocated (a tiny request asked for gigabytes)
        if n * 4 > len(buf):
            raise ProtocolError(
                f"input {name!r}: shape {list(shape)} holds {n} BYTES elements but its "
                f"{len(buf)} bytes of data hold at most {len(buf) // 4}"
            )
        out = np.empty(n, dtype=object)
        pos, size = 0, len(buf)
        for i in range(n):
            if pos + 4 > size:
                raise ProtocolError(f"input {name!r}: BYTES data end before element {i}")
            (length,) = _LEN.unpack_from(buf, pos)
            pos += 4
            if pos + length > size:
                raise ProtocolError(f"input {name!r}: BYTES element {i} runs past its data")
            out[i] = _decode_bytes_element(bytes(buf[pos : pos + length]), name)
            pos += length
        if pos != size:
            raise ProtocolError(
                f"input {name!r}: {size - pos} bytes left after the {n} BYTES elements of "
                f"shape {list(shape)}"
            )
        return out.reshape(shape)
    dtype = DATATYPES[datatype]
    if len(buf) != n * dtype.itemsize:
        raise ProtocolError(
            f"input {name!r}: binary_data_size {len(buf)} does not match shape {list(shape)} "
            f"of {datatype} ({n * dtype.itemsize} bytes)"
        )
    arr = np.frombuffer(buf, dtype=dtype).reshape(shape)
    # numpy reads unaligned data through slow paths: copy what is not aligned (the server
    # aligns the binary part of request bodies it buffers, so this is rare)
    return arr if arr.flags.aligned else arr.copy()


def parse_request(body: bytes | bytearray | memoryview, header_length: int | None) -> InferRequest:
    """Decode an inference request body (JSON, optionally followed by binary tensor data).

    Raises
    ------
    ProtocolError
        Malformed JSON, a missing or malformed field, an unknown datatype, or tensor data
        that do not match their shape.
    """
    view = memoryview(body)
    if header_length is None:
        header, tail = view, view[:0]
    else:
        if not 0 < header_length <= len(body):
            raise ProtocolError(
                f"{HEADER_LENGTH} is {header_length} but the body has {len(body)} bytes"
            )
        header, tail = view[:header_length], view[header_length:]
    try:
        doc = json.loads(bytes(header))
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"the request is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ProtocolError("the request must be a JSON object with an 'inputs' list")
    rid = doc.get("id")
    if rid is not None and not isinstance(rid, str):
        raise ProtocolError("'id' must be a string")
    params = doc.get("parameters", {})
    if not isinstance(params, dict):
        raise ProtocolError("'parameters' must be a JSON object")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ProtocolError("the request must hold a non-empty 'inputs' list")
    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    offset = 0
    for item in raw_inputs:
        if not isinstance(item, dict):
            raise ProtocolError("each input must be a JSON object")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise ProtocolError("each input needs a 'name' string")
        if name in inputs:
            raise ProtocolError(f"input {name!r} is given twice")
        datatype = item.get("datatype")
        if datatype not in DATATYPES:
            raise ProtocolError(
                f"input {name!r}: unknown datatype {datatype!r}; the protocol's datatypes are "
                + ", ".join(DATATYPES)
            )
        shape = _shape(item.get("shape"), name)
        iparams = item.get("parameters") or {}
        if not isinstance(iparams, dict):
            raise ProtocolError(f"input {name!r}: 'parameters' must be a JSON object")
        size = iparams.get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise ProtocolError(f"input {name!r}: binary_data_size must be an integer >= 0")
            if "data" in item:
                raise ProtocolError(f"input {name!r} has both 'data' and binary_data_size")
            if offset + size > len(tail):
                raise ProtocolError(
                    f"input {name!r}: binary_data_size {size} runs past the end of the body "
                    f"({len(tail) - offset} bytes left)"
                )
            arr = _binary_tensor(name, datatype, shape, tail[offset : offset + size])
            offset += size
        elif "data" in item:
            arr = _json_tensor(name, datatype, shape, item["data"])
        else:
            raise ProtocolError(f"input {name!r} has neither 'data' nor binary_data_size")
        inputs[name] = arr
        datatypes[name] = datatype
    if offset != len(tail):
        raise ProtocolError(
            f"{len(tail) - offset} bytes of binary data after the JSON are not claimed by any "
            "input's binary_data_size"
        )
    binary_output = params.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise ProtocolError("parameter binary_data_output must be a boolean")
    outputs = None
    raw_outputs = doc.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise ProtocolError("'outputs' must be a list")
        outputs = []
        seen = set()
        for o in raw_outputs:
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise ProtocolError("each requested output needs a 'name' string")
            oparams = o.get("parameters") or {}
            if not isinstance(oparams, dict):
                raise ProtocolError(f"output {o['name']!r}: 'parameters' must be a JSON object")
            binary = oparams.get("binary_data", binary_output)
            if not isinstance(binary, bool):
                raise ProtocolError(f"output {o['name']!r}: binary_data must be a boolean")
            if o["name"] in seen:
                raise ProtocolError(f"output {o['name']!r} is requested twice")
            seen.add(o["name"])
            outputs.append(RequestedOutput(o["name"], binary))
    return InferRequest(rid, inputs, datatypes, params, outputs, binary_output)


# ----------------------------------------------------------------------------------------------
# responses
# ----------------------------------------------------------------------------------------------
def encode_bytes(values: np.ndarray) -> bytes:
    """BYTES tensor -> length-prefixed binary (elements are ``str`` or ``bytes``)."""
    parts = []
    for v in values.ravel():
        b = v if isinstance(v, bytes) else str(v).encode("utf-8")
        parts.append(_LEN.pack(len(b)))
        parts.append(b)
    return b"".join(parts)


def _json_value(v: Any) -> Any:
    # JSON has no NaN or infinity: they go out as null (the values are still in binary mode)
    return v if math.isfinite(v) else None


def encode_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: list[tuple[str, str, np.ndarray, bool]],
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, int | None]:
    """Encode an inference response.

    ``outputs``: ``(name, datatype, array, binary)``. Returns the body and the length of its
    JSON part when some output is binary (for the ``Inference-Header-Content-Length`` header),
    else ``None``.
    """
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        doc["id"] = request_id
    if parameters:
        doc["parameters"] = parameters
    tensors = []
    blobs: list[bytes] = []
    for name, datatype, arr, binary in outputs:
        t: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if binary:
            if datatype == "BYTES":
                blob = encode_bytes(arr)
            else:
                blob = np.ascontiguousarray(arr, dtype=DATATYPES[datatype]).tobytes()
            t["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif datatype == "BYTES":
            t["data"] = [str(v) for v in arr.ravel()]
        else:
            flat = arr.ravel().tolist()
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                flat = [_json_value(v) for v in flat]
            t["data"] = flat
        tensors.append(t)
    doc["outputs"] = tensors
    head = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)
