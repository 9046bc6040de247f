"""Capture through a real in-process ingress: inference answers carry the id
labels name, feedback labels are written and join the captured rows, and bad
feedback gets a 400 naming the field."""

from __future__ import annotations

import http.client
import json
import socket

import numpy as np
import pytest

from flywheel.common.capture_files import read_captured
from flywheel.serving.capture import local_captures, render_capture_metrics
from flywheel.serving.config import CaptureConfig, ModelConfig, ServerConfig
from flywheel.serving.ingress import Ingress

from _poll import wait_for


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(mlp_onnx, tmp_path_factory):
    root = tmp_path_factory.mktemp("captures")
    capture = CaptureConfig(path=str(root), sample=1.0, flush_interval_s=0.05, max_file_age_s=0.2)
    cfg = ServerConfig(port=_free_port(), grpc_port=-1)
    ingress = Ingress(cfg, [], colocated=[ModelConfig(name="mlp", version="1", path=mlp_onnx, capture=capture)])
    yield cfg.port, root, ingress
    ingress.close()


def _post(port: int, path: str, body) -> tuple[int, dict]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = c.getresponse()
    return r.status, json.loads(r.read() or b"{}")


def _infer(port: int, x: np.ndarray, **extra) -> dict:
    status, body = _post(port, "/v2/models/mlp/infer", {
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
        **extra})
    assert status == 200, body
    return body


def test_labels_join_the_captured_rows(served):
    port, root, _ = served
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    mine = _infer(port, x, id="batch-1")
    assert mine["id"] == "batch-1"
    theirs = _infer(port, x[:1])
    assert theirs["id"]  # the server made one: labels name it
    assert _post(port, "/v2/models/mlp/feedback", {"id": "batch-1", "label": [3, 4]}) == (
        200, {"id": "batch-1", "label_written": True})
    assert _post(port, "/v2/models/mlp/feedback", {"id": theirs["id"], "label": 7})[0] == 200
    cap = wait_for(lambda: (c := read_captured(str(root), "mlp")) and len(c) == 3 and c, 15,
                   "three labelled rows")
    got = sorted(zip(cap.request_id.tolist(), cap.row.tolist(), cap.labels.tolist()))
    assert got == sorted([("batch-1", 0, 3), ("batch-1", 1, 4), (theirs["id"], 0, 7)])
    i = cap.request_id.tolist().index("batch-1")
    assert np.array_equal(cap.inputs["input"][i], x[cap.row[i]])
    assert cap.outputs[next(iter(cap.outputs))].shape == (3, 10)


@pytest.mark.parametrize("body, field", [
    ({"id": "a", "label": "cat"}, "label"),
    ({"id": "a", "label": [1, None]}, "label"),
    ({"id": "a", "label": True}, "label"),
    ({"id": "a"}, "reward"),
])
def test_bad_feedback_is_a_400_naming_the_field(served, body, field):
    status, answer = _post(served[0], "/v2/models/mlp/feedback", body)
    assert status == 400
    assert answer["field"] == field


def test_feedback_without_an_id_names_it(served):
    status, answer = _post(served[0], "/v2/models/mlp/feedback", {"label": 1})
    assert status == 400
    assert "`id`" in answer["error"]


def test_a_reward_for_an_untracked_id_still_writes_the_label(served):
    status, answer = _post(served[0], "/v2/models/mlp/feedback", {"id": "nobody", "reward": 1.0, "label": 2})
    assert status == 200
    assert answer == {"id": "nobody", "accepted": False, "label_written": True}


def test_metrics_count_the_captured_rows(served):
    port, _, ingress = served
    _infer(port, np.zeros((1, 64), np.float32))
    writers = local_captures(ingress.router, "mlp")
    wait_for(lambda: writers[0].rows_written >= 1, 15, "a finished file")
    assert "flywheel_capture_rows_total{" in render_capture_metrics(writers).decode()


def test_labels_for_a_model_captured_in_its_own_process_are_written_by_the_ingress(tmp_path):
    from flywheel.common.capture_files import read_labels
    from flywheel.serving.router import Route

    cfg = ServerConfig(port=_free_port(), grpc_port=-1)
    # a dedicated model (its replica elsewhere, not reachable here): feedback still reaches this ingress
    ingress = Ingress(cfg, [Route("ded", "1", _free_port())], label_roots={"ded": str(tmp_path)})
    try:
        status, body = _post(cfg.port, "/v2/models/ded/feedback", {"id": "r-1", "label": 7})
        assert (status, body.get("label_written")) == (200, True)
        assert read_labels(str(tmp_path), "ded") == {("r-1", -1): 7.0}
    finally:
        ingress.close()
