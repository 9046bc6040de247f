"""The durable training job queue: one row per job in the registry's database.

A job is ``queued`` when submitted, ``running`` once a runner (a scheduler
process) claims it, and ends ``succeeded``, ``failed`` or ``cancelled``.
Runners prove they are alive with heartbeats; a running job whose heartbeat
is old lost its runner and can be requeued (same id and storage, so it
resumes from its checkpoints). The database is the registry's (SQLite by
default, PostgreSQL on a cluster), so the queue outlives every process and
several schedulers may share it.

Every read-modify-write runs in one transaction that holds the queue lock:
SQLite's BEGIN IMMEDIATE (one writer at a time) or, on PostgreSQL, a
transaction-scoped advisory lock. Claims are therefore atomic across threads,
processes and hosts. Times are the wall clock of the process that writes
them; hosts sharing a queue need roughly synchronised clocks (NTP) for
staleness to mean anything.

No Ray here: the Ray side of training drives this store.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
import msgspec

from flywheel.registry.db import Db, connect
from flywheel.registry.migrations import migrate
from flywheel.protocol.errors import (
    AlreadyExistsError,
    InvalidInputError,
    NotFoundError,
    PreconditionFailedError,
)
from flywheel.training.spec import NAME_RE, PRIORITY_RANGE, ResourcesSpec

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = ("succeeded", "failed", "cancelled")

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # ids name storage folders
_COLUMNS = ("id, name, spec, priority, state, submitted_at, started_at, finished_at, attempts, runner, "
            "heartbeat_at, cancel_requested, error, result, storage")
_QUEUE_LOCK = 0x466C7951  # pg_advisory_xact_lock key; distinct from the migration lock
_FIT_SLACK = 1e-9  # 3 * 0.1 CPUs is 0.30000000000000004: fits in 0.3
_ENC = msgspec.json.Encoder()


class JobRecord(msgspec.Struct, frozen=True):
    """A job as stored. ``spec`` is the dict given to submit (normally
    ``spec_to_dict(JobSpec)``); ``result`` what the runner reported at the
    end; ``attempts`` counts claims (1 after the first start); times are Unix
    seconds."""

    id: str
    name: str
    spec: dict
    priority: int
    state: str
    submitted_at: float
    started_at: float | None
    finished_at: float | None
    attempts: int
    runner: str
    heartbeat_at: float | None
    cancel_requested: bool
    error: str
    result: dict
    storage: str


def _record(row: tuple) -> JobRecord:
    (job_id, name, spec, priority, state, submitted, started, finished, attempts, runner, heartbeat,
     cancel, error, result, storage) = row
    return JobRecord(job_id, name, msgspec.json.decode(spec), priority, state, submitted, started, finished,
                     attempts, runner, heartbeat, bool(cancel), error, msgspec.json.decode(result), storage)


def _needs(spec: dict) -> tuple[float, float]:
    """(CPUs, GPUs) that all of a job's workers together ask for."""
    try:
        res = msgspec.convert(spec.get("resources") or {}, ResourcesSpec, strict=False)
    except (msgspec.ValidationError, AttributeError) as exc:
        raise InvalidInputError(f"job spec resources: {exc}") from None
    return res.total_cpus, res.total_gpus


def _fits(need: float, free: float | None) -> bool:
    return free is None or need <= free + _FIT_SLACK


