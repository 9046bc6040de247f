"""Tracing and the access log on real Ray Serve: one deployment (a model in
its own replica, so that the frame hop is on the path) with spans exported to
a real OTLP/HTTP receiver in this test and every request access-logged."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as tg

from flywheel.serving import parse_config
from flywheel.serving.app import deploy, undeploy

from _otlp import OtlpReceiver
from _poll import wait_for

pytestmark = pytest.mark.integration

STEPS = {"route", "decode", "queue", "compute", "encode"}
KEY = "fwk_0123456789ab_" + "t" * 43


def _request_spans(receiver: OtlpReceiver, trace: str, parent: str):
    def done():
        spans = receiver.trace(trace)
        roots = [s for s in spans if s.parent_id == parent and s.name == "infer"]
        if len(roots) != 1:
            return None
        kids = [s for s in spans if s.parent_id == roots[0].span_id]
        return (roots[0], kids) if {k.name for k in kids} >= STEPS else None
    return wait_for(done, 20, f"the request span of trace {trace} and its five children", every_s=0.2)


def test_traceparent_spans_and_access_log_over_http_and_grpc(ray_session, mlp_onnx, tmp_path):
    receiver = OtlpReceiver()
    log_path = tmp_path / "access.jsonl"
    cfg = parse_config({
        "name": "tracing", "server": {
            "port": 0, "grpc_port": 0,
            "tracing": {"otlp_endpoint": receiver.url, "service_name": "flywheel-it"},
            "access_log": {"sample": 1.0, "path": str(log_path)},
        },
        "models": [{"name": "mlp", "version": "1", "path": mlp_onnx, "num_cpus": 0.1, "placement": "dedicated"}],
    })
    dep = deploy(cfg)
    try:
        x = np.ones((2, 64), np.float32)
        http_trace, http_parent = "a1" * 16, "b2" * 8
        body = json.dumps({"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32",
                                       "data": x.ravel().tolist()}]}).encode()
        req = urllib.request.Request(
            f"{dep.url}/v2/models/mlp/infer", data=body, method="POST",
            headers={"Content-Type": "application/json", "traceparent": f"00-{http_trace}-{http_parent}-01",
                     "Authorization": f"Bearer {KEY}", "flywheel-request-id": "traced-http"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200
            answered = r.headers["traceparent"]
        root, kids = _request_spans(receiver, http_trace, http_parent)
        assert answered == f"00-{http_trace}-{root.span_id}-01"
        assert sorted(k.name for k in kids) == sorted(STEPS)
        assert root.attributes["flywheel.model"] == "mlp"
        assert root.attributes["flywheel.batch_rows"] == 2
        assert root.service == "flywheel-it"

        grpc_trace, grpc_parent = "c3" * 16, "d4" * 8
        client = tg.InferenceServerClient(url=dep.grpc_target)
        inp = tg.InferInput("input", [1, 64], "FP32")
        inp.set_data_from_numpy(x[:1])
        client.infer("mlp", [inp], headers={"traceparent": f"00-{grpc_trace}-{grpc_parent}-01"})
        client.close()
        root, kids = _request_spans(receiver, grpc_trace, grpc_parent)
        assert root.attributes["flywheel.transport"] == "grpc"
        assert {k.name for k in kids} == STEPS

        def logged():
            for raw in log_path.read_text().splitlines() if log_path.exists() else ():
                if json.loads(raw)["request_id"] == "traced-http":
                    return raw
            return None
        raw = wait_for(logged, 10, "the access log line of the HTTP request")
        line = json.loads(raw)
        assert (line["status"], line["model"], line["trace_id"]) == (200, "mlp", http_trace)
        assert line["client"].startswith("127.0.0.1:")
        assert KEY not in raw
        assert "Bearer" not in raw
        if cfg.server.grpc_server != "grpcio":  # through the HTTP/2 front: logged too
            grpc_line = wait_for(lambda: next((json.loads(r) for r in log_path.read_text().splitlines()
                                                if json.loads(r)["trace_id"] == grpc_trace), None),
                                 10, "the access log line of the gRPC call")
            assert (grpc_line["path"], grpc_line["grpc_status"]) == ("/inference.GRPCInferenceService/ModelInfer", 0)
    finally:
        undeploy(dep)
        receiver.close()
