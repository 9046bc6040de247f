"""Fault injection with real processes: a model replica killed under load,
and a locked registry database while models serve."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from flywheel.bench.harness import parse_scenario
from flywheel.bench.harness.payloads import build_plan
from flywheel.bench.harness.pool import WorkerPool
from flywheel.protocol.errors import UnavailableError
from flywheel.serving import parse_config
from flywheel.serving.app import deploy, undeploy

pytestmark = pytest.mark.integration


def _running(app: str, deployment: str) -> int:
    from ray import serve

    states = serve.status().applications[app].deployments[deployment].replica_states
    return states.get("RUNNING", 0)


def _replica_handles(prefix: str) -> list:
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::{prefix}")]
    return [(n, ray.get_actor(n, namespace="serve")) for n in sorted(names)]


def _metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)


def test_killing_replica_processes_under_load_loses_no_request(ray_session, mlp_onnx):
    import ray

    cfg = parse_config({"name": "faults", "server": {"port": 0, "grpc_port": -1},
                        "models": [{"name": "mlp", "path": mlp_onnx, "num_cpus": 0.1, "replicas": 2,
                                    "placement": "dedicated"}]})
    dep = deploy(cfg)
    try:
        sc = parse_scenario({"model": "mlp", "target": {"http": dep.url, "grpc": ""}, "timeout_s": 10})
        figures: dict = {}
        with WorkerPool(build_plan(sc), 1) as pool:
            load = threading.Thread(target=lambda: figures.update(step=pool.step(
                by="users", level=8, duration_s=30, warmup_s=0.5, max_requests=10**7, max_users=8)))
            load.start()
            recoveries = []
            # Kill each original replica in turn (SIGKILL to its process), so
            # that at least one kill hits the replica holding the ingress's
            # connections; wait until Serve runs two replicas again.
            originals = _replica_handles("faults#mlp-1")
            seen = {n for n, _ in originals}
            for name, handle in originals:
                time.sleep(3)  # pacing: each kill lands on a replica that has been taking load for a while
                pid = ray.get(handle.__ray_call__.remote(lambda self: os.getpid()))
                os.kill(pid, signal.SIGKILL)
                killed = time.monotonic()
                # recovered = a replacement (a new replica name) is up and
                # Serve counts two running replicas
                while True:
                    names = {n for n, _ in _replica_handles("faults#mlp-1")}
                    if names - seen and name not in names and _running("faults", "mlp-1") == 2:
                        break
                    assert time.monotonic() - killed < 60, "replica not replaced within 60 s"
                    time.sleep(0.1)
                seen |= names
                recoveries.append(round(time.monotonic() - killed, 2))
            load.join(timeout=120)
        step = figures["step"]
        retries = _metric(dep.url, "flywheel_replica_retries_total")
        print(f"\nFAULT replica kill: {step.ok} ok, {step.errors} failed, {retries:g} retried, "
              f"replacement running after {recoveries} s, p99 {step.p99_ms} ms, max {step.max_ms} ms")
        assert step.errors == 0, step.error_counts
        assert step.ok > 1000
        assert len(recoveries) == 2
        assert retries >= 1  # some requests were stranded on a killed replica and answered by the other
    finally:
        undeploy(dep)


def test_a_locked_registry_refuses_writes_clearly_while_models_keep_serving(demo, demo_registry, capsys):
    from flywheel.registry import Registry
    from flywheel.cli import main

    path = demo_registry.uri[len("sqlite://"):]
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    try:
        uri = demo_registry.uri + "?timeout=0.5"
        reg = Registry.open(uri, demo_registry.artifacts)
        try:
            version = reg.resolve("digits@production").version  # reads go on (WAL)
            with pytest.raises(UnavailableError, match="locked by another writer"):
                reg.set_alias("digits", "canary", version, actor="tests")
        finally:
            reg.close()
        assert main(["models", "--registry", uri, "--artifacts", demo_registry.artifacts,
                     "alias", "digits", "canary", str(version)]) == 2
        assert "is locked by another writer (waited 0.5s)" in capsys.readouterr().err
        body = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                       "data": [0.0] * 64}]}).encode()
        for _ in range(20):  # models already loaded never touch the registry
            req = urllib.request.Request(demo.url + "/v2/models/digits/infer", data=body, method="POST")
            with urllib.request.urlopen(req, timeout=5) as resp:
                assert resp.status == 200
    finally:
        holder.execute("ROLLBACK")
        holder.close()
