"""Tracing and the access log on the real request path, without Ray: an
in-process Ingress serving a colocated ONNX model over real HTTP and gRPC
(tritonclient), spans exported to a real OTLP/HTTP receiver (tests/_otlp.py)."""

from __future__ import annotations

import http.client
import json
import socket

import numpy as np
import pytest
import tritonclient.grpc as tg

from flywheel.serving.config import AccessLogConfig, ModelConfig, ServerConfig, TracingConfig
from flywheel.serving.ingress import Ingress

from _otlp import OtlpReceiver
from _poll import wait_for

TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"
STEPS = {"route", "decode", "queue", "compute", "encode"}
KEY = "fwk_0123456789ab_" + "s" * 43


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _body(x: np.ndarray) -> str:
    return json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]})


def _post(port: int, path: str, body: str, headers: dict[str, str]):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("POST", path, body=body, headers={"Content-Type": "application/json", **headers})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, dict((k.lower(), v) for k, v in r.getheaders()), data


@pytest.fixture(scope="module")
def traced(mlp_onnx, tmp_path_factory):
    receiver = OtlpReceiver()
    log_path = tmp_path_factory.mktemp("access") / "access.jsonl"
    cfg = ServerConfig(port=free_port(), grpc_port=free_port(), grpc_server="grpcio",
                       tracing=TracingConfig(otlp_endpoint=receiver.url, service_name="flywheel-test"),
                       access_log=AccessLogConfig(sample=1.0, path=str(log_path)))
    ingress = Ingress(cfg, [], colocated=[ModelConfig(name="mlp", version="2", path=mlp_onnx)])
    yield cfg, receiver, log_path
    ingress.close()
    receiver.close()


@pytest.fixture(scope="module")
def untraced(mlp_onnx):
    cfg = ServerConfig(port=free_port(), grpc_port=-1)
    ingress = Ingress(cfg, [], colocated=[ModelConfig(name="mlp", version="1", path=mlp_onnx)])
    yield cfg
    ingress.close()


def _children_of_request(receiver: OtlpReceiver, trace_id: str, parent: str):
    """The request span (whose parent is ``parent``) and its children, once
    all six have arrived."""
    def done():
        spans = receiver.trace(trace_id)
        roots = [s for s in spans if s.parent_id == parent]
        if len(roots) != 1:
            return None
        kids = [s for s in spans if s.parent_id == roots[0].span_id]
        return (roots[0], kids) if {k.name for k in kids} >= STEPS else None
    return wait_for(done, 15, f"the spans of trace {trace_id}")


def test_http_request_spans_follow_the_callers_traceparent(traced):
    cfg, receiver, _ = traced
    x = np.ones((2, 64), np.float32)
    status, headers, _ = _post(cfg.port, "/v2/models/mlp/infer", _body(x),
                               {"traceparent": f"00-{TRACE}-{PARENT}-01"})
    assert status == 200
    assert headers["traceparent"].startswith(f"00-{TRACE}-")
    root, kids = _children_of_request(receiver, TRACE, PARENT)
    assert root.name == "infer"
    assert headers["traceparent"].split("-")[2] == root.span_id
    assert root.attributes["flywheel.model"] == "mlp"
    assert root.attributes["flywheel.model_version"] == "2"
    assert root.attributes["flywheel.outcome"] == "ok"
    assert root.attributes["flywheel.batch_rows"] == 2
    assert root.service == "flywheel-test"
    assert sorted(k.name for k in kids) == sorted(STEPS)
    order = {k.name: k for k in kids}
    assert order["decode"].end_ns <= order["queue"].start_ns <= order["compute"].start_ns <= order["encode"].start_ns


def test_grpc_request_spans_follow_the_traceparent_metadata(traced):
    cfg, receiver, _ = traced
    trace, parent = "1" * 32, "2" * 16
    client = tg.InferenceServerClient(url=f"127.0.0.1:{cfg.grpc_port}")
    inp = tg.InferInput("input", [1, 64], "FP32")
    inp.set_data_from_numpy(np.ones((1, 64), np.float32))
    client.infer("mlp", [inp], headers={"traceparent": f"00-{trace}-{parent}-01"})
    client.close()
    root, kids = _children_of_request(receiver, trace, parent)
    assert root.attributes["flywheel.transport"] == "grpc"
    assert {k.name for k in kids} == STEPS


def test_malformed_traceparent_starts_a_new_trace(traced):
    cfg, receiver, _ = traced
    status, headers, _ = _post(cfg.port, "/v2/models/mlp/infer", _body(np.ones((1, 64), np.float32)),
                               {"traceparent": "00-nothex-zz-01"})
    assert status == 200
    new_trace = headers["traceparent"].split("-")[1]
    root, _ = _children_of_request(receiver, new_trace, "")
    assert root.name == "infer"


def test_a_failed_request_is_traced_with_its_outcome(traced):
    cfg, receiver, _ = traced
    trace = "3" * 32
    status, headers, _ = _post(cfg.port, "/v2/models/nosuch/infer", "{}", {"traceparent": f"00-{trace}-{'4' * 16}-01"})
    assert status == 404
    assert headers["traceparent"].startswith(f"00-{trace}-")
    root = wait_for(lambda: next((s for s in receiver.trace(trace) if s.name == "infer"), None), 15, "the span")
    assert root.attributes["flywheel.outcome"] == "not_found"


def test_spans_hold_no_tensor_data_and_no_credentials(traced):
    cfg, receiver, _ = traced
    marker = np.full((1, 64), 12345.678, np.float32)
    trace = "5" * 32
    _post(cfg.port, "/v2/models/mlp/infer", _body(marker),
          {"traceparent": f"00-{trace}-{'6' * 16}-01", "Authorization": f"Bearer {KEY}"})
    _children_of_request(receiver, trace, "6" * 16)
    raw = b"".join(receiver.bodies)
    assert b"12345.67" not in raw
    assert KEY.encode() not in raw


def test_access_log_line_has_the_status_and_no_authorization(traced):
    cfg, _, log_path = traced
    rid = "access-log-probe"
    status, _, _ = _post(cfg.port, "/v2/models/mlp/infer?x=1", _body(np.ones((1, 64), np.float32)),
                         {"Authorization": f"Bearer {KEY}", "flywheel-request-id": rid})

    def line():
        for raw in log_path.read_text().splitlines():
            rec = json.loads(raw)
            if rec["request_id"] == rid:
                return rec, raw
        return None

    rec, raw = wait_for(line, 10, "the access log line")
    assert rec["status"] == status == 200
    assert (rec["method"], rec["path"], rec["model"], rec["version"]) == ("POST", "/v2/models/mlp/infer", "mlp", "2")
    assert rec["bytes_in"] > 0 and rec["bytes_out"] > 0
    assert rec["client"].startswith("127.0.0.1:")
    assert KEY not in raw
    assert "Bearer" not in raw


def test_tracing_off_answers_a_traceparent_request_without_one(untraced):
    status, headers, body = _post(untraced.port, "/v2/models/mlp/infer", _body(np.ones((1, 64), np.float32)),
                                  {"traceparent": f"00-{TRACE}-{PARENT}-01"})
    assert status == 200
    assert "traceparent" not in headers
    assert json.loads(body)["outputs"][0]["shape"] == [1, 10]