class JobStore:
    """Training jobs in the registry database (same URI as the registry).

    Thread-safe as far as its Db is (SQLite: one connection per thread;
    PostgreSQL: one connection, one transaction at a time). Several stores,
    in one process or many, may share one database. ``clock`` (Unix seconds)
    is for tests.
    """

    def __init__(self, db: Db, *, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._clock = clock
        migrate(db)

    @classmethod
    def open(cls, uri: str, *, clock: Callable[[], float] = time.time) -> JobStore:
        """A store on ``uri`` (``sqlite:///abs/path.db``, a file path or
        ``postgresql://...``); creates or upgrades the schema."""
        return cls(connect(uri), clock=clock)

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._db.tx():
            if self._db.dialect == "postgresql":
                # Row locks alone would let two claimers read the same queued
                # row and both pick it; the advisory lock serialises queue
                # writers the way BEGIN IMMEDIATE does on SQLite, and READ
                # COMMITTED then shows each the previous one's commit.
                self._db.execute("SELECT pg_advisory_xact_lock(?)", (_QUEUE_LOCK,))
            yield

    def _get(self, job_id: str) -> JobRecord:
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM training_jobs WHERE id = ?", (job_id,))
        if not rows:
            raise NotFoundError(f"no training job {job_id!r}")
        return _record(rows[0])

    def submit(self, spec: dict, *, name: str, priority: int, storage: str,
               job_id: str | None = None) -> JobRecord:
        """Queue a job; returns its record (state ``queued``, attempts 0).

        ``job_id``: 12 random hex characters unless given (letters, digits,
        ``_.-``, at most 64). The store reads only ``spec["resources"]``
        (for claim_next's fit check; validated here); validate the rest with
        ``parse_spec`` first. Submission times are strictly increasing
        across every store on the database, so ties in priority run in
        submission order.

        Raises InvalidInputError (bad name, id, priority or resources) and
        AlreadyExistsError (the id is taken).
        """
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise InvalidInputError(f"job name {name!r} must match {NAME_RE.pattern}")
        if (not isinstance(priority, int) or isinstance(priority, bool)
                or not PRIORITY_RANGE[0] <= priority <= PRIORITY_RANGE[1]):
            raise InvalidInputError(f"job priority {priority!r} must be an integer in {list(PRIORITY_RANGE)}")
        if job_id is not None and not _ID.match(job_id):
            raise InvalidInputError(f"job id {job_id!r} must match {_ID.pattern}")
        if not isinstance(spec, dict):
            raise InvalidInputError(f"job spec must be a dict, not {type(spec).__name__}")
        _needs(spec)
        doc = _ENC.encode(spec).decode()
        with self._locked():
            new_id = job_id or secrets.token_hex(6)
            while self._db.execute("SELECT 1 FROM training_jobs WHERE id = ?", (new_id,)):
                if job_id is not None:
                    raise AlreadyExistsError(f"training job {job_id!r} exists already")
                new_id = secrets.token_hex(6)  # a 48-bit collision: draw again
            last = self._db.execute("SELECT MAX(submitted_at) FROM training_jobs")[0][0]
            now = self._clock()
            if last is not None and now <= last:
                # Equal (or skewed) clock readings would leave the order of
                # equal-priority jobs to chance.
                now = last + 1e-6
            self._db.execute(
                f"INSERT INTO training_jobs ({_COLUMNS}) "
                "VALUES (?, ?, ?, ?, 'queued', ?, NULL, NULL, 0, '', NULL, 0, '', '{}', ?)",
                (new_id, name, doc, priority, now, storage),
            )
            return self._get(new_id)

    def get(self, job_id: str) -> JobRecord:
        """One job; NotFoundError naming the id when there is none."""
        return self._get(job_id)

    def list(self, states: Iterable[str] | None = None) -> list[JobRecord]:
        """Jobs in any of ``states`` (None = all), newest submission first.
        InvalidInputError for an unknown state."""
        sql = f"SELECT {_COLUMNS} FROM training_jobs"
        params: tuple[str, ...] = ()
        if states is not None:
            params = tuple(states)
            bad = [s for s in params if s not in STATES]
            if bad:
                raise InvalidInputError(f"job states {bad}: choose from {', '.join(STATES)}")
            if not params:
                return []
            sql += f" WHERE state IN ({', '.join('?' * len(params))})"
        return [_record(r) for r in self._db.execute(sql + " ORDER BY submitted_at DESC, id DESC", params)]

    def claim_next(self, runner: str, free_cpus: float | None = None,
                   free_gpus: float | None = None) -> JobRecord | None:
        """Atomically take the next job for ``runner``, or None when no
        queued job fits.

        The next job is the queued one with the highest priority (ties: the
        earliest submitted) whose workers together need at most ``free_cpus``
        CPUs and ``free_gpus`` GPUs (None = do not check that resource). A
        job that does not fit is skipped for a smaller one behind it
        (backfill; a big job can wait for as long as small ones keep
        fitting). Queued jobs with a pending cancel request are marked
        cancelled on the way. The claimed job becomes ``running`` with
        ``runner``, started_at = heartbeat_at = now and one more attempt.
        Safe with any number of concurrent claimers: each job goes to one.
        """
        if not runner:
            raise InvalidInputError("runner must name the claiming runner")
        with self._locked():
            now = self._clock()
            # Every queued spec is decoded per claim: queues are short (jobs
            # take minutes), and the schema keeps resources inside the spec.
            rows = self._db.execute(
                "SELECT id, spec, cancel_requested FROM training_jobs WHERE state = 'queued' "
                "ORDER BY priority DESC, submitted_at, id"
            )
            for job_id, doc, cancel in rows:
                if cancel:
                    self._db.execute(
                        "UPDATE training_jobs SET state = 'cancelled', finished_at = ? WHERE id = ?", (now, job_id)
                    )
                    continue
                cpus, gpus = _needs(msgspec.json.decode(doc))
                if _fits(cpus, free_cpus) and _fits(gpus, free_gpus):
                    self._db.execute(
                        "UPDATE training_jobs SET state = 'running', started_at = ?, finished_at = NULL, "
                        "runner = ?, heartbeat_at = ?, attempts = attempts + 1 WHERE id = ?",
                        (now, runner, now, job_id),
                    )
                    return self._get(job_id)
        return None

    def heartbeat(self, job_id: str, runner: str) -> bool:
        """Record that ``runner`` still runs ``job_id``. False tells the
        runner to stop: the job is no longer running under it (finished,
        requeued, taken over by another runner, unknown) or a cancel was
        requested. The heartbeat time is still recorded in the cancel case,
        so that a job being stopped does not look stale."""
        rows = self._db.execute(
            "UPDATE training_jobs SET heartbeat_at = ? WHERE id = ? AND state = 'running' AND runner = ? "
            "RETURNING cancel_requested",
            (self._clock(), job_id, runner),
        )
        return bool(rows) and not rows[0][0]

    def finish(self, job_id: str, state: str, *, error: str = "", result: dict | None = None,
               runner: str | None = None) -> JobRecord:
        """End a queued or running job in terminal ``state`` (succeeded,
        failed, cancelled) with ``error`` (why it failed) and ``result``
        (metrics, registered version, ...).

        ``runner``: when given, only a job running under that runner may be
        finished, so that a runner that lost its job (requeued after it went
        stale, now another runner's) cannot end the new attempt.

        Raises InvalidInputError (not a terminal state), NotFoundError and
        PreconditionFailedError (already terminal, or not this runner's).
        """
        if state not in TERMINAL:
            raise InvalidInputError(f"finish state {state!r}: choose from {', '.join(TERMINAL)}")
        doc = _ENC.encode(result or {}).decode()
        with self._locked():
            rec = self._get(job_id)
            if rec.state in TERMINAL:
                raise PreconditionFailedError(f"training job {job_id!r} is already {rec.state}")
            if runner is not None and (rec.state != "running" or rec.runner != runner):
                raise PreconditionFailedError(
                    f"training job {job_id!r} is not running under runner {runner!r} "
                    f"(state {rec.state}, runner {rec.runner!r})"
                )
            self._db.execute(
                "UPDATE training_jobs SET state = ?, finished_at = ?, error = ?, result = ? WHERE id = ?",
                (state, self._clock(), error, doc, job_id),
            )
            return self._get(job_id)

    def request_cancel(self, job_id: str) -> JobRecord:
        """Cancel a job: a queued one is ``cancelled`` at once; a running one
        gets ``cancel_requested`` (its runner sees heartbeat() return False,
        stops it and finishes it as cancelled). Repeating it is harmless.
        NotFoundError; PreconditionFailedError when the job already ended."""
        with self._locked():
            rec = self._get(job_id)
            if rec.state == "queued":
                self._db.execute(
                    "UPDATE training_jobs SET state = 'cancelled', cancel_requested = 1, finished_at = ? "
                    "WHERE id = ?",
                    (self._clock(), job_id),
                )
            elif rec.state == "running":
                self._db.execute("UPDATE training_jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            else:
                raise PreconditionFailedError(f"training job {job_id!r} is already {rec.state}: nothing to cancel")
            return self._get(job_id)

    def requeue(self, job_id: str, *, stale_after_s: float | None = None) -> JobRecord:
        """Queue a failed or cancelled job again, same id, spec, storage and
        submission time (so it resumes from its checkpoints and keeps its
        place in line); attempts are kept, the run's fields cleared.

        A running job is requeued only when ``stale_after_s`` is given and
        its heartbeat is older than that (re-checked under the lock: its
        runner died); its old runner's heartbeats then return False. A
        queued job is returned as it is.

        Raises NotFoundError and PreconditionFailedError (succeeded, or
        running and not stale).
        """
        with self._locked():
            rec = self._get(job_id)
            if rec.state == "queued":
                return rec
            if rec.state == "succeeded":
                raise PreconditionFailedError(
                    f"training job {job_id!r} succeeded; submit a new job to train again"
                )
            if rec.state == "running":
                beat = rec.heartbeat_at if rec.heartbeat_at is not None else rec.started_at or 0.0
                age = self._clock() - beat
                if stale_after_s is None or not age > stale_after_s:
                    raise PreconditionFailedError(
                        f"training job {job_id!r} is running under runner {rec.runner!r} (last heartbeat "
                        f"{age:.1f}s ago); cancel it, or requeue it with stale_after_s once its runner died"
                    )
            self._db.execute(
                "UPDATE training_jobs SET state = 'queued', started_at = NULL, finished_at = NULL, runner = '', "
                "heartbeat_at = NULL, cancel_requested = 0, error = '', result = '{}' WHERE id = ?",
                (job_id,),
            )
            return self._get(job_id)

    def release(self, job_id: str, runner: str) -> JobRecord:
        """Hand a job that ``runner`` is running back to the queue (its
        process is stopping): queued again, same id, place in line and
        storage, so whichever runner claims it next resumes it from its
        checkpoints. A job whose cancel was asked for meanwhile is cancelled
        instead. PreconditionFailedError when it is not running under
        ``runner``."""
        with self._locked():
            rec = self._get(job_id)
            if rec.state != "running" or rec.runner != runner:
                raise PreconditionFailedError(
                    f"training job {job_id!r} is not running under runner {runner!r} "
                    f"(state {rec.state}, runner {rec.runner!r})"
                )
            if rec.cancel_requested:
                self._db.execute(
                    "UPDATE training_jobs SET state = 'cancelled', finished_at = ?, error = ? WHERE id = ?",
                    (self._clock(), f"job {job_id} cancelled", job_id),
                )
                return self._get(job_id)
            self._db.execute(
                "UPDATE training_jobs SET state = 'queued', started_at = NULL, runner = '', heartbeat_at = NULL "
                "WHERE id = ?",
                (job_id,),
            )
            return self._get(job_id)

    def stale(self, older_than_s: float) -> list[JobRecord]:
        """Running jobs whose last heartbeat is more than ``older_than_s``
        seconds old (their runner died or hangs), oldest heartbeat first."""
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM training_jobs WHERE state = 'running' "
            "AND COALESCE(heartbeat_at, started_at) < ? ORDER BY COALESCE(heartbeat_at, started_at), id",
            (self._clock() - older_than_s,),
        )
        return [_record(r) for r in rows]


__all__ = ["STATES", "TERMINAL", "JobRecord", "JobStore"]
