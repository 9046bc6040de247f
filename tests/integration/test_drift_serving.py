"""Drift monitoring on real Ray Serve: sampled inputs reach the monitor, which
scores them against the registered reference sample."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest

from flywheel.serving import parse_config
from flywheel.serving.app import deploy, undeploy

from _poll import wait_for

pytestmark = pytest.mark.integration


def _post(url, x):
    body = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=10) as r:
        assert r.status == 200


def test_shifted_inputs_show_up_as_drift(ray_session, demo_registry):
    cfg = parse_config({
        "name": "drifting", "server": {"port": 0, "grpc_port": 0},
        "registry": {"uri": demo_registry.uri, "artifacts": demo_registry.artifacts},
        "models": [{"name": "digits", "ref": "digits@production", "num_cpus": 0.1,
                    "drift": {"enabled": True, "sample_rate": 1.0, "window": 100, "batch_rows": 20,
                              "flush_interval_s": 0.1, "tests": ["ks"]}}],
    })
    dep = deploy(cfg)
    try:
        infer = f"{dep.url}/v2/models/digits/infer"
        for _ in range(10):  # 100 rows of saturated pixels: far from the reference
            _post(infer, np.ones((10, 64), np.float32))

        def drift_history() -> list:
            with urllib.request.urlopen(f"{dep.url}/v2/models/digits/versions/1/drift", timeout=5) as r:
                return json.loads(r.read())

        history = wait_for(drift_history, 60, "a drift result for digits 1", every_s=0.2)
        assert history
        assert history[0]["test"] == "ks"
        assert history[0]["any_drift"]
        assert history[0]["result"]["n_window"] == 100
        text = urllib.request.urlopen(f"{dep.url}/metrics", timeout=5).read().decode()
        assert "flywheel_drift_detected{" in text
        assert "flywheel_requests_total{" in text
    finally:
        undeploy(dep)
