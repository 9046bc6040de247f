"""The flywheel turning on real Ray, with nobody in the loop.

One deployment of the digits model, with auth on, capture of every request,
drift monitoring and a loop whose candidates train on captured + original
data on Ray Train. A load thread sends requests (and labelled feedback)
throughout; a local webhook receiver records the loop's notifications.

(a) The live inputs shift (inverted images): the drift trigger fires, the job
    trains on what production saw, the gates pass, the canary promotes, the
    new version answers, the webhook heard it all in order.
(c) With an approval rule, a manual run waits in ``awaiting_approval``; the
    loop controller is killed there; Serve restarts it, an admin approves
    over HTTP, and the restarted controller finishes the run.
(b) Labels permuted: the candidate learns wrong answers; it is refused by the
    gates or rolled back by the canary's reward gate, production stays, and
    the run says why.
(d) The controller is killed while its run's job trains (the job's runner
    dies with it): the restarted controller finds the job dead, resumes it
    from its checkpoint and finishes the run, with one job, not two.

Not one request of the load thread fails, from the first run to the last.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import msgspec
import numpy as np
import pytest

from flywheel.bench.loop import LOOP, demo_config
from flywheel.bench.loop_traffic import LabelledTraffic
from flywheel.common import load_settings
from flywheel.registry import LoopStore, Registry, parse_policy
from flywheel.registry.keys import KeyStore
from flywheel.serving import parse_config
from flywheel.serving.app import deploy, undeploy
from flywheel.training.jobs import JobStore

from _digits import digits_in_production
from _poll import wait_for

pytestmark = pytest.mark.integration

SECRET = "webhook-secret"
NOT_WORSE = {"rule": "not_worse_than_production", "metric": "val_accuracy", "tolerance": 0.02}


class Hooks:
    """A webhook receiver on loopback: the events in arrival order, and
    whether each signature verified."""

    def __init__(self):
        self.events: list[tuple[str, dict, bool]] = []
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                want = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
                ok = hmac.compare_digest(want, self.headers.get("X-Flywheel-Signature", ""))
                doc = json.loads(body)
                hooks.events.append((doc["event"], doc["payload"], ok))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def names(self, run: str | None = None) -> list[str]:
        return [e for e, p, _ in self.events if run is None or p.get("run") == run]

    def close(self):
        self.server.shutdown()


@pytest.fixture(scope="module")
def turning(ray_session, digits_model, tmp_path_factory):
    home = tmp_path_factory.mktemp("loop-home")
    uri, artifacts = digits_in_production(home, digits_model)
    reg = Registry.open(uri, artifacts)
    keys = KeyStore.open(uri)
    _, admin = keys.create("alice", ["admin"], actor="tests")
    _, app_key = keys.create("app", ["predict"], actor="tests")
    keys.close()
    hooks = Hooks()
    capture = str(home / "captures")
    notify = [{"url": hooks.url, "secret": SECRET, "backoff_s": 0.1}]
    cfg = parse_config(demo_config(uri, artifacts, capture, name="turning", auth=True, notify=notify))
    # the controller's training jobs keep their folders under this home, not the working directory's
    dep = deploy(cfg, settings=msgspec.structs.replace(load_settings(), home=str(home)))
    traffic = LabelledTraffic(dep.url, app_key).start()
    store = LoopStore.open(uri)
    w = type("World", (), {})()
    w.dep, w.reg, w.store, w.hooks, w.traffic, w.admin, w.capture = dep, reg, store, hooks, traffic, admin, capture
    w.uri = uri
    try:
        yield w
    finally:
        traffic.stop()
        undeploy(dep)
        hooks.close()
        store.close()
        reg.close()


def _runs(w):
    return w.store.runs("turning", LOOP, limit=50)


def _finished_run(w, count: int, timeout: float = 300):
    def done():
        runs = _runs(w)
        return runs[0] if len(runs) >= count and runs[0].finished else None
    return wait_for(done, timeout, f"loop run #{count} to finish", every_s=1.0)


def _inverted_accuracy(reg, version: int) -> float:
    from sklearn.datasets import load_digits

    from flywheel.loops.evaluate import onnx_accuracy

    d = load_digits()
    _, path = reg.artifact_path(f"digits/{version}", "model.onnx")
    return onnx_accuracy(path, (1.0 - d.data / 16.0).astype(np.float32), d.target)


def _admin(w, method: str, path: str, body=None):
    req = urllib.request.Request(f"{w.dep.url}{path}", method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Bearer {w.admin}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, json.loads(r.read() or b"{}")


def test_a_drift_triggered_run_promotes_a_candidate_trained_on_what_production_saw(turning):
    w = turning
    wait_for(lambda: w.traffic.requests >= 50, 60, "the load thread's first answers")
    # Paused while the live distribution moves, so that production has seen
    # (and captured) some hundreds of shifted inputs when the drift trigger
    # may fire: a run that fired on the first shifted windows trained on a
    # few dozen of them and could lose the gate to noise (seen in CI).
    _admin(w, "POST", f"/v2/loops/{LOOP}/pause")
    w.traffic.inverted = True
    shifted_from = w.traffic.requests
    wait_for(lambda: w.traffic.requests >= shifted_from + 600, 180, "600 answers to shifted inputs")
    _admin(w, "POST", f"/v2/loops/{LOOP}/resume")
    run = _finished_run(w, 1)
    assert run.trigger == "drift"
    assert run.outcome == "promoted", run.detail
    v = run.detail["version"]
    assert run.detail["dataset_source"]["kind"] == "captured"  # what it was read from, at submission
    assert run.detail["dataset"]["kind"] == "parquet"  # the rows fixed then (a resume reads the same)
    ev = run.detail["evaluation"]
    # what the gate let through: within its tolerance of production on the
    # run's held-out rows (a few dozen: a point either way is noise)
    assert ev["candidate_val_accuracy"] >= ev["production_val_accuracy"] - NOT_WORSE["tolerance"]
    # what it learned from production's traffic: the shifted inputs, which
    # production never saw, scored on every digits image inverted
    inverted = {which: _inverted_accuracy(w.reg, version) for which, version in
                (("candidate", v), ("production", run.detail["production"]))}
    assert inverted["candidate"] > inverted["production"] + 0.2, inverted
    assert w.reg.resolve("digits@production").version == v
    wait_for(lambda: w.traffic.versions.get(str(v), 0) > 20, 60, f"answers from version {v}")
    chain = [e.action for e in w.reg.audit(loop_run=run.id)]
    assert chain[0] == "loop_trigger"
    assert chain[-1] == "loop_outcome"
    for step in ("loop_job", "loop_version", "loop_evaluation", "loop_gates", "loop_canary"):
        assert step in chain
    names = wait_for(lambda: (lambda n: n if "run_finished" in n else None)(w.hooks.names(run.id)), 30,
                     "the run_finished webhook")
    assert names.count("drift_detected") == 1
    ordered = [n for n in names if n in ("drift_detected", "run_started", "canary_promoted", "run_finished")]
    assert ordered == ["drift_detected", "run_started", "canary_promoted", "run_finished"]
    assert all(ok for _, _, ok in w.hooks.events)
    status, body = _admin(w, "GET", f"/v2/loops/{LOOP}/runs")
    assert status == 200
    assert body["runs"][0]["outcome"] == "promoted"
    req = urllib.request.Request(f"{w.dep.url}/metrics", headers={"Authorization": f"Bearer {w.admin}"})
    metrics = urllib.request.urlopen(req, timeout=30).read().decode()
    assert f'flywheel_loop_runs_finished_total{{loop="{LOOP}",outcome="promoted"}} 1.0' in metrics
    assert "flywheel_capture_rows_total{" in metrics
    assert w.traffic.failures == []


def test_a_killed_controller_resumes_a_run_waiting_for_approval(turning):
    from ray import serve

    w = turning
    _admin(w, "POST", f"/v2/loops/{LOOP}/pause")  # only the runs this test asks for
    w.traffic.labelled = False  # what this run trains on was labelled before it (the next test's data is its own)
    # an operator's rule: the loop's own policy was applied once and does not undo it
    w.reg.set_policy("digits", parse_policy({"rules": [NOT_WORSE, {"rule": "approvals", "count": 1}]}),
                     actor="tests")
    status, _ = _admin(w, "POST", f"/v2/loops/{LOOP}/trigger", {"note": "approval test"})
    assert status == 202

    def waiting():
        runs = _runs(w)
        return runs[0] if len(runs) >= 2 and runs[0].phase == "awaiting_approval" else None

    run = wait_for(waiting, 300, "the manual run to wait for approval", every_s=1.0)
    assert run.trigger == "manual"
    handle = serve.get_deployment_handle("loops", "turning")
    pid = handle.pid.remote().result(timeout_s=30)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: _alive_other_pid(handle, pid), 120, "a new loop controller replica")
    status, body = _admin(w, "POST", f"/v2/models/digits/versions/{run.detail['version']}/approve",
                          {"comment": "looks good"})
    assert status == 200
    done = _finished_run(w, 2)
    assert done.id == run.id
    assert done.outcome == "promoted", done.detail
    assert w.reg.resolve("digits@production").version == run.detail["version"]
    assert "approval_needed" in w.hooks.names(run.id)
    assert w.traffic.failures == []


def _alive_other_pid(handle, old: int):
    try:
        return handle.pid.remote().result(timeout_s=5) != old
    except Exception:  # noqa: BLE001 - the replica is still being replaced
        return False


def test_a_worse_candidate_never_reaches_production(turning):
    w = turning
    before = w.reg.resolve("digits@production").version
    w.reg.set_policy("digits", parse_policy({"rules": [NOT_WORSE]}), actor="tests")
    w.traffic.permuted = True
    w.traffic.labelled = True
    since = time.time()
    wait_for(lambda: w.traffic.requests > 0 and _labels_since(w, since) >= 300, 120, "permuted labels captured")
    _admin(w, "POST", f"/v2/loops/{LOOP}/trigger", {"note": "permuted labels"})
    run = _finished_run(w, 3)
    assert run.outcome in ("refused", "rolled_back"), run.detail
    assert run.detail["outcome_reason"]
    assert w.reg.resolve("digits@production").version == before
    assert w.traffic.failures == []
    names = w.hooks.names(run.id)
    assert ("gate_refused" in names) or ("canary_rolled_back" in names)


def test_a_controller_killed_while_its_job_trains_resumes_the_job_and_finishes_the_run(turning):
    from ray import serve

    w = turning
    w.traffic.permuted = False
    _admin(w, "POST", f"/v2/loops/{LOOP}/trigger", {"note": "kill while training"})

    def training():
        runs = _runs(w)
        run = runs[0] if len(runs) >= 4 else None
        return run if run is not None and run.phase == "training" and run.detail.get("job_id") else None

    run = wait_for(training, 120, "the run's job to be submitted", every_s=0.5)
    jobs = JobStore.open(w.uri)
    try:  # taken by the controller's own runner (not still queued), so that it dies with it
        wait_for(lambda: jobs.get(run.detail["job_id"]).state == "running", 120, "the job to run", every_s=0.2)
    finally:
        jobs.close()
    handle = serve.get_deployment_handle("loops", "turning")
    pid = handle.pid.remote().result(timeout_s=30)
    os.kill(pid, signal.SIGKILL)  # the job's runner dies with it
    done = _finished_run(w, 4, timeout=420)
    assert done.id == run.id
    assert done.outcome in ("promoted", "rolled_back", "refused"), done.detail
    assert done.detail["job_id"] == run.detail["job_id"]  # the same job, resumed, not a second one
    kinds = [e.kind for e in w.store.events("turning", LOOP, run_id=run.id)]
    assert kinds.count("job_submitted") == 1
    assert "job_resumed" in kinds
    assert w.traffic.failures == []


def _labels_since(w, since: float) -> int:
    from flywheel.common.capture_files import read_captured

    return len(read_captured(w.capture, "digits", since=since))
