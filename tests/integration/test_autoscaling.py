"""server.autoscaling: the ingress follows the in-flight counts its replicas
measure themselves. A load step from 1 to 32 keep-alive clients scales it
from 1 to 2 replicas, the new one gets connections (they age out and
reconnect), and it goes back to 1 after the load, with no failed request at
any point."""

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


def _running(app: str) -> int:
    from ray import serve

    return serve.status().applications[app].deployments["ingress"].replica_states.get("RUNNING", 0)


def test_a_load_step_scales_the_ingress_up_and_back_down_without_a_failed_request(ray_session, wide_mlp):
    cfg = parse_config({
        "name": "autoscaled",
        "server": {"port": 0, "grpc_port": -1, "max_connection_age_s": 1,
                   "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_in_flight": 4,
                                   "upscale_delay_s": 1, "downscale_delay_s": 4, "look_back_s": 2}},
        "models": [{"name": "wide", "path": wide_mlp, "num_cpus": 0.1,
                    "onnxruntime": {"intra_op_threads": 1},
                    "batching": {"max_batch_size": 32, "inline": False}}],
    })
    dep = deploy(cfg)
    app = application_name(dep.config)
    port = int(dep.url.rsplit(":", 1)[1])
    failures: list[str] = []
    try:
        assert _running(app) == 1
        with KeepAliveLoad(port, _infer, clients=1) as one:
            wait_for(lambda: len(one.answers) > 50, 60, "one client's first answers")
            # one client keeps at most one request in flight: under the target of 4
            time.sleep(4)
            assert _running(app) == 1
            with KeepAliveLoad(port, _infer, clients=32) as many:
                started = time.monotonic()
                wait_for(lambda: _running(app) >= 2, 90, "the ingress to scale to 2 replicas", every_s=0.5)
                print(f"\nscaled 1 -> 2 ingress replicas {time.monotonic() - started:.1f} s after 32 clients started")
                # the clients' connections age out and reconnect: some land on the new replica
                wait_for(lambda: len(answered := answered_by_replica(app)) == 2 and min(answered.values()) > 0, 60,
                         "both replicas to answer requests", every_s=0.5)
            failures += many.failures
            stopped = time.monotonic()
            wait_for(lambda: _running(app) == 1, 90, "the ingress to scale back to 1 replica", every_s=0.5)
            print(f"scaled 2 -> 1 {time.monotonic() - stopped:.1f} s after the 32 clients stopped")
            seen = len(one.answers)
            wait_for(lambda: len(one.answers) > seen + 50, 60, "answers after the scale-down")
        failures += one.failures
        assert set(many.answers) | set(one.answers) == {10}
    finally:
        undeploy(dep)
    assert failures == []
