"""V2 gRPC messages <-> NumPy, and routing fields read from raw bytes.

The ingress forwards ModelInfer requests as the bytes gRPC received; it only
needs the model name and version, which :func:`peek_route` reads by walking
the top-level protobuf fields without parsing (or copying) the tensors. The
replica then parses the message once with :func:`decode_grpc_request`.
"""

from __future__ import annotations

import numpy as np
from google.protobuf.message import DecodeError

from flywheel.protocol.codec import DecodedRequest
from flywheel.protocol.datatypes import numpy_dtype, v2_datatype
from flywheel.protocol.errors import InvalidInputError
from flywheel.protocol.raw import tensor_from_raw, tensor_to_raw
from flywheel.protocol.shapes import check_shape
from flywheel.protocol.proto import inference_pb2 as pb

# Which InferTensorContents field carries each datatype (FP16: raw only).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise InvalidInputError("malformed ModelInferRequest: truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def peek_route(buf: bytes) -> tuple[str, str]:
    """(model_name, model_version) of a serialized ModelInferRequest."""
    return peek_fields(buf)[:2]


def peek_fields(buf: bytes) -> tuple[str, str, str]:
    """(model_name, model_version, id) of a serialized ModelInferRequest."""
    name = version = rid = ""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > end:
                raise InvalidInputError("malformed ModelInferRequest: field runs past the end")
            if field in (1, 2, 3):
                try:
                    text = bytes(buf[pos : pos + size]).decode()
                except UnicodeDecodeError:
                    raise InvalidInputError("model_name/model_version/id must be UTF-8") from None
                if field == 1:
                    name = text
                elif field == 2:
                    version = text
                else:
                    rid = text
            pos += size
        elif wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise InvalidInputError(f"malformed ModelInferRequest: wire type {wire}")
    if pos != end:
        raise InvalidInputError("malformed ModelInferRequest: truncated field")
    return name, version, rid


def _param_value(p: pb.InferParameter):
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def _params(m) -> dict:
    return {k: _param_value(v) for k, v in m.items()}


def decode_grpc_request(payload: bytes, *, max_elements: int) -> DecodedRequest:
    """Parse a serialized ModelInferRequest into arrays (typed contents or
    raw_input_contents). Raises InvalidInputError naming the tensor."""
    try:
        req = pb.ModelInferRequest.FromString(payload)
    except DecodeError as exc:
        raise InvalidInputError(f"malformed ModelInferRequest: {exc}") from None
    if not req.inputs:
        raise InvalidInputError("'inputs' must hold at least one tensor")
    raw = req.raw_input_contents
    if raw:
        typed = [i.name for i in req.inputs if i.HasField("contents")]
        if typed:
            raise InvalidInputError(
                f"raw_input_contents is used, so no input may also set contents (but {typed} do)"
            )
        if len(raw) != len(req.inputs):
            raise InvalidInputError(
                f"{len(raw)} raw_input_contents for {len(req.inputs)} inputs; expected one per input"
            )
    arrays: dict[str, np.ndarray] = {}
    for i, inp in enumerate(req.inputs):
        if inp.name in arrays:
            raise InvalidInputError(f"input {inp.name!r} appears more than once")
        dtype = numpy_dtype(inp.datatype)
        shape = list(inp.shape)
        count = check_shape(inp.name, shape, max_elements)
        if raw:
            arrays[inp.name] = tensor_from_raw(inp.name, inp.datatype, shape, raw[i], count)
            continue
        field = _CONTENTS_FIELD.get(inp.datatype)
        if field is None:
            raise InvalidInputError(f"input {inp.name!r}: {inp.datatype} travels only as raw_input_contents")
        values = getattr(inp.contents, field)
        if len(values) != count:
            raise InvalidInputError(
                f"input {inp.name!r}: shape {shape} needs {count} elements, "
                f"contents.{field} has {len(values)}"
            )
        try:
            if inp.datatype == "BYTES":
                arr = np.empty(count, dtype=object)
                arr[:] = list(values)
            else:
                arr = np.array(values, dtype=dtype)
        except OverflowError:
            raise InvalidInputError(f"input {inp.name!r}: a value is out of range for {inp.datatype}") from None
        arrays[inp.name] = arr.reshape(shape)
    outputs = [o.name for o in req.outputs] or None
    if outputs and len(set(outputs)) != len(outputs):
        raise InvalidInputError("'outputs' names a tensor more than once")
    return DecodedRequest(arrays, req.id or None, _params(req.parameters), outputs)


def encode_grpc_response(
    model_name: str, model_version: str, outputs: dict[str, np.ndarray], request_id: str | None
) -> bytes:
    """A serialized ModelInferResponse with every output in raw_output_contents
    (what tritonclient reads)."""
    resp = pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=request_id or "")
    for name, arr in outputs.items():
        resp.outputs.add(name=name, datatype=v2_datatype(arr.dtype), shape=arr.shape)
        resp.raw_output_contents.append(tensor_to_raw(arr))
    return resp.SerializeToString()
