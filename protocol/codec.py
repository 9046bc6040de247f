"""V2 HTTP codec on msgspec: infer request bytes -> NumPy arrays -> response bytes.

Covers JSON tensors and the binary tensor data extension (a JSON header,
then raw tensors in the order the JSON names them; see protocol/raw.py).

Wire types are declared once here and the Encoder/Decoders are built once at
import (they are stateless and thread-safe). Tensor ``data`` is kept as raw JSON
until its datatype is known, then decoded by a typed msgspec decoder straight
into a Python list and handed to NumPy in one C-level conversion: there is no
per-element Python loop on the numeric path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import msgspec
import numpy as np

from flywheel.protocol.datatypes import FLOAT_DATATYPES, INT_DATATYPES, numpy_dtype, v2_datatype
from flywheel.protocol.errors import FlywheelError, InvalidInputError
from flywheel.protocol.raw import tensor_from_raw, tensor_to_raw
from flywheel.protocol.shapes import check_shape

Parameters = dict[str, Union[bool, int, float, str]]


class RequestInput(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: msgspec.Raw = msgspec.Raw(b"")


class RequestOutput(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    parameters: Parameters | None = None


class InferRequest(msgspec.Struct, forbid_unknown_fields=True):
    inputs: list[RequestInput]
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[RequestOutput] | None = None


# What a client sends: the same fields as the request types above, declared
# apart because the two directions want different things of msgspec. The
# server's keep ``data`` raw until the datatype is known and refuse unknown
# fields; a client's omit unset fields and carry ``data`` as a list.
class OutgoingInput(msgspec.Struct, omit_defaults=True):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list | None = None


class OutgoingOutput(msgspec.Struct, omit_defaults=True):
    name: str
    parameters: dict[str, Any] | None = None


class OutgoingRequest(msgspec.Struct, omit_defaults=True):
    inputs: list[OutgoingInput]
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[OutgoingOutput] | None = None


class ResponseOutput(msgspec.Struct, omit_defaults=True):
    name: str
    datatype: str
    shape: list[int]
    data: list | None = None  # absent when the tensor travels as binary
    parameters: Parameters | None = None


class InferResponse(msgspec.Struct, omit_defaults=True):
    model_name: str
    outputs: list[ResponseOutput]
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters | None = None


@dataclass(slots=True)
class DecodedRequest:
    """An infer request after decoding: arrays keyed by input name, in request order."""

    inputs: dict[str, np.ndarray]
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[str] | None = None
    # names of requested outputs that asked for binary_data (true or false)
    output_binary: dict[str, bool] | None = None

    def binary_outputs(self, names: list[str]) -> frozenset[str]:
        """Which of ``names`` go back as binary: the per-output ``binary_data``
        parameter wins over the request-level ``binary_data_output``."""
        if not self.parameters and not self.output_binary:
            return _NONE
        default = bool((self.parameters or {}).get("binary_data_output", False))
        per = self.output_binary or {}
        return frozenset(n for n in names if per.get(n, default))


_NONE: frozenset[str] = frozenset()
_REQUEST_DECODER = msgspec.json.Decoder(InferRequest)
_ANY_DECODER = msgspec.json.Decoder()
_FLOAT_LIST = msgspec.json.Decoder(list[float])
_INT_LIST = msgspec.json.Decoder(list[int])
_BOOL_LIST = msgspec.json.Decoder(list[bool])
_STR_LIST = msgspec.json.Decoder(list[str])
_ENCODER = msgspec.json.Encoder()


def _flat_decoder(datatype: str) -> msgspec.json.Decoder:
    if datatype in FLOAT_DATATYPES:
        return _FLOAT_LIST
    if datatype in INT_DATATYPES:
        return _INT_LIST
    if datatype == "BOOL":
        return _BOOL_LIST
    return _STR_LIST


def _nested_to_array(name: str, datatype: str, raw: bytes) -> np.ndarray:
    """Slow path for nested ``data``: decode generically, then check that the
    nesting is rectangular and every leaf has the datatype's JSON kind."""
    value = _ANY_DECODER.decode(raw)
    try:
        arr = np.array(value)
    except ValueError:
        arr = np.empty(0, dtype=object)  # ragged: reported below
    kind = arr.dtype.kind
    ok = (
        (datatype in FLOAT_DATATYPES and kind in "iuf")
        or (datatype in INT_DATATYPES and kind in "iu")
        or (datatype == "BOOL" and kind == "b")
        or (datatype == "BYTES" and kind == "U")
    )
    if not ok:
        expected = {"BOOL": "booleans", "BYTES": "strings"}.get(
            datatype, "integers" if datatype in INT_DATATYPES else "numbers"
        )
        raise InvalidInputError(
            f"input {name!r}: data must be a flat or rectangular nested list of "
            f"{expected} for datatype {datatype}"
        )
    return arr.ravel()


def _decode_data(inp: RequestInput, count: int) -> np.ndarray:
    raw = bytes(inp.data)
    if not raw:
        raise InvalidInputError(f"input {inp.name!r}: 'data' is required")
    dtype = numpy_dtype(inp.datatype)
    try:
        values = _flat_decoder(inp.datatype).decode(raw)
    except msgspec.ValidationError:
        flat = _nested_to_array(inp.name, inp.datatype, raw)
    else:
        flat = values
    n = len(flat)
    if n != count:
        raise InvalidInputError(
            f"input {inp.name!r}: shape {inp.shape} needs {count} elements, data has {n}"
        )
    try:
        if inp.datatype == "BYTES":
            arr = np.empty(n, dtype=object)
            arr[:] = [s.encode() for s in flat]
        else:
            arr = np.asarray(flat, dtype=dtype)
    except OverflowError:
        raise InvalidInputError(
            f"input {inp.name!r}: a value is out of range for {inp.datatype}"
        ) from None
    return arr.reshape(inp.shape)


