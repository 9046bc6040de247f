"""The console's ``/v2/jobs`` in-process (no Ray: no scheduler is started)
against a real job store in a SQLite registry: jobs with their epochs and
log tail, cancelling through the job's own cancel (audited as the caller),
4xx naming the parameter."""

from __future__ import annotations

import asyncio
import json

import pytest

from flywheel.registry import Registry
from flywheel.serving._private.console_http import ConsoleHttp
from flywheel.serving._private.dataplane import DataPlane
from flywheel.serving._private.http_routes import HttpRoutes
from flywheel.serving._private.http_server import Request
from flywheel.serving.metrics import ServingMetrics
from flywheel.serving.router import Router
from flywheel.training.jobs import JobStore


@pytest.fixture
def jobs(tmp_path):
    uri = f"sqlite:///{tmp_path}/registry.db"
    store = JobStore.open(uri)
    folder = tmp_path / "digits-job"
    folder.mkdir()
    # what a run writes (training/loop.py): one JSON line per epoch, and its log
    (folder / "metrics.jsonl").write_text(
        json.dumps({"epoch": 0, "global_step": 10, "loss": 1.5, "val_accuracy": 0.6}) + "\n"
        + json.dumps({"epoch": 1, "global_step": 20, "loss": 0.5, "val_accuracy": 0.9}) + "\n")
    (folder / "log.txt").write_text("".join(f"line {i}\n" for i in range(100)))
    store.submit({"name": "digits"}, name="digits", priority=0, storage=str(folder), job_id="job1")
    store.submit({"name": "other"}, name="other", priority=0, storage=str(tmp_path / "x"), job_id="job2")
    con = ConsoleHttp(uri, str(tmp_path / "artifacts"))
    routes = HttpRoutes(DataPlane(Router([], ServingMetrics([]))), console=con)

    def call(method: str, path: str, body: bytes = b"", query: str = ""):
        resp = routes.handle(Request(method, path, {}, body, query))
        if asyncio.iscoroutine(resp):
            resp = asyncio.run(resp)
        return resp[0], json.loads(resp[1])

    yield call, uri
    con.close()
    store.close()


def test_jobs_are_listed_newest_first_and_filtered_by_state(jobs):
    call, _ = jobs
    status, body = call("GET", "/v2/jobs")
    assert (status, [j["id"] for j in body["jobs"]]) == (200, ["job2", "job1"])
    status, body = call("GET", "/v2/jobs", query="state=running,succeeded")
    assert (status, body["jobs"]) == (200, [])


def test_a_job_shows_its_epochs_and_the_tail_of_its_log(jobs):
    call, _ = jobs
    status, body = call("GET", "/v2/jobs/job1", query="log_lines=2")
    assert status == 200
    assert body["job"]["state"] == "queued"
    assert [(e["epoch"], e["loss"], e["val_accuracy"]) for e in body["epochs"]] == [(0, 1.5, 0.6), (1, 0.5, 0.9)]
    assert body["log_tail"] == ["line 98", "line 99"]


def test_cancelling_a_queued_job_ends_it_and_is_audited(jobs):
    call, uri = jobs
    status, body = call("POST", "/v2/jobs/job1/cancel")
    assert (status, body["state"]) == (200, "cancelled")
    reg = Registry.open(uri, "unused")
    try:
        entry = reg.audit(model="digits")[-1]
    finally:
        reg.close()
    assert (entry.actor, entry.action, entry.after["job"]) == ("http:unauthenticated", "cancel_job", "job1")
    status, body = call("POST", "/v2/jobs/job1/cancel")
    assert status == 412  # already ended: nothing to cancel


@pytest.mark.parametrize("method, path, body, query, status, field", [
    ("GET", "/v2/jobs", b"", "state=done", 400, "state"),
    ("GET", "/v2/jobs", b"", "limit=3", 400, "limit"),
    ("GET", "/v2/jobs/job1", b"", "log_lines=-1", 400, "log_lines"),
    ("GET", "/v2/jobs/job1", b"", "log_lines=5000", 400, "log_lines"),
    ("POST", "/v2/jobs/job1/cancel", b'{"now": true}', "", 400, "body"),
    ("GET", "/v2/jobs/nope", b"", "", 404, None),
    ("POST", "/v2/jobs/nope/cancel", b"", "", 404, None),
    ("GET", "/v2/jobs/job1/cancel", b"", "", 405, None),
    ("GET", "/v2/jobs/job1/metrics", b"", "", 404, None),
])
def test_bad_requests_get_a_4xx_that_says_why(jobs, method, path, body, query, status, field):
    call, _ = jobs
    got, answer = call(method, path, body, query)
    assert got == status, answer
    assert answer["error"]
    if field is not None:
        assert answer["field"] == field
