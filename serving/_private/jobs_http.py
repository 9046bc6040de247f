"""Training jobs as the console reads and cancels them (see console_http.py).

    GET  /v2/jobs?state=running                   JobList, newest first   (operate)
    GET  /v2/jobs/{id}?log_lines=50               JobDetail               (operate)
    POST /v2/jobs/{id}/cancel                     JobSummary after it     (admin)

Read through training's public face (a TrainingRuntime on the deployment's
registry, which never starts a scheduler here): the same records, epochs
and log ``flywheel train`` shows. Cancelling is ``flywheel train --cancel``'s
call; since that leaves no audit entry of its own, the registry's audit log
records who cancelled (action ``cancel_job``, the job's name as model).
"""

from __future__ import annotations

import msgspec

from flywheel.serving._private import console_http as c
from flywheel.serving._private.console_types import EpochMetrics, JobDetail, JobList, JobSummary
from flywheel.serving._private.http_server import Request
from flywheel.training.jobs import STATES

DEFAULT_LOG_LINES = 50
MAX_LOG_LINES = 1000


def plan(method: str, req: Request, parts: list[str]):
    """``parts``: the split path after ``/v2/jobs``."""
    if any(not p for p in parts) or len(parts) > 2 or (len(parts) == 2 and parts[1] != "cancel"):
        return c.no_route(req)
    if not parts:
        if refused := c.only(req, method, ("GET",)):
            return refused
        raw = c.query(req, ("state",)).get("state")
        states = None if raw is None else raw.split(",")
        if states is not None and any(s not in STATES for s in states):
            raise c.FieldError("state", f"state {raw!r}: give one or more of {', '.join(STATES)}, comma-separated")
        return (lambda con, _a: JobList([_summary(r) for r in con.training().list_jobs(states)])), 200, False
    job_id = parts[0]
    if len(parts) == 2:
        if refused := c.only(req, method, ("POST",)):
            return refused
        c.query(req, ())
        if req.body.strip():
            raise c.FieldError("body", "cancel takes no body")
        return (lambda con, actor: _cancel(con, job_id, actor)), 200, True
    if refused := c.only(req, method, ("GET",)):
        return refused
    lines = c.int_param(c.query(req, ("log_lines",)), "log_lines", DEFAULT_LOG_LINES, 0, MAX_LOG_LINES)
    return (lambda con, _a: _detail(con, job_id, lines)), 200, False


def _summary(rec) -> JobSummary:
    return JobSummary(rec.id, rec.name, rec.state, rec.priority, rec.submitted_at, rec.started_at, rec.finished_at,
                      rec.attempts, rec.cancel_requested, rec.error, rec.result)


def _detail(con, job_id: str, lines: int) -> JobDetail:
    job = con.training().attach(job_id)  # NotFoundError naming the id
    rec = job.status()
    epochs = [msgspec.convert(row, EpochMetrics, strict=False) for row in job.metrics()]
    tail = job.logs().splitlines()[-lines:] if lines else []
    return JobDetail(_summary(rec), rec.spec, epochs, job.progress(), tail)


def _cancel(con, job_id: str, actor: str) -> JobSummary:
    rec = con.training().attach(job_id).cancel()
    con.registry().record(actor, "cancel_job", rec.name, detail={"job": rec.id, "state": rec.state})
    return _summary(rec)
