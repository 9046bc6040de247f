from __future__ import annotations

import json

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from flywheel.protocol.codec import decode_infer_request, encode_infer_response, select_outputs
from flywheel.protocol.errors import InvalidInputError


def _req(datatype, shape, data, name="x", **extra):
    return json.dumps(
        {"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}], **extra}
    ).encode()


NUMERIC = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}


@pytest.mark.parametrize("datatype", sorted(NUMERIC))
def test_every_numeric_datatype_round_trips(datatype):
    dtype = np.dtype(NUMERIC[datatype])
    if dtype.kind == "b":
        arr = np.array([[True, False, True], [False, False, True]])
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        arr = np.array([[info.min, 0, 1], [2, 3, info.max]], dtype=dtype)
    else:
        arr = np.array([[0.5, -1.25, 3.0], [1e-3, 2.0, -7.5]], dtype=dtype)
    decoded = decode_infer_request(_req(datatype, [2, 3], arr.ravel().tolist()))
    got = decoded.inputs["x"]
    assert got.dtype == dtype
    assert got.shape == (2, 3)
    np.testing.assert_array_equal(got, arr)
    body = encode_infer_response("m", "1", {"y": got}, "req-7")
    resp = json.loads(body)
    assert resp["model_name"] == "m"
    assert resp["model_version"] == "1"
    assert resp["id"] == "req-7"
    out = resp["outputs"][0]
    assert out["datatype"] == datatype
    assert out["shape"] == [2, 3]
    np.testing.assert_array_equal(np.array(out["data"], dtype=dtype).reshape(2, 3), arr)


def test_bytes_round_trip():
    decoded = decode_infer_request(_req("BYTES", [3], ["a", "hé", ""]))
    arr = decoded.inputs["x"]
    assert arr.dtype == object
    assert list(arr) == [b"a", "hé".encode(), b""]
    resp = json.loads(encode_infer_response("m", None, {"y": arr}))
    assert resp["outputs"][0]["data"] == ["a", "hé", ""]
    assert "model_version" not in resp


def test_nested_data_equals_flat_data():
    flat = decode_infer_request(_req("FP32", [2, 2], [1, 2, 3, 4])).inputs["x"]
    nested = decode_infer_request(_req("FP32", [2, 2], [[1, 2], [3, 4]])).inputs["x"]
    np.testing.assert_array_equal(flat, nested)


def test_request_fields_are_kept():
    body = _req("INT64", [1], [5], id="abc", parameters={"p": 1}, outputs=[{"name": "y"}])
    d = decode_infer_request(body)
    assert d.id == "abc"
    assert d.parameters == {"p": 1}
    assert d.outputs == ["y"]


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b'{"inputs": [', "not valid JSON"),
        (b"[]", "invalid infer request"),
        (b'{"inputs": []}', "at least one"),
        (_req("FP32", [2], [1.0]), "needs 2 elements, data has 1"),
        (_req("INT32", [1], [1.5]), "'x'"),
        (_req("INT8", [1], [300]), "out of range for INT8"),
        (_req("UINT8", [1], [-1]), "out of range for UINT8"),
        (_req("BOOL", [1], [1]), "booleans"),
        (_req("FP32", [1], ["a"]), "numbers"),
        (_req("FP99", [1], [1.0]), "unknown datatype 'FP99'"),
        (_req("FP32", [-1], [1.0]), "non-negative"),
        (_req("FP32", [1 << 30, 1 << 30], [1.0]), "more than the limit"),
        # found by the fuzzer: zero elements, yet numpy cannot even reshape to it
        (_req("FP32", [0, 1518338048, 1518665728], []), "is empty but its other dimensions multiply"),
        (_req("FP32", [2, 2], [[1, 2], [3]]), "rectangular"),
        (_req("FP32", ["2"], [1.0, 2.0]), "shape"),
        (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}).encode(), "'data' is required"),
        (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}] * 2}).encode(), "more than once"),
        (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1], "bogus": 1}]}).encode(), "bogus"),
    ],
)
def test_malformed_requests_name_the_problem(body, fragment):
    with pytest.raises(InvalidInputError) as info:
        decode_infer_request(body)
    assert fragment in info.value.message


def test_select_outputs_rejects_unknown_names():
    outs = {"a": np.zeros(1), "b": np.ones(1)}
    assert list(select_outputs(outs, ["b"])) == ["b"]
    assert select_outputs(outs, None) is outs
    with pytest.raises(InvalidInputError, match="'c'"):
        select_outputs(outs, ["c"])


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        dtype=st.sampled_from([np.float32, np.float64, np.int32, np.int64, np.uint16, np.bool_]),
        shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=5),
        elements={"allow_nan": False, "allow_infinity": False},
    )
)
def test_property_any_array_survives_encode_then_decode(arr):
    body = encode_infer_response("m", "1", {"x": arr})
    resp = msgspec.json.decode(body)
    out = resp["outputs"][0]
    req = json.dumps({"inputs": [{"name": "x", "shape": out["shape"], "datatype": out["datatype"], "data": out["data"]}]})
    back = decode_infer_request(req.encode()).inputs["x"]
    assert back.dtype == arr.dtype
    np.testing.assert_array_equal(back, arr)
