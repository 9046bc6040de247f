"""Declarative deployment on a Ray cluster the test starts with `ray start
--head`: the file `flywheel serve --emit-serve-config` writes is deployed
with `serve deploy`, answers through the ingress, and a second `serve deploy`
(a new model version) updates it in place with no failed request under load.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper, save

from _ports import answers, free_port, wait_for
from _requests import KeepAliveLoad

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
ROW = [5.1, 3.5, 1.4, 0.2]


def _model(path: Path, scale: float) -> Path:
    """A 4 -> 3 linear model whose answer tells which file answered."""
    w = np.arange(12, dtype=np.float32).reshape(4, 3) * scale
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "W"], ["output"])], "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, str(path))
    return path


@pytest.fixture(scope="module")
def cluster():
    """A one-node Ray cluster of its own (dashboard on: `serve deploy` talks
    to its REST API). `ray start --block` keeps every process of the cluster
    in this test's process tree, which is stopped by PID at the end."""
    tmp = tempfile.mkdtemp(prefix="fw-rs-", dir="/tmp")  # short: Ray's socket paths
    dashboard = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    log = open(os.path.join(tmp, "ray-start.log"), "w")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
         "--num-cpus=4", f"--temp-dir={tmp}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={free_port()}",
         f"--dashboard-agent-grpc-port={free_port()}", f"--ray-client-server-port={free_port()}",
         f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
         "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        try:
            wait_for(lambda: head.poll() is None and answers(f"{address}/api/serve/applications/"), 120,
                      "the Ray head's dashboard")
        except AssertionError as exc:
            log.flush()
            raise AssertionError(f"{exc}; ray start said:\n{Path(log.name).read_text()[-3000:]}") from None
        yield {"address": address, "env": env}
    finally:
        _stop_tree(head.pid, tmp)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _stop_tree(pid: int, tmp: str) -> None:
    """The head's process tree, and any process that names the cluster's temp
    folder on its command line (one that left the tree)."""
    procs = {}
    try:
        root = psutil.Process(pid)
        procs = {p.pid: p for p in [root, *root.children(recursive=True)]}
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter(["cmdline"]):
        if p.pid != os.getpid() and any(tmp in arg for arg in (p.info["cmdline"] or [])):
            procs.setdefault(p.pid, p)
    for p in procs.values():
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _emit(tmp_path: Path, name: str, config: dict) -> Path:
    src, out = tmp_path / f"{name}.yaml", tmp_path / f"{name}.serve.yaml"
    src.write_text(yaml.safe_dump(config))
    proc = subprocess.run([str(BIN / "flywheel"), "serve", "--config", str(src), "--emit-serve-config", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return out


def _serve_deploy(cluster, path: Path) -> None:
    proc = subprocess.run([str(BIN / "serve"), "deploy", str(path), "--address", cluster["address"]],
                          env=cluster["env"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _app_status(cluster, name: str) -> dict:
    with urllib.request.urlopen(f"{cluster['address']}/api/serve/applications/", timeout=10) as resp:
        return json.loads(resp.read())["applications"].get(name, {})


def _infer(conn: http.client.HTTPConnection) -> dict:
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": ROW}]})
    conn.request("POST", "/v2/models/clf/infer", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
    return json.loads(data)


def _answer(body: dict) -> tuple[str, list[float]]:
    return body["model_version"], body["outputs"][0]["data"]


def _ready(port: int) -> bool:
    return answers(f"http://127.0.0.1:{port}/v2/health/ready")


def test_serve_deploy_of_the_emitted_config_serves_and_updates_in_place(cluster, tmp_path):
    port, grpc_port = free_port(), free_port()
    v1, v2 = _model(tmp_path / "v1.onnx", 1.0), _model(tmp_path / "v2.onnx", 2.0)
    base = {"name": "decl", "server": {"port": port, "grpc_port": grpc_port},
            "registry": {"uri": f"sqlite:///{tmp_path}/registry.db", "artifacts": str(tmp_path / "artifacts")}}
    first = _emit(tmp_path, "first", {**base, "models": [{"name": "clf", "path": str(v1), "version": "1"}]})
    _serve_deploy(cluster, first)
    wait_for(lambda: _ready(port), 180, "the first deploy to answer /v2/health/ready")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    body = _infer(conn)
    conn.close()
    assert body["model_version"] == "1"
    assert np.allclose(body["outputs"][0]["data"], np.asarray(ROW, np.float32) @ (np.arange(12).reshape(4, 3)))

    second = _emit(tmp_path, "second", {**base, "models": [{"name": "clf", "path": str(v2), "version": "2"}]})
    with KeepAliveLoad(port, lambda conn: _answer(_infer(conn))) as load:
        wait_for(lambda: len(load.answers) > 20, 30, "the load to get going")
        _serve_deploy(cluster, second)
        wait_for(lambda: any(v == "2" for v, _ in load.answers[-50:]), 180, "answers from version 2")
        wait_for(lambda: _app_status(cluster, "decl").get("status") == "RUNNING", 120, "the update to finish")
        seen = len(load.answers)
        wait_for(lambda: len(load.answers) > seen + 50, 30, "answers after the update")
    assert load.failures == []
    assert {v for v, _ in load.answers[-20:]} == {"2"}
    assert np.allclose(load.answers[-1][1], np.asarray(ROW, np.float32) @ (np.arange(12).reshape(4, 3) * 2.0))


def test_a_config_written_by_another_flywheel_version_fails_the_deploy_naming_both(cluster, tmp_path):
    path = _emit(tmp_path, "other", {"name": "other", "server": {"port": free_port(), "grpc_port": -1},
                                     "models": [{"name": "clf", "path": str(_model(tmp_path / "m.onnx", 1.0))}]})
    doc = yaml.safe_load(path.read_text())
    doc["applications"][0]["args"]["flywheel_version"] = "0.0.1"
    path.write_text(yaml.safe_dump(doc))
    _serve_deploy(cluster, path)
    status = wait_for(lambda: (s := _app_status(cluster, "other")).get("status") == "DEPLOY_FAILED" and s,
                       120, "the deploy to fail")
    assert "written by Flywheel 0.0.1" in status["message"]
