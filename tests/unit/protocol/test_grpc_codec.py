from __future__ import annotations

import numpy as np
import pytest

from flywheel.protocol.errors import InvalidInputError
from flywheel.protocol.raw import tensor_to_raw
from flywheel.protocol.grpc_codec import decode_grpc_request, encode_grpc_response, peek_route
from flywheel.protocol.proto import inference_pb2 as pb

CONTENTS = {
    "BOOL": ("bool_contents", [True, False]), "INT8": ("int_contents", [-3, 4]),
    "INT16": ("int_contents", [-300, 4]), "INT32": ("int_contents", [-70000, 4]),
    "INT64": ("int64_contents", [-(2**40), 4]), "UINT8": ("uint_contents", [255, 0]),
    "UINT16": ("uint_contents", [65535, 1]), "UINT32": ("uint_contents", [2**32 - 1, 1]),
    "UINT64": ("uint64_contents", [2**64 - 1, 1]), "FP32": ("fp32_contents", [1.5, -2.0]),
    "FP64": ("fp64_contents", [1e300, -2.0]), "BYTES": ("bytes_contents", [b"a", b"\xff"]),
}


def request(**kw) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name="m", model_version="3", **kw)


@pytest.mark.parametrize("datatype", sorted(CONTENTS))
def test_typed_contents_of_every_datatype(datatype):
    field, values = CONTENTS[datatype]
    req = request()
    inp = req.inputs.add(name="x", datatype=datatype, shape=[1, 2])
    getattr(inp.contents, field).extend(values)
    d = decode_grpc_request(req.SerializeToString(), max_elements=100)
    assert d.inputs["x"].shape == (1, 2)
    assert d.inputs["x"].ravel().tolist() == values


def test_raw_contents_including_fp16_and_bytes():
    x = np.array([[0.5, -1.0]], np.float16)
    s = np.array([b"ab", b""], dtype=object)
    req = request(id="r")
    req.inputs.add(name="x", datatype="FP16", shape=[1, 2])
    req.inputs.add(name="s", datatype="BYTES", shape=[2])
    req.raw_input_contents.extend([tensor_to_raw(x), tensor_to_raw(s)])
    req.outputs.add(name="y")
    req.parameters["p"].int64_param = 5
    d = decode_grpc_request(req.SerializeToString(), max_elements=100)
    np.testing.assert_array_equal(d.inputs["x"], x)
    assert list(d.inputs["s"]) == [b"ab", b""]
    assert d.id == "r"
    assert d.outputs == ["y"]
    assert d.parameters == {"p": 5}


def _err(req) -> str:
    with pytest.raises(InvalidInputError) as info:
        decode_grpc_request(req.SerializeToString(), max_elements=100)
    return info.value.message


def test_contents_and_raw_together_is_invalid():
    req = request()
    req.inputs.add(name="x", datatype="FP32", shape=[1]).contents.fp32_contents.append(1)
    req.raw_input_contents.append(b"\0" * 4)
    assert "no input may also set contents" in _err(req)


@pytest.mark.parametrize(
    "build, fragment",
    [
        (lambda r: r.inputs.add(name="x", datatype="FP16", shape=[1]).contents.fp32_contents.append(1), "only as raw"),
        (lambda r: r.inputs.add(name="x", datatype="FP32", shape=[2]).contents.fp32_contents.append(1), "needs 2 elements"),
        (lambda r: r.inputs.add(name="x", datatype="INT8", shape=[1]).contents.int_contents.append(300), "out of range"),
        (lambda r: r.inputs.add(name="x", datatype="FP32", shape=[1]).contents.int_contents.append(1), "fp32_contents has 0"),
        (lambda r: r.inputs.add(name="x", datatype="WAT", shape=[1]), "unknown datatype"),
        (lambda r: r.inputs.add(name="x", datatype="FP32", shape=[-2]), "non-negative"),
        (lambda r: None, "at least one"),
    ],
)
def test_bad_tensors_name_the_problem(build, fragment):
    req = request()
    build(req)
    assert fragment in _err(req)


def test_raw_count_must_match_inputs():
    req = request()
    req.inputs.add(name="x", datatype="FP32", shape=[1])
    req.inputs.add(name="y", datatype="FP32", shape=[1])
    req.raw_input_contents.append(b"\0" * 4)
    assert "one per input" in _err(req)


def test_garbage_bytes_are_invalid():
    with pytest.raises(InvalidInputError, match="malformed ModelInferRequest"):
        decode_grpc_request(b"\xff\xff\xff", max_elements=10)


def test_peek_route_reads_only_the_routing_fields():
    req = request()
    req.inputs.add(name="x", datatype="FP32", shape=[1])
    req.raw_input_contents.append(b"\0" * 100_000)
    assert peek_route(req.SerializeToString()) == ("m", "3")
    assert peek_route(b"") == ("", "")
    with pytest.raises(InvalidInputError, match="malformed ModelInferRequest: field runs past the end"):
        peek_route(b"\x0a\x05ab")  # model_name claims 5 bytes, has 2


def test_response_uses_raw_output_contents():
    outs = {"y": np.array([[1.5, 2.5]], np.float32), "s": np.array([b"z"], dtype=object)}
    resp = pb.ModelInferResponse.FromString(encode_grpc_response("m", "3", outs, "id"))
    assert (resp.model_name, resp.model_version, resp.id) == ("m", "3", "id")
    assert [(o.name, o.datatype, list(o.shape)) for o in resp.outputs] == [("y", "FP32", [1, 2]), ("s", "BYTES", [1])]
    assert np.frombuffer(resp.raw_output_contents[0], np.float32).tolist() == [1.5, 2.5]
