"""Several ingress replicas on one node: they share the public ports
(SO_REUSEPORT), serve colocated models in-process, add up their metrics, and
a replica that dies stops getting connections at once."""

from __future__ import annotations

import time
import urllib.request

import numpy as np
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from flywheel.serving import parse_config
from flywheel.serving.app import deploy, application_name, undeploy

from _poll import wait_for
from _replicas import answered_by_replica
from _requests import infer_status

pytestmark = pytest.mark.integration

def _metric(url: str, name: str, **labels) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture(scope="module")
def shared(ray_session, mlp_onnx):
    cfg = parse_config({"name": "shared", "server": {"port": 0, "grpc_port": 0, "replicas": 2},
                        "models": [{"name": "mlp", "path": mlp_onnx, "num_cpus": 0.1}]})
    dep = deploy(cfg)
    yield dep
    undeploy(dep)


def test_replicas_share_the_port_and_one_scrape_counts_them_all(shared):
    app = application_name(shared.config)
    wait_for(lambda: _metric(shared.url, "flywheel_ingress_replicas") >= 2, 60,
             "both replicas to hold a metrics slot", every_s=0.2)
    before = _metric(shared.url, "flywheel_requests_total", model="mlp", outcome="ok")
    statuses = [infer_status(shared.url) for _ in range(80)]
    assert statuses == [200] * 80
    # whichever replica serves the scrape, it reports both replicas' requests
    for _ in range(4):
        assert _metric(shared.url, "flywheel_requests_total", model="mlp", outcome="ok") - before == 80
    answered = answered_by_replica(app)
    assert len(answered) == 2, answered
    assert all(n > 0 for n in answered.values()), answered


def test_grpc_is_served_by_every_replica(shared):
    import tritonclient.grpc as grpcclient

    before = answered_by_replica(application_name(shared.config))
    for _ in range(30):  # fresh channels: the kernel spreads them over the replicas
        client = grpcclient.InferenceServerClient(shared.grpc_target)
        x = np.ones((2, 64), np.float32)
        inp = grpcclient.InferInput("input", [2, 64], "FP32")
        inp.set_data_from_numpy(x)
        assert client.infer("mlp", [inp]).as_numpy("logits").shape == (2, 10)
        client.close()
    after = answered_by_replica(application_name(shared.config))
    assert len(after) == 2, (before, after)
    assert all(after[pid] > before.get(pid, 0) for pid in after), (before, after)


def test_a_killed_replica_stops_getting_connections_at_once(shared):
    import ray
    from ray import serve

    app = application_name(shared.config)
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::{app}#ingress")]
    assert len(names) == 2
    pids = set(answered_by_replica(app))
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    # the kill lands asynchronously
    wait_for(lambda: not all(psutil.pid_exists(pid) for pid in pids), 30, "the killed replica's process to exit",
             every_s=0.02)
    killed = time.monotonic()
    # the kernel drops a dead process's listening socket: after a moment,
    # every new connection reaches the survivor
    while infer_status(shared.url) != 200 or any(infer_status(shared.url) != 200 for _ in range(5)):
        assert time.monotonic() - killed < 10, "requests still failing 10 s after the kill"
        time.sleep(0.05)
    recovered = time.monotonic() - killed
    assert [infer_status(shared.url) for _ in range(100)] == [200] * 100
    assert recovered < 5, f"took {recovered:.1f}s"
    # and Serve brings the replica count back to two (both waits within 90 s)
    deadline = time.monotonic() + 90
    wait_for(lambda: serve.status().applications[app].deployments["ingress"].replica_states.get("RUNNING", 0) >= 2,
             90, "Serve to run two ingress replicas again", every_s=0.5)
    wait_for(lambda: len(answered_by_replica(app)) >= 2, max(deadline - time.monotonic(), 0),
             "both replicas to report their stats", every_s=0.5)
