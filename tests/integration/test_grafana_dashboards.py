"""Every panel query of deploy/grafana/ against a real Prometheus (Debian's
``prometheus``) scraping a real deployment under a short load.

The deployment shows what the dashboards show: an endpoint ``mlp`` with a
bandit over two variants, rewards fed back and a shadow variant; the digits
model from a registry with drift monitoring, capture and a continuous-training
loop (with a webhook). The load includes bad requests, so error series exist.
Each query, Grafana's variables filled in with every value Prometheus lists
for them, must evaluate without error to at least one series; the queries
in EXEMPT (series that only a loop run creates) must still evaluate without
error.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
import yaml

from flywheel.serving import parse_config
from flywheel.serving.app import deploy, undeploy

from _digits import digits_in_production
from _dashboards import files, load, query_variables, substitute, targets
from _poll import wait_for
from _ports import free_port

pytestmark = pytest.mark.integration

PROMETHEUS = "/usr/bin/prometheus"
# query id -> why it has no series in this test (it must still evaluate)
EXEMPT = {
    "flywheel-training-loops:Runs started by trigger:A":
        "a loop run starts a Ray Train job (20 s and more on 2 cores)",
    "flywheel-training-loops:Triggers suppressed:A": "a guard rail must suppress a trigger of a running loop",
    "flywheel-drift:Refused windows and connections:A":
        "only a chi2/psi test refuses a window, on inputs that are not integer codes",
    "flywheel-drift:Refused windows and connections:B":
        "only a connection to the drift monitor without the deployment secret is refused",
}
JOB = {  # a loop needs a job template; no run starts here (no triggers)
    "name": "digits-loop", "model": {"architecture": "mlp",
                                     "hparams": {"in_features": 64, "hidden": [16], "out_features": 10}},
    "dataset": {"kind": "digits"}, "resources": {"workers": 1, "cpus_per_worker": 0.5},
    "epochs": 1, "batch_size": 64,
}


def _body(rows: np.ndarray, rid: str | None = None) -> str:
    doc = {"inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32",
                       "data": rows.ravel().tolist()}]}
    if rid:
        doc["id"] = rid
    return json.dumps(doc)


def _post(conn: http.client.HTTPConnection, path: str, body: str) -> tuple[int, dict, bytes]:
    conn.request("POST", path, body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, dict(resp.getheaders()), resp.read()


def _load(port: int, rng: np.random.Generator) -> dict[str, int]:
    """A few hundred requests: the bandit endpoint with rewards for half of
    its answers, digits rows for drift and capture, and bad requests."""
    statuses: dict[str, int] = {}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for i in range(200):
            status, _, _ = _post(conn, "/v2/models/mlp/infer", _body(rng.random((1, 64), np.float32), f"r{i}"))
            statuses[f"mlp {status}"] = statuses.get(f"mlp {status}", 0) + 1
            if status == 200 and i % 2 == 0:
                fb = json.dumps({"id": f"r{i}", "reward": float(i % 4 == 0)})
                status, _, _ = _post(conn, "/v2/models/mlp/feedback", fb)
                statuses[f"feedback {status}"] = statuses.get(f"feedback {status}", 0) + 1
        for _ in range(150):  # 150 rows: more than one drift window of 100
            status, _, _ = _post(conn, "/v2/models/digits/infer", _body(rng.random((1, 64), np.float32)))
            statuses[f"digits {status}"] = statuses.get(f"digits {status}", 0) + 1
        for _ in range(20):  # the wrong shape: invalid_argument errors
            status, _, _ = _post(conn, "/v2/models/mlp/infer", _body(rng.random((1, 7), np.float32)))
            statuses[f"bad {status}"] = statuses.get(f"bad {status}", 0) + 1
    finally:
        conn.close()
    return statuses


class Prometheus:
    """Debian's prometheus on a free loopback port, scraping ``target``
    (host:port) every second, its storage in ``home``."""

    def __init__(self, home, target: str) -> None:
        self.port = free_port()
        config = home / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "flywheel", "static_configs": [{"targets": [target]}]}],
        }))
        self.log = home / "prometheus.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={home / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def api(self, path: str, **params) -> dict:
        """The API's JSON answer, error answers (400, 422) included."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read())

    def query(self, expr: str) -> dict:
        return self.api("query", query=expr)

    def series(self, expr: str) -> list:
        answer = self.query(expr)
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def scraped(ray_session, mlp_onnx, digits_model, tmp_path_factory):
    """(prometheus, {dashboard file: {variable: values}}) once Prometheus has
    scraped the deployment through and after the load."""
    if not os.path.exists(PROMETHEUS):
        pytest.skip("prometheus not installed (Debian's prometheus package; `make system-deps` installs it)")
    home = tmp_path_factory.mktemp("grafana")
    uri, artifacts = digits_in_production(home, digits_model)
    mlp = {"name": "mlp", "path": mlp_onnx, "num_cpus": 0.05}
    cfg = parse_config({
        "name": "grafana", "server": {"port": 0, "grpc_port": -1},
        "registry": {"uri": uri, "artifacts": artifacts},
        "models": [{**mlp, "version": v} for v in ("1", "2", "3")] + [
            {"name": "digits", "ref": "digits@production", "num_cpus": 0.05,
             "drift": {"enabled": True, "sample_rate": 1.0, "window": 100, "batch_rows": 20,
                       "flush_interval_s": 0.1, "tests": ["ks"]}}],
        "endpoints": [
            {"name": "mlp", "policy": {"kind": "epsilon_greedy", "epsilon": 0.5, "arms": ["1", "2"]},
             "shadow": {"variant": "3", "fraction": 1.0}},
            {"name": "digits", "capture": {"path": str(home / "captures"), "sample": 1.0, "max_file_age_s": 1,
                                           "flush_interval_s": 0.2}}],
        "loops": [{"name": "keep-digits", "endpoint": "digits", "job": JOB, "data": {"captured": False},
                   "notify": [{"url": f"http://127.0.0.1:{free_port()}/hook", "secret": "s"}], "tick_s": 0.5}],
    })
    dep = deploy(cfg)
    prom = None
    try:
        port = int(dep.url.rsplit(":", 1)[1])
        prom = Prometheus(home, f"127.0.0.1:{port}")
        wait_for(prom.ready, 30, "prometheus to be ready")
        wait_for(lambda: prom.series('up{job="flywheel"} == 1'), 30, "a first scrape of the ingress")
        statuses = _load(port, np.random.default_rng(0))
        print(f"\nload: {statuses}")
        assert statuses["bad 400"] == 20
        # the drift monitor scores its window, the controller's totals catch up
        wait_for(lambda: prom.series("flywheel_drift_statistic"), 30, "a drift window scored and scraped")
        wait_for(lambda: prom.series("flywheel_endpoint_reward_sum_total > 0"), 30, "rewards in the totals")
        caught_up = time.time()
        # two more scrapes: the series that appeared last have two samples for rate()
        wait_for(lambda: float(prom.series("timestamp(up)")[0]["value"][1]) > caught_up + 2.5, 30, "two more scrapes")
        variables = {}
        for path in files():
            variables[path.name] = {
                name: sorted(prom.api(f"label/{label}/values", **{"match[]": metric})["data"])
                for name, (metric, label) in query_variables(load(path)).items()}
        yield prom, variables
    finally:
        if prom is not None:
            prom.stop()
        undeploy(dep)


def test_every_dashboard_variable_lists_values(scraped):
    _, variables = scraped
    assert variables["flywheel-endpoints.json"]["endpoint"] == ["digits", "mlp"]
    assert variables["flywheel-serving-overview.json"]["model"] == ["digits", "mlp"]
    assert variables["flywheel-drift.json"]["model"] == ["digits"]
    assert variables["flywheel-training-loops.json"]["loop"] == ["keep-digits"]


@pytest.mark.parametrize("target", targets(), ids=lambda t: t.id)
def test_a_panel_query_returns_series(scraped, target):
    prom, variables = scraped
    expr = substitute(target.expr, variables[target.dashboard])
    answer = prom.query(expr)
    assert answer["status"] == "success", f"{expr}\n{answer.get('errorType')}: {answer.get('error')}"
    if target.id in EXEMPT:
        return
    assert answer["data"]["result"], f"no series: {expr}"


def test_the_exemptions_name_real_queries():
    assert set(EXEMPT) <= {t.id for t in targets()}
