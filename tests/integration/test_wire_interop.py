"""tritonclient over gRPC and over HTTP (binary and JSON) against the real
deployment, for FP32, FP16, INT64, BOOL and BYTES, compared with ONNX Runtime
run directly on the same inputs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

pytestmark = pytest.mark.integration

# one value set per datatype of the `types` model (identity per datatype)
VALUES = {
    "BOOL": np.array([[True, False], [False, True]]),
    "UINT8": np.array([[0, 255], [1, 2]], np.uint8), "UINT16": np.array([[0, 65535], [1, 2]], np.uint16),
    "UINT32": np.array([[0, 2**32 - 1], [1, 2]], np.uint32), "UINT64": np.array([[0, 2**64 - 1], [1, 2]], np.uint64),
    "INT8": np.array([[-128, 127], [1, 2]], np.int8), "INT16": np.array([[-3, 3], [1, 2]], np.int16),
    "INT32": np.array([[-3, 3], [1, 2]], np.int32), "INT64": np.array([[-(2**62), 2**62], [1, 2]], np.int64),
    "FP16": np.array([[0.5, -65504], [1e-3, 2]], np.float16), "FP32": np.array([[0.1, -3e38], [1, 2]], np.float32),
    "FP64": np.array([[0.1, 1e300], [1, 2]], np.float64),
    "BYTES": np.array([[b"hello", b""], [b"\xc3\xa9t\xc3\xa9", b"x" * 100]], dtype=object),
}
CHECKED = ("FP32", "FP16", "INT64", "BOOL", "BYTES")
TRANSPORTS = ["grpc", "http-binary", "http-json"]


def _client(demo, transport):
    if transport == "grpc":
        return grpcclient, grpcclient.InferenceServerClient(url=demo.grpc_target)
    return httpclient, httpclient.InferenceServerClient(url=demo.url.removeprefix("http://"))


def _input(mod, transport, name, arr, datatype):
    inp = mod.InferInput(name, list(arr.shape), datatype)
    if transport == "grpc":
        inp.set_data_from_numpy(arr)
    else:
        inp.set_data_from_numpy(arr, binary_data=transport == "http-binary")
    return inp


def _output(mod, transport, name):
    if transport == "grpc":
        return mod.InferRequestedOutput(name)
    return mod.InferRequestedOutput(name, binary_data=transport == "http-binary")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_health_and_metadata_on_every_transport(demo, transport):
    mod, client = _client(demo, transport)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("types")
    assert client.is_model_ready("digits", "1")
    meta = client.get_model_metadata("digits", as_json=True) if transport == "grpc" else client.get_model_metadata("digits")
    assert meta["name"] == "digits"
    assert meta["platform"] == "onnx_onnxv1"
    assert meta["inputs"][0]["name"] == "input"
    assert meta["inputs"][0]["datatype"] == "FP32"
    assert [int(d) for d in meta["inputs"][0]["shape"]] == [-1, 64]
    server = client.get_server_metadata(as_json=True) if transport == "grpc" else client.get_server_metadata()
    assert "binary_tensor_data" in server["extensions"]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("datatype", CHECKED)
def test_each_datatype_round_trips_like_onnxruntime(demo, multi_type_onnx, transport, datatype):
    mod, client = _client(demo, transport)
    inputs = [_input(mod, transport, f"in_{dt}", arr, dt) for dt, arr in VALUES.items()]
    result = client.infer("types", inputs, outputs=[_output(mod, transport, f"out_{datatype}")])
    got = result.as_numpy(f"out_{datatype}")
    feed = {f"in_{dt}": arr for dt, arr in VALUES.items()}
    feed["in_BYTES"] = np.vectorize(bytes.decode, otypes=[object])(VALUES["BYTES"])
    want = ort.InferenceSession(multi_type_onnx).run([f"out_{datatype}"], feed)[0]
    if datatype == "BYTES":
        as_text = [v.decode() if isinstance(v, bytes) else v for v in got.ravel()]
        assert as_text == list(want.ravel())
    else:
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_digits_fp32_matches_onnxruntime(demo, digits_model, transport):
    mod, client = _client(demo, transport)
    x = np.random.default_rng(5).random((9, 64), dtype=np.float32)
    result = client.infer("digits", [_input(mod, transport, "input", x, "FP32")], model_version="1")
    want = ort.InferenceSession(digits_model.onnx_path).run(None, {"input": x})[0]
    assert np.abs(result.as_numpy("logits") - want).max() <= 1e-5
