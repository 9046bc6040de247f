"""Output tensors of an encoded infer reply (for shadow comparisons).

Off the request path: a shadow comparison runs after the caller's answer was
written. Replies come from our own model servers, so a reply that does not
parse is a bug; it raises InvalidInputError and the comparison is skipped.
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
