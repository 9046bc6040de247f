"""The internal hops are no side door: a real model replica and a real drift
monitor (in-process, over loopback) answer nothing and handle nothing on a
connection that does not prove the deployment's secret, while the ingress,
which knows it, serves end to end (its request reaches the replica, whose
sampled rows reach the monitor)."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import struct

import numpy as np
import pytest

from flywheel.serving._private import wire
from flywheel.serving.config import DriftConfig, ModelConfig, ServerConfig
from flywheel.serving.drift_monitor import DriftMonitor, encode_samples
from flywheel.serving.ingress import Ingress
from flywheel.serving.replica import ModelReplica
from flywheel.serving.router import Route

from _poll import wait_for

SECRET = os.urandom(32)
HEAD = struct.Struct("<IIBII")
ROWS = re.compile(r'^flywheel_drift_sampled_rows_total\{model="mlp",version="1"\} (\S+)$', re.M)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def deployment(mlp_onnx, tmp_path_factory):
    ref = tmp_path_factory.mktemp("drift") / "ref.npy"
    np.save(ref, np.random.default_rng(0).normal(size=(500, 64)))
    # every request sampled and shipped at once: a handled request shows as a row
    drift = DriftConfig(enabled=True, sample_rate=1.0, batch_rows=1, flush_interval_s=0.05, window=10_000,
                        reference=str(ref))
    model = ModelConfig(name="mlp", version="1", path=mlp_onnx, drift=drift)
    cfg = ServerConfig(port=free_port(), grpc_port=-1)
    model_port, drift_port = free_port(), free_port()
    monitor = DriftMonitor(drift_port, [model], secret=SECRET)
    replica = ModelReplica(model, model_port, cfg.request_limits(), drift_port=drift_port, secret=SECRET)
    ingress = Ingress(cfg, [Route("mlp", "1", model_port)], drift_port=drift_port, secret=SECRET)
    yield {"http": cfg.port, "model": model_port, "drift": drift_port, "replica": replica, "monitor": monitor}
    ingress.close()
    replica.close()
    monitor.close()


def _http(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _infer_body() -> bytes:
    tensor = {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}
    return json.dumps({"inputs": [tensor]}).encode()


def _metrics(dep) -> str:
    status, body = _http(dep["http"], "GET", "/metrics")
    assert status == 200
    return body.decode()


def _sampled_rows(dep) -> float:
    found = ROWS.search(_metrics(dep))
    return float(found.group(1)) if found else 0.0


def _unanswered(port: int, frame: bytes, proof: bytes | None) -> bytes:
    """Send ``frame`` on a raw connection, after ``proof`` (None: no proof
    at all); what came back after the server's hello (b"": nothing)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        hello = b""
        while len(hello) < 4 + wire.NONCE:
            hello += raw.recv(4 + wire.NONCE - len(hello))
        assert hello[:4] == b"FWF1"
        raw.sendall((proof or b"") + frame)
        got = b""
        while chunk := raw.recv(65536):
            got += chunk
        return got


def _wrong_proof() -> bytes:
    return b"n" * wire.NONCE + b"p" * 32


def _one_request_adds_exactly_one_row(dep, before: float) -> None:
    """The ingress's own traffic works end to end, and the monitor got one
    row: the frames refused before it were never handled (each would have
    been sampled and shipped first)."""
    status, body = _http(dep["http"], "POST", "/v2/models/mlp/infer", _infer_body())
    assert status == 200, body
    wait_for(lambda: _sampled_rows(dep) >= before + 1, 30, "the request's sampled row at the monitor")
    assert _sampled_rows(dep) == before + 1


@pytest.mark.parametrize("proof", [None, _wrong_proof()], ids=["no-proof", "wrong-proof"])
def test_the_model_replica_answers_and_handles_nothing_without_the_secret(deployment, proof):
    before_rows, before_refused = _sampled_rows(deployment), deployment["replica"].frame_stats()["refused"]
    frame = HEAD.pack(len(_infer_body()), 1, wire.OP_INFER, 0, 0) + _infer_body()
    assert _unanswered(deployment["model"], frame, proof) == b""
    wait_for(lambda: deployment["replica"].frame_stats()["refused"] == before_refused + 1, 10, "the refusal counted")
    _one_request_adds_exactly_one_row(deployment, before_rows)


@pytest.mark.parametrize("proof", [None, _wrong_proof()], ids=["no-proof", "wrong-proof"])
def test_the_drift_monitor_answers_and_handles_nothing_without_the_secret(deployment, proof):
    before = _sampled_rows(deployment)
    samples = encode_samples("mlp", "1", np.full((50, 64), 9.0))  # would shift the window if ingested
    frame = HEAD.pack(len(samples), 1, wire.OP_DRIFT_INGEST, 0, 0) + samples
    assert _unanswered(deployment["drift"], frame, proof) == b""
    _one_request_adds_exactly_one_row(deployment, before)


def test_the_monitor_counts_refused_connections_by_reason_in_the_ingress_metrics(deployment):
    samples = encode_samples("mlp", "1", np.zeros((1, 64)))
    _unanswered(deployment["drift"], HEAD.pack(len(samples), 1, wire.OP_DRIFT_INGEST, 0, 0) + samples,
                _wrong_proof())
    found = re.search(r'^flywheel_drift_refused_connections_total\{reason="wrong_proof"\} (\S+)$',
                      _metrics(deployment), re.M)
    assert found is not None
    assert float(found.group(1)) >= 1
