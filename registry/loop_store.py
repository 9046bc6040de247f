"""Durable state of continuous-training loops, in the registry's database.

Three things outlive the loop controller's process here: each loop's own
document (paused or not, what its triggers remember), one row per run (its
phase, so that a restarted controller resumes it where it stopped), and the
events of a loop (the timeline, suppressed triggers included). This module
knows nothing of the loop's phases; loops/ owns them.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec

from flywheel.protocol.errors import NotFoundError, PreconditionFailedError
from flywheel.registry.db import Db, connect
from flywheel.registry.migrations import migrate

_ENC = msgspec.json.Encoder()
_RUN_COLUMNS = ("id, deployment, loop, endpoint, trigger, reason, phase, outcome, started_at, updated_at, "
                "finished_at, detail")


class LoopRun(msgspec.Struct, frozen=True):
    """One turn of a loop. ``outcome`` is "" while it runs; ``detail`` holds
    what its phases found (job id, candidate version, gate failures ...)."""

    id: str
    deployment: str
    loop: str
    endpoint: str
    trigger: str
    reason: str
    phase: str
    outcome: str
    started_at: float
    updated_at: float
    finished_at: float | None
    detail: dict[str, Any]

    @property
    def finished(self) -> bool:
        return self.finished_at is not None


class LoopEvent(msgspec.Struct, frozen=True):
    id: int
    loop: str
    run_id: str  # "" for an event outside a run (a suppressed trigger)
    ts: float
    kind: str
    detail: dict[str, Any]


def _run(row: tuple) -> LoopRun:
    *head, detail = row
    return LoopRun(*head, msgspec.json.decode(detail))


class LoopStore:
    """Thread-safe as far as its Db is (one connection per thread)."""

    def __init__(self, db: Db) -> None:
        self._db = db
        migrate(db)

    @classmethod
    def open(cls, uri: str) -> LoopStore:
        return cls(connect(uri))

    def close(self) -> None:
        self._db.close()

    # -- a loop's own document -------------------------------------------------
    def load_state(self, deployment: str, loop: str) -> dict[str, Any]:
        rows = self._db.execute(
            "SELECT state FROM loop_state WHERE deployment = ? AND loop = ?", (deployment, loop))
        return msgspec.json.decode(rows[0][0]) if rows else {}

    def save_state(self, deployment: str, loop: str, state: dict[str, Any]) -> None:
        doc = _ENC.encode(state).decode()
        with self._db.tx():
            self._db.execute("DELETE FROM loop_state WHERE deployment = ? AND loop = ?", (deployment, loop))
            self._db.execute(
                "INSERT INTO loop_state (deployment, loop, state, updated_at) VALUES (?, ?, ?, ?)",
                (deployment, loop, doc, time.time()))

    def loops(self, deployment: str | None = None) -> list[tuple[str, str, dict[str, Any], float]]:
        """Every loop that has state: (deployment, loop, state, updated_at)."""
        sql, args = "SELECT deployment, loop, state, updated_at FROM loop_state", ()
        if deployment is not None:
            sql, args = sql + " WHERE deployment = ?", (deployment,)
        rows = self._db.execute(sql + " ORDER BY deployment, loop", args)
        return [(d, lp, msgspec.json.decode(st), ts) for d, lp, st, ts in rows]

    # -- runs --------------------------------------------------------------------
    def start_run(self, deployment: str, loop: str, endpoint: str, *, trigger: str, reason: str,
                  phase: str, detail: dict[str, Any] | None = None, now: float | None = None) -> LoopRun:
        """A new run, unless one of ``endpoint``'s runs is unfinished: then
        PreconditionFailedError naming it (one run per endpoint at a time,
        checked in the same transaction that inserts)."""
        now = time.time() if now is None else now
        run_id = f"{loop}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}-{uuid.uuid4().hex[:6]}"
        with self._db.tx():
            busy = self._db.execute(
                "SELECT id FROM loop_runs WHERE deployment = ? AND endpoint = ? AND finished_at IS NULL",
                (deployment, endpoint))
            if busy:
                raise PreconditionFailedError(f"endpoint {endpoint!r} already has a loop run in progress: {busy[0][0]}")
            self._db.execute(
                f"INSERT INTO loop_runs ({_RUN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, '', ?, ?, NULL, ?)",
                (run_id, deployment, loop, endpoint, trigger, reason, phase, now, now,
                 _ENC.encode({**(detail or {}), "phase_since": now}).decode()))
        return self.get_run(run_id)

    def get_run(self, run_id: str) -> LoopRun:
        rows = self._db.execute(f"SELECT {_RUN_COLUMNS} FROM loop_runs WHERE id = ?", (run_id,))
        if not rows:
            raise NotFoundError(f"no loop run {run_id!r}")
        return _run(rows[0])

    def update_run(self, run_id: str, *, phase: str | None = None, outcome: str | None = None,
                   detail: dict[str, Any] | None = None, finish: bool = False,
                   now: float | None = None) -> LoopRun:
        """Move a run on: a new phase, details merged into its document, and
        with ``finish`` its end (an outcome is required then)."""
        now = time.time() if now is None else now
        with self._db.tx():
            run = self.get_run(run_id)
            if run.finished:
                raise PreconditionFailedError(f"loop run {run_id} has already finished ({run.outcome})")
            merged = {**run.detail, **(detail or {})}
            if phase and phase != run.phase:
                merged["phase_since"] = now  # when the run entered its phase (a stuck-run alert reads it)
            if finish and not (outcome or run.outcome):
                raise ValueError("a finished run needs an outcome")
            self._db.execute(
                "UPDATE loop_runs SET phase = ?, outcome = ?, updated_at = ?, finished_at = ?, detail = ? "
                "WHERE id = ?",
                (phase or run.phase, outcome if outcome is not None else run.outcome, now,
                 now if finish else None, _ENC.encode(merged).decode(), run_id))
        return self.get_run(run_id)

    def runs(self, deployment: str, loop: str | None = None, *, unfinished: bool = False,
             since: float | None = None, limit: int = 100) -> list[LoopRun]:
        """Runs, newest first."""
        where, args = ["deployment = ?"], [deployment]
        if loop is not None:
            where.append("loop = ?")
            args.append(loop)
        if unfinished:
            where.append("finished_at IS NULL")
        if since is not None:
            where.append("started_at >= ?")
            args.append(since)
        rows = self._db.execute(
            f"SELECT {_RUN_COLUMNS} FROM loop_runs WHERE {' AND '.join(where)} ORDER BY started_at DESC, id DESC "
            "LIMIT ?", (*args, int(limit)))
        return [_run(r) for r in rows]

    # -- events ------------------------------------------------------------------
    def add_event(self, deployment: str, loop: str, kind: str, detail: dict[str, Any] | None = None, *,
                  run_id: str = "", now: float | None = None) -> None:
        with self._db.tx():
            self._db.execute(
                "INSERT INTO loop_events (deployment, loop, run_id, ts, kind, detail) VALUES (?, ?, ?, ?, ?, ?)",
                (deployment, loop, run_id, time.time() if now is None else now, kind,
                 _ENC.encode(detail or {}).decode()))

    def events(self, deployment: str, loop: str, *, run_id: str | None = None, after_id: int = 0,
               limit: int = 1000) -> list[LoopEvent]:
        """Events oldest first; ``after_id`` pages on."""
        where, args = ["deployment = ?", "loop = ?", "id > ?"], [deployment, loop, after_id]
        if run_id is not None:
            where.append("run_id = ?")
            args.append(run_id)
        rows = self._db.execute(
            f"SELECT id, loop, run_id, ts, kind, detail FROM loop_events WHERE {' AND '.join(where)} "
            "ORDER BY id LIMIT ?", (*args, int(limit)))
        return [LoopEvent(i, lp, r, ts, k, msgspec.json.decode(d)) for i, lp, r, ts, k, d in rows]
