"""A real deployment's internal hops and a poison request.

The model is a plug-in backend (tests/integration/poison_plugin/) whose
process dies at once on an input holding 666, placed in two dedicated
replicas; the plug-in reaches the replicas through the deployment's
runtime_env. With drift on at sample rate 1, every request a replica handles
shows as a sampled row at the drift monitor."""

from __future__ import annotations

import json
import re
import socket
import struct
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from flywheel.runtime.backends import registry
from flywheel.serving import parse_config
from flywheel.serving._private import wire
from flywheel.serving.app import deploy, undeploy
from flywheel.serving.drift_monitor import encode_samples

from _poll import wait_for

pytestmark = pytest.mark.integration

PLUGIN = Path(__file__).resolve().parent / "poison_plugin"
APP = "poisoned"
HEAD = struct.Struct("<IIBII")
ROWS = re.compile(r'^flywheel_drift_sampled_rows_total\{model="fragile",version="1"\} (\S+)$', re.M)


@pytest.fixture(scope="module")
def dep(ray_session, tmp_path_factory):
    home = tmp_path_factory.mktemp("poison")
    (home / "weights.bin").write_bytes(b"the poison backend reads no weights")
    np.save(home / "ref.npy", np.random.default_rng(0).normal(size=(200, 4)))
    crash_log = home / "crashes.txt"
    crash_log.touch()
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(PLUGIN))  # the config names the backend here too
        cfg = parse_config({
            "name": APP, "server": {"port": 0, "grpc_port": -1},
            "models": [{
                "name": "fragile", "version": "1", "path": str(home / "weights.bin"), "backend": "poison",
                "settings": {"crash_log": str(crash_log)}, "placement": "dedicated", "replicas": 2,
                "num_cpus": 0.1,
                "drift": {"enabled": True, "sample_rate": 1.0, "batch_rows": 1, "flush_interval_s": 0.05,
                          "window": 10_000, "reference": str(home / "ref.npy")},
            }],
        })
        deployment = deploy(cfg, runtime_env={"env_vars": {"PYTHONPATH": str(PLUGIN)}}, ready_timeout_s=180)
        try:
            yield deployment, crash_log
        finally:
            undeploy(deployment)
            registry._loaded.pop("poison", None)


def _infer(url: str, x: list[float]) -> tuple[int, dict]:
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": x}]}).encode()
    req = urllib.request.Request(f"{url}/v2/models/fragile/infer", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _metrics(url: str) -> str:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        return r.read().decode()


def _rows(url: str) -> float:
    found = ROWS.search(_metrics(url))
    return float(found.group(1)) if found else 0.0


def _frame_stats(deployment: str) -> dict:
    from ray import serve

    return serve.get_deployment_handle(deployment, APP).frame_stats.remote().result(timeout_s=30)


def _unanswered(port: int, op: int, payload: bytes) -> bytes:
    """A frame sent with no proof of the secret; what came back after the hello."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(HEAD.pack(len(payload), 1, op, 0, 0) + payload)
        got = b""
        while chunk := raw.recv(65536):
            got += chunk
    assert got[:4] == b"FWF1"
    return got[4 + wire.NONCE :]


def test_internal_ports_refuse_a_caller_without_the_secret_and_handle_nothing(dep):
    deployment, _ = dep
    assert _infer(deployment.url, [1.0, 2.0, 3.0, 4.0])[0] == 200
    wait_for(lambda: _rows(deployment.url) >= 1, 60, "the first request's sampled row at the monitor")
    before = _rows(deployment.url)
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.0] * 4}]})
    assert _unanswered(_frame_stats("fragile-1")["port"], wire.OP_INFER, body.encode()) == b""
    monitor = _frame_stats("drift")
    assert _unanswered(monitor["port"], wire.OP_DRIFT_INGEST,
                       encode_samples("fragile", "1", np.full((100, 4), 9.0))) == b""
    wait_for(lambda: _frame_stats("drift")["refused"] == monitor["refused"] + 1, 30, "the monitor's refusal")
    # the ingress's own traffic, over the same hops with the secret, still works end to end
    status, answer = _infer(deployment.url, [1.0, 1.0, 1.0, 1.0])
    assert status == 200
    assert answer["outputs"][0]["data"] == [2.0, 2.0, 2.0, 2.0]
    wait_for(lambda: _rows(deployment.url) >= before + 1, 60, "the request's sampled row at the monitor")
    assert _rows(deployment.url) == before + 1  # neither refused frame was handled


def test_a_poison_request_kills_two_replicas_at_most_and_gets_an_error_naming_none(dep):
    deployment, crash_log = dep
    assert _infer(deployment.url, [1.0, 2.0, 3.0, 4.0])[0] == 200
    status, answer = _infer(deployment.url, [666.0, 0.0, 0.0, 0.0])
    assert status == 500, answer
    assert "two model replicas were lost while they had this request" in answer["error"]
    assert "pid=" not in answer["error"]  # replica names are for the operator, not the caller
    deaths = crash_log.read_text().split()
    assert len(deaths) == 2
    # Serve replaces the dead replicas; normal requests are answered again
    wait_for(lambda: _infer(deployment.url, [1.0, 2.0, 3.0, 4.0])[0] == 200, 120, "a normal answer after the crash")
    assert crash_log.read_text().split() == deaths  # the poison request was not sent a third time
    text = _metrics(deployment.url)
    assert 'flywheel_replica_lost_calls_total{model="fragile",version="1"} 2' in text
    named = re.findall(r'^flywheel_replica_lost_calls_by_replica_total\{model="fragile",replica="([^"]+)",'
                       r'version="1"\} 1$', text, re.M)
    assert sorted(re.search(r"pid=(\d+)", r).group(1) for r in named) == sorted(deaths)
    assert all(r.startswith("fragile-1#") for r in named)  # the Serve replica, not just a pid
