"""Ray Serve owns the replicas' life cycle: a killed model replica is
replaced, and the ingress finds the new one on the shared port by itself."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from flywheel.serving import parse_config
from flywheel.serving.app import deploy, undeploy

pytestmark = pytest.mark.integration


def _replicas(prefix: str) -> list[str]:
    import ray

    return sorted(
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{prefix}")
    )


def _infer(url: str) -> int:
    body = json.dumps(
        {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.1] * 64}]}
    ).encode()
    req = urllib.request.Request(f"{url}/v2/models/mlp/infer", data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            assert np.array(json.loads(r.read())["outputs"][0]["data"]).shape == (10,)
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def test_killed_replica_is_replaced_and_traffic_resumes(ray_session, mlp_onnx):
    import ray

    cfg = parse_config(
        {"name": "recovery", "server": {"port": 0, "grpc_port": 0}, "models": [{"name": "mlp", "path": mlp_onnx, "num_cpus": 0.1, "placement": "dedicated"}]}
    )
    dep = deploy(cfg)
    try:
        assert _infer(dep.url) == 200
        (old,) = _replicas("recovery#mlp-1")
        ray.kill(ray.get_actor(old, namespace="serve"), no_restart=True)
        statuses = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # the kill lands asynchronously
            statuses.append(_infer(dep.url))
            if statuses[-1] != 200:
                break
            time.sleep(0.05)
        while time.monotonic() < deadline and statuses[-1] != 200:
            time.sleep(0.2)
            statuses.append(_infer(dep.url))
        assert statuses[-1] == 200, statuses[-10:]
        failures = [s for s in statuses if s != 200]
        # while the replica was gone, callers got 503 (not 500, not a hang)
        assert failures
        assert set(failures) == {503}
        (new,) = _replicas("recovery#mlp-1")
        assert new != old
    finally:
        undeploy(dep)
