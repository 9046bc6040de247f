"""The demo deployment on real Ray Serve, checked with tritonclient (an
independent V2 client) and against ONNX Runtime run directly."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient

pytestmark = pytest.mark.integration


@pytest.fixture
def client(demo):
    c = httpclient.InferenceServerClient(url=demo.url.removeprefix("http://"))
    yield c
    c.close()


def test_health_and_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("digits")
    assert client.is_model_ready("digits", "1")
    meta = client.get_model_metadata("digits")
    assert meta["name"] == "digits"
    assert meta["versions"] == ["1"]
    assert meta["platform"] == "onnx_onnxv1"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    server = client.get_server_metadata()
    assert server["name"] == "flywheel"


@pytest.mark.parametrize("rows, version", [(1, ""), (7, "1"), (64, "")])
def test_infer_equals_onnxruntime(client, digits_model, rows, version):
    x = np.random.default_rng(rows).random((rows, 64), dtype=np.float32)
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=False)
    out = httpclient.InferRequestedOutput("logits", binary_data=False)
    result = client.infer("digits", [inp], outputs=[out], model_version=version, request_id="r1")
    got = result.as_numpy("logits")
    want = ort.InferenceSession(digits_model.onnx_path).run(None, {"input": x})[0]
    assert got.shape == (rows, 10)
    assert np.abs(got - want).max() <= 1e-5
    resp = result.get_response()
    assert resp["model_name"] == "digits"
    assert resp["model_version"] == "1"
    assert resp["id"] == "r1"


def test_demo_example_request_is_classified_correctly(client, digits_model):
    with open(digits_model.example_path) as f:
        example = json.load(f)
    x = np.array(example["inputs"][0]["data"], np.float32).reshape(1, 64)
    inp = httpclient.InferInput("input", [1, 64], "FP32")
    inp.set_data_from_numpy(x, binary_data=False)
    logits = client.infer("digits", [inp]).as_numpy("logits")
    meta = json.loads(open(digits_model.example_path.replace("example_request.json", "metrics.json")).read())
    assert int(logits.argmax()) == meta["label_of_example"]


def test_concurrent_clients_all_get_their_own_answers(demo, digits_model):
    from concurrent.futures import ThreadPoolExecutor

    sess = ort.InferenceSession(digits_model.onnx_path)
    xs = [np.random.default_rng(i).random((1 + i % 3, 64), dtype=np.float32) for i in range(48)]

    def one(x):
        c = httpclient.InferenceServerClient(url=demo.url.removeprefix("http://"))
        try:
            inp = httpclient.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=False)
            return c.infer("digits", [inp]).as_numpy("logits")
        finally:
            c.close()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, xs))
    for x, got in zip(xs, results):
        assert np.abs(got - sess.run(None, {"input": x})[0]).max() <= 1e-5
