"""Inference capture on real Ray Serve: sampled requests and answers land in
finished Parquet files, labels posted through the feedback route join them,
and a bad label is a 400 naming the field."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest

from flywheel.common.capture_files import labelled_accuracy, read_captured
from flywheel.serving import parse_config
from flywheel.serving.app import deploy, undeploy

from _poll import wait_for

pytestmark = pytest.mark.integration


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _infer(url: str, x: np.ndarray, **extra) -> dict:
    status, body = _post(url, {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                           "data": x.ravel().tolist()}], **extra})
    assert status == 200, body
    return body


def test_captured_requests_join_their_labels(ray_session, mlp_onnx, tmp_path):
    root = str(tmp_path / "captures")
    cfg = parse_config({
        "name": "capturing", "server": {"port": 0, "grpc_port": 0},
        "models": [{"name": "mlp", "version": "1", "path": mlp_onnx, "num_cpus": 0.1,
                    "capture": {"path": root, "sample": 1.0, "flush_interval_s": 0.1, "max_file_age_s": 0.5}}],
    })
    dep = deploy(cfg)
    try:
        infer, feedback = f"{dep.url}/v2/models/mlp/infer", f"{dep.url}/v2/models/mlp/feedback"
        x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
        batched = _infer(infer, x, id="batched-1")
        single = _infer(infer, x[:1])
        assert single["id"]  # a captured request without an id gets one to label it by
        scores = np.array(batched["outputs"][0]["data"]).reshape(2, -1)
        right = int(scores[0].argmax())
        assert _post(feedback, {"id": "batched-1", "label": [right, (right + 1) % 10]}) == (
            200, {"id": "batched-1", "label_written": True})
        assert _post(feedback, {"id": single["id"], "label": 4})[0] == 200
        status, answer = _post(feedback, {"id": single["id"], "label": "four"})
        assert status == 400
        assert answer["field"] == "label"

        cap = wait_for(lambda: (c := read_captured(root, "mlp")) and len(c) == 3 and c, 20,
                       "three labelled captured rows in finished files", every_s=0.2)
        assert sorted(zip(cap.request_id.tolist(), cap.row.tolist())) == sorted(
            [("batched-1", 0), ("batched-1", 1), (single["id"], 0)])
        i = cap.request_id.tolist().index("batched-1")
        assert np.array_equal(cap.inputs["input"][i], x[cap.row[i]])
        assert cap.version.tolist() == ["1", "1", "1"]
        n, _ = labelled_accuracy(root, "mlp", since=0)
        assert n == 3
    finally:
        undeploy(dep)
