"""The request path without Ray: a real replica and a real ingress in-process.

ModelReplica and Ingress are plain classes (Ray Serve only places them), so
their servers can be exercised here over real loopback sockets.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time

import numpy as np
import onnxruntime as ort
import pytest

from flywheel.serving.config import ModelConfig, ServerConfig
from flywheel.serving.ingress import Ingress
from flywheel.serving.router import Route
from flywheel.serving.replica import ModelReplica


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(mlp_onnx):
    p1, p2 = free_port(), free_port()
    cfg = ServerConfig(port=free_port(), grpc_port=free_port(), max_body_bytes=200_000,
                       max_tensor_elements=10_000, request_timeout_ms=5_000)
    secret = os.urandom(32)  # the deployment's: replicas and ingress share it
    replicas = [
        ModelReplica(ModelConfig(name="mlp", version="1", path=mlp_onnx), p1, cfg.request_limits(), secret=secret),
        ModelReplica(ModelConfig(name="mlp", version="2", path=mlp_onnx), p2, cfg.request_limits(), secret=secret),
    ]
    ingress = Ingress(cfg, [Route("mlp", "1", p1), Route("mlp", "2", p2), Route("ghost", "1", free_port())],
                      secret=secret)
    yield cfg.port
    ingress.close()
    for r in replicas:
        r.close()


def call(port, method, path, body=None, conn=None):
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request(method, path, body=body, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read()
    return r.status, data


def infer_body(x, **extra):
    return json.dumps(
        {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}], **extra}
    )


def test_infer_matches_onnxruntime_and_names_the_version(server, mlp_onnx):
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    status, body = call(server, "POST", "/v2/models/mlp/versions/1/infer", infer_body(x, id="q1"))
    assert status == 200
    resp = json.loads(body)
    assert resp["model_version"] == "1"
    assert resp["id"] == "q1"
    want = ort.InferenceSession(mlp_onnx).run(None, {"input": x})[0]
    got = np.array(resp["outputs"][0]["data"], np.float32).reshape(resp["outputs"][0]["shape"])
    assert np.abs(got - want).max() <= 1e-5


def test_unversioned_route_goes_to_the_highest_version(server):
    x = np.zeros((1, 64), np.float32)
    status, body = call(server, "POST", "/v2/models/mlp/infer", infer_body(x))
    assert status == 200
    assert json.loads(body)["model_version"] == "2"


def test_metadata_lists_versions_and_tensors(server):
    status, body = call(server, "GET", "/v2/models/mlp")
    meta = json.loads(body)
    assert status == 200
    assert meta["versions"] == ["1", "2"]
    assert meta["platform"] == "onnx_onnxv1"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]


def test_server_health_reflects_an_unreachable_model(server):
    assert call(server, "GET", "/v2/health/live") == (200, b"")
    assert call(server, "GET", "/v2/models/mlp/versions/1/ready")[0] == 200
    status, body = call(server, "GET", "/v2/models/ghost/ready")
    assert status == 503
    assert "not ready" in json.loads(body)["error"]
    assert call(server, "GET", "/v2/health/ready")[0] == 503  # ghost has no replica


@pytest.mark.parametrize(
    "method, path, status",
    [
        ("GET", "/nope", 404),
        ("GET", "/v2/models/nope", 404),
        ("GET", "/v2/models/mlp/versions/9", 404),
        ("GET", "/v2/models/mlp/infer", 405),
        ("POST", "/v2/health/live", 405),
        ("GET", "/v2/models/mlp/versions/1/bogus", 404),
    ],
)
def test_routes_answer_v2_errors(server, method, path, status):
    got, body = call(server, method, path, body=b"" if method == "POST" else None)
    assert got == status
    assert json.loads(body)["error"]


def test_keep_alive_and_pipelined_requests_are_answered_in_order(server):
    x = np.zeros((1, 64), np.float32)
    one = infer_body(x, id="A").encode()
    two = infer_body(x, id="B").encode()
    raw = b""
    for b in (one, two):
        raw += b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(b), b)
    raw += b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server)) as s:
        s.sendall(raw)
        s.settimeout(5)
        data = b""
        deadline = time.time() + 5
        while data.count(b"HTTP/1.1 200") < 3 and time.time() < deadline:
            data += s.recv(65536)
    assert data.count(b"HTTP/1.1 200") == 3
    assert data.index(b'"id":"A"') < data.index(b'"id":"B"')


def test_oversized_body_gets_413_before_it_is_read(server):
    with socket.create_connection(("127.0.0.1", server)) as s:
        s.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n")
        s.settimeout(5)
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 413")
    assert b"exceeds" in head


def test_garbage_http_gets_400_and_the_server_keeps_serving(server):
    with socket.create_connection(("127.0.0.1", server)) as s:
        s.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
        s.settimeout(5)
        assert s.recv(4096).startswith(b"HTTP/1.1 400")
    assert call(server, "GET", "/v2/health/live")[0] == 200


def test_metrics_count_requests_by_outcome(server):
    x = np.zeros((1, 64), np.float32)
    call(server, "POST", "/v2/models/mlp/versions/1/infer", infer_body(x))
    call(server, "POST", "/v2/models/mlp/versions/1/infer", b"{")
    status, text = call(server, "GET", "/metrics")
    text = text.decode()
    assert status == 200
    counts = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("flywheel_requests_total{")}
    assert counts['flywheel_requests_total{model="mlp",outcome="ok",version="1"}'] >= 1
    assert counts['flywheel_requests_total{model="mlp",outcome="invalid_argument",version="1"}'] >= 1
    for family in ("flywheel_request_latency_seconds_bucket", "flywheel_queue_time_seconds_bucket",
                   "flywheel_compute_time_seconds_bucket", "flywheel_batch_size_bucket", "flywheel_queue_depth"):
        assert family in text


def test_expect_100_continue_is_answered_before_the_body(server):
    body = infer_body(np.zeros((1, 64), np.float32)).encode()
    with socket.create_connection(("127.0.0.1", server)) as s:
        s.settimeout(5)
        s.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body))
        assert s.recv(4096).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(body)
        data = b""
        while b'"model_name"' not in data:
            data += s.recv(65536)
    assert data.startswith(b"HTTP/1.1 200")
