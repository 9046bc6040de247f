"""The binary tensor data extension of the V2 HTTP codec."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flywheel.protocol.codec import decode_infer_request, encode_response
from flywheel.protocol.errors import InvalidInputError
from flywheel.protocol.raw import tensor_to_raw


def binary_request(tensors: dict[str, np.ndarray], datatypes: dict[str, str], json_inputs=(), **extra):
    inputs, raws = [], []
    for name, arr in tensors.items():
        raw = tensor_to_raw(arr)
        raws.append(raw)
        inputs.append({"name": name, "shape": list(arr.shape), "datatype": datatypes[name],
                       "parameters": {"binary_data_size": len(raw)}})
    header = json.dumps({"inputs": inputs + list(json_inputs), **extra}).encode()
    return header + b"".join(raws), len(header)


def test_binary_and_json_inputs_mix_in_one_request():
    x = np.arange(6, dtype=np.float16).reshape(2, 3)
    s = np.array([b"a", b"bc"], dtype=object)
    body, hl = binary_request({"x": x, "s": s}, {"x": "FP16", "s": "BYTES"},
                              json_inputs=[{"name": "n", "shape": [1], "datatype": "INT64", "data": [7]}])
    d = decode_infer_request(body, header_length=hl)
    np.testing.assert_array_equal(d.inputs["x"], x)
    assert list(d.inputs["s"]) == [b"a", b"bc"]
    assert d.inputs["n"].tolist() == [7]


def test_binary_outputs_follow_the_json_header():
    outs = {"a": np.array([[1.5, 2.5]], np.float32), "b": np.array([1, 2], np.int64)}
    body, hl = encode_response("m", "1", outs, "id", frozenset({"a"}))
    header = json.loads(body[:hl])
    a, b = header["outputs"]
    assert a["parameters"] == {"binary_data_size": 8}
    assert "data" not in a
    assert b["data"] == [1, 2]
    assert np.frombuffer(body[hl:], np.float32).tolist() == [1.5, 2.5]


def test_all_json_response_has_no_header_length():
    body, hl = encode_response("m", "1", {"a": np.zeros(1, np.float32)})
    assert hl == 0
    assert json.loads(body)["outputs"][0]["data"] == [0.0]


@pytest.mark.parametrize(
    "params, outputs, names, want",
    [
        ({"binary_data_output": True}, None, ["a", "b"], {"a", "b"}),
        ({"binary_data_output": True}, [{"name": "a", "parameters": {"binary_data": False}}, {"name": "b"}], ["a", "b"], {"b"}),
        (None, [{"name": "a", "parameters": {"binary_data": True}}], ["a"], {"a"}),
        (None, None, ["a"], set()),
    ],
)
def test_per_output_binary_flag_wins_over_request_level(params, outputs, names, want):
    req = {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}
    if params:
        req["parameters"] = params
    if outputs:
        req["outputs"] = outputs
    d = decode_infer_request(json.dumps(req).encode())
    assert d.binary_outputs(names) == want


def _one(size_param, tail=b"", data=None):
    inp = {"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": size_param}}
    if data is not None:
        inp["data"] = data
    header = json.dumps({"inputs": [inp]}).encode()
    return header + tail, len(header)


@pytest.mark.parametrize(
    "body_hl, fragment",
    [
        (_one(8, b"\0" * 4), "runs past the end"),
        (_one(4, b"\0" * 4), "4 raw bytes do not match"),
        (_one(8, b"\0" * 12), "not claimed"),
        (_one(8, b"\0" * 8, data=[1, 2]), "both 'data' and binary_data_size"),
        (_one(-1, b""), "non-negative integer"),
        ((b'{"inputs": []}', 99), "must lie in [1, 14]"),
    ],
)
def test_malformed_framing_is_an_invalid_input(body_hl, fragment):
    body, hl = body_hl
    with pytest.raises(InvalidInputError) as info:
        decode_infer_request(body, header_length=hl)
    assert fragment in info.value.message


def test_binary_size_without_the_header_is_rejected():
    body, _ = _one(8, b"")
    with pytest.raises(InvalidInputError, match="Inference-Header-Content-Length"):
        decode_infer_request(body)
