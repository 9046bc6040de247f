"""server.autoscaling and models[].autoscaling: the ingress, and a dedicated
model, follow the in-flight counts their replicas measure themselves. A load
step from 1 to 32 keep-alive clients scales both from 1 to 2 replicas (one
deployment), the new ones get connections (they age out and reconnect), and
both go back to 1 after the load, with no failed request at any point."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from flywheel.serving import parse_config
from flywheel.serving.app import application_name, deploy, undeploy

from _poll import wait_for
from _replicas import answered_by_replica
from _requests import KeepAliveLoad

pytestmark = pytest.mark.integration

ROW = np.linspace(0, 1, 64).tolist()


@pytest.fixture(scope="module")
def wide_mlp(tmp_path_factory) -> str:
    """64 -> 2048 -> 2048 -> 10: about a millisecond a row on one thread, so
    that 32 clients queue at the model (the worker thread) while one does not."""
    import torch

    from flywheel.runtime.architectures import build
    from flywheel.runtime.export import export_onnx

    torch.manual_seed(0)
    module, sig = build("mlp", {"in_features": 64, "hidden": [2048, 2048], "out_features": 10})
    return export_onnx(module, sig, str(tmp_path_factory.mktemp("models") / "wide.onnx"))


def _infer(conn) -> int:
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": ROW}]})
    conn.request("POST", "/v2/models/wide/infer", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
    return len(json.loads(data)["outputs"][0]["data"])


def _running(app: str, deployment: str = "ingress") -> int:
    from ray import serve

    return serve.status().applications[app].deployments[deployment].replica_states.get("RUNNING", 0)


def _answered_by_model_replica(app: str, deployment: str, asks: int = 20) -> dict[str, int]:
    """identity -> calls answered, from as many replicas of a dedicated
    model as answer ``asks`` calls (Serve spreads them over the replicas)."""
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app_name=app)
    seen = {}
    for _ in range(asks):
        stats = handle.frame_stats.remote().result(timeout_s=10)
        seen[stats["identity"]] = stats["answered"]
    return seen


def _both_answered(answered: dict) -> bool:
    return len(answered) == 2 and min(answered.values()) > 0


def test_a_load_step_scales_the_ingress_and_a_dedicated_model_up_and_back_down_without_a_failed_request(
        ray_session, wide_mlp):
    """One keep-alive client, then 32 beside it until both the ingress and
    the model run 2 replicas and each of the four answers, then one again
    until both are back to 1; no request may fail throughout."""
    fast = {"min_replicas": 1, "max_replicas": 2, "target_in_flight": 4,
            "upscale_delay_s": 1, "downscale_delay_s": 4, "look_back_s": 2}
    cfg = parse_config({
        "name": "autoscaled",
        # connections (the clients' to the ingress, the ingress's to the
        # model's replicas) age out after about a second, so that added
        # replicas get some
        "server": {"port": 0, "grpc_port": -1, "max_connection_age_s": 1, "autoscaling": fast},
        "models": [{"name": "wide", "path": wide_mlp, "num_cpus": 0.1, "placement": "dedicated",
                    "onnxruntime": {"intra_op_threads": 1},
                    "batching": {"max_batch_size": 32, "inline": False}, "autoscaling": fast}],
    })
    dep = deploy(cfg)
    app, model = application_name(dep.config), "wide-1"
    port = int(dep.url.rsplit(":", 1)[1])

    def running() -> tuple[int, int]:
        return _running(app), _running(app, model)

    def both_answer() -> bool:
        return _both_answered(answered_by_replica(app)) and _both_answered(_answered_by_model_replica(app, model))

    failures: list[str] = []
    try:
        assert running() == (1, 1)
        with KeepAliveLoad(port, _infer, clients=1) as one:
            wait_for(lambda: len(one.answers) > 50, 60, "one client's first answers")
            # one client keeps at most one request in flight: under the target of 4
            time.sleep(4)
            assert running() == (1, 1)
            with KeepAliveLoad(port, _infer, clients=32) as many:
                started = time.monotonic()
                wait_for(lambda: running() == (2, 2), 90, "the ingress and the model to scale to 2 replicas",
                         every_s=0.5)
                print(f"\nscaled 1 -> 2 ingress and model replicas {time.monotonic() - started:.1f} s "
                      "after 32 clients started")
                wait_for(both_answer, 60, "both replicas of the ingress and of the model to answer", every_s=0.5)
            failures += many.failures
            stopped = time.monotonic()
            wait_for(lambda: running() == (1, 1), 90, "the ingress and the model to scale back to 1 replica",
                     every_s=0.5)
            print(f"scaled 2 -> 1 {time.monotonic() - stopped:.1f} s after the 32 clients stopped")
            seen = len(one.answers)
            wait_for(lambda: len(one.answers) > seen + 50, 60, "answers after the scale-down")
        failures += one.failures
    finally:
        undeploy(dep)
    assert set(many.answers) | set(one.answers) == {10}
    assert failures == []