def decode_infer_request(
    body: bytes, *, max_elements: int = 1 << 24, header_length: int | None = None
) -> DecodedRequest:
    """Decode a V2 infer request into NumPy arrays.

    ``header_length`` is the ``Inference-Header-Content-Length`` of a binary
    request: the JSON is ``body[:header_length]`` and inputs carrying the
    ``binary_data_size`` parameter take their bytes, in order, from the rest.
    ``max_elements`` caps each input's element count (checked on the declared
    shape, before any data is converted). Raises InvalidInputError with the
    offending field for anything malformed.
    """
    view = memoryview(body)
    if header_length is None:
        header, binary = view, view[:0]
    else:
        if not 0 < header_length <= len(body):
            raise InvalidInputError(
                f"Inference-Header-Content-Length {header_length} must lie in [1, {len(body)}] "
                "(the body's length)"
            )
        header, binary = view[:header_length], view[header_length:]
    try:
        req = _REQUEST_DECODER.decode(header)
    except msgspec.ValidationError as exc:
        raise InvalidInputError(f"invalid infer request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidInputError(f"request body is not valid JSON: {exc}") from None
    if not req.inputs:
        raise InvalidInputError("'inputs' must hold at least one tensor")
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for inp in req.inputs:
        if inp.name in arrays:
            raise InvalidInputError(f"input {inp.name!r} appears more than once")
        numpy_dtype(inp.datatype)  # unknown datatype -> clear error
        count = check_shape(inp.name, inp.shape, max_elements)
        size = (inp.parameters or {}).get("binary_data_size")
        if size is None:
            arrays[inp.name] = _decode_data(inp, count)
            continue
        if header_length is None:
            raise InvalidInputError(
                f"input {inp.name!r} has binary_data_size but the request has no "
                "Inference-Header-Content-Length header"
            )
        if bytes(inp.data):
            raise InvalidInputError(f"input {inp.name!r} has both 'data' and binary_data_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidInputError(f"input {inp.name!r}: binary_data_size must be a non-negative integer")
        if offset + size > len(binary):
            raise InvalidInputError(
                f"input {inp.name!r}: binary_data_size {size} runs past the end of the body "
                f"({len(binary) - offset} bytes left)"
            )
        arrays[inp.name] = tensor_from_raw(inp.name, inp.datatype, inp.shape, binary[offset : offset + size], count)
        offset += size
    if offset != len(binary):
        raise InvalidInputError(
            f"{len(binary) - offset} bytes after the JSON header are not claimed by any "
            "input's binary_data_size"
        )
    outputs = output_binary = None
    if req.outputs is not None:
        outputs = [o.name for o in req.outputs]
        if len(set(outputs)) != len(outputs):
            raise InvalidInputError("'outputs' names a tensor more than once")
        output_binary = {
            o.name: bool(o.parameters["binary_data"])
            for o in req.outputs
            if o.parameters and "binary_data" in o.parameters
        }
    return DecodedRequest(arrays, req.id, req.parameters, outputs, output_binary)


def select_outputs(
    outputs: dict[str, np.ndarray], requested: list[str] | None
) -> dict[str, np.ndarray]:
    """The outputs a request asked for (all of them when it named none)."""
    if requested is None:
        return outputs
    unknown = [n for n in requested if n not in outputs]
    if unknown:
        raise InvalidInputError(
            f"unknown requested output(s) {unknown}; the model's outputs are {sorted(outputs)}"
        )
    return {n: outputs[n] for n in requested}


def _tensor_data(name: str, arr: np.ndarray) -> list:
    flat = arr.reshape(-1)
    if flat.dtype.kind in "OSU":
        try:
            return [v.decode() if isinstance(v, bytes) else str(v) for v in flat]
        except UnicodeDecodeError:
            raise FlywheelError(
                f"output {name!r} holds BYTES that are not UTF-8 and cannot travel as JSON"
            ) from None
    return flat.tolist()


def encode_response(
    model_name: str,
    model_version: str | None,
    outputs: dict[str, np.ndarray],
    request_id: str | None = None,
    binary: frozenset[str] | set[str] = frozenset(),
) -> tuple[bytes, int]:
    """Encode output arrays as a V2 infer response.

    Outputs named in ``binary`` travel as raw bytes after the JSON (with
    ``binary_data_size``). Returns the body and the JSON header's length when
    anything is binary (for ``Inference-Header-Content-Length``), else 0.
    """
    tensors, raw = [], []
    for name, arr in outputs.items():
        out = ResponseOutput(name=name, datatype=v2_datatype(arr.dtype), shape=list(arr.shape))
        if name in binary:
            chunk = tensor_to_raw(arr)
            raw.append(chunk)
            out.parameters = {"binary_data_size": len(chunk)}
        else:
            out.data = _tensor_data(name, arr)
        tensors.append(out)
    header = _ENCODER.encode(
        InferResponse(model_name=model_name, model_version=model_version, id=request_id, outputs=tensors)
    )
    if not raw:
        return header, 0
    return b"".join([header, *raw]), len(header)


def encode_infer_response(
    model_name: str,
    model_version: str | None,
    outputs: dict[str, np.ndarray],
    request_id: str | None = None,
) -> bytes:
    """Encode output arrays as a V2 JSON infer response (no binary outputs)."""
    return encode_response(model_name, model_version, outputs, request_id)[0]


def encode_json(value: object) -> bytes:
    """Encode any msgspec-serialisable value (metadata, errors) as JSON."""
    return _ENCODER.encode(value)
