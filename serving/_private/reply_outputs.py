"""What the router reads back from an encoded infer reply: its output
tensors (for shadow comparisons, off the request path: a reply that does not
parse is a bug; it raises InvalidInputError and the comparison is skipped)
and the request id a model server named in it.
"""

from __future__ import annotations

import math

import msgspec
import numpy as np

from flywheel.protocol.datatypes import numpy_dtype
from flywheel.protocol.errors import InvalidInputError
from flywheel.protocol.raw import tensor_from_raw
from flywheel.serving._private.wire import OP_INFER_GRPC, Reply


class _Out(msgspec.Struct):
    name: str
    datatype: str
    shape: list[int]
    data: list | None = None
    parameters: dict | None = None


class _Resp(msgspec.Struct):
    outputs: list[_Out]


_RESP = msgspec.json.Decoder(_Resp)


def reply_outputs(op: int, reply: Reply) -> dict[str, np.ndarray]:
    if op == OP_INFER_GRPC:
        from flywheel.protocol.proto import inference_pb2 as pb

        resp = pb.ModelInferResponse.FromString(reply.payload)
        return {
            o.name: tensor_from_raw(o.name, o.datatype, list(o.shape), raw, math.prod(o.shape))
            for o, raw in zip(resp.outputs, resp.raw_output_contents)
        }
    header = reply.payload[: reply.aux] if reply.aux else reply.payload
    try:
        resp = _RESP.decode(header)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise InvalidInputError(f"reply does not parse: {exc}") from None
    out, pos = {}, reply.aux
    for o in resp.outputs:
        count = math.prod(o.shape)
        size = (o.parameters or {}).get("binary_data_size")
        if size is not None:
            out[o.name] = tensor_from_raw(o.name, o.datatype, o.shape, reply.payload[pos : pos + size], count)
            pos += size
        elif o.datatype == "BYTES":
            out[o.name] = np.array(o.data, dtype=object).reshape(o.shape)
        else:
            out[o.name] = np.asarray(o.data, dtype=numpy_dtype(o.datatype)).reshape(o.shape)
    return out


class _Id(msgspec.Struct):
    id: str | None = None


_ID = msgspec.json.Decoder(_Id)
_ID_WITHIN = 512  # the V2 JSON reply names its id before its outputs


def reply_request_id(op: int, reply: Reply) -> str | None:
    """The ``id`` a model server put in its reply (it makes one for a
    request it captured, so that labels name the captured rows), or None.
    Read only where it can be: within the JSON head of an HTTP reply, or
    the gRPC message's field."""
    try:
        if op == OP_INFER_GRPC:
            return _grpc_id(reply.payload)
        head = reply.payload[:reply.aux] if reply.aux else reply.payload
        if head.find(b'"id"', 0, _ID_WITHIN) < 0:
            return None
        return _ID.decode(head).id
    except Exception:  # noqa: BLE001 - a reply we cannot read names no id
        return None


def _grpc_id(buf: bytes) -> str | None:
    """Field 3 (``id``) of a ModelInferResponse, read from the head of its
    encoding (fields 1-3 are length-delimited strings written in order), so
    that the outputs are never parsed."""
    i, n = 0, len(buf)
    while i < n:
        tag = buf[i]
        i += 1
        if tag & 7 != 2 or tag >> 3 > 3:
            return None
        length = shift = 0
        while True:
            b = buf[i]
            i += 1
            length |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        if tag >> 3 == 3:
            return buf[i:i + length].decode() or None
        i += length
    return None
