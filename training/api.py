"""The Python face of training: submit jobs, follow them, get their models.

    from flywheel.training import submit, list_jobs, attach
    job = submit("configs/train-digits.yaml")      # or a JobSpec / a dict
    job.wait(); job.metrics(); job.result()        # {"ref": "digits/3", ...}

Jobs live in the registry's database (training/jobs.py), so any process can
list them, attach to one, cancel it, or resume it from its latest checkpoint
(after the process that ran it died). A :class:`TrainingRuntime` also runs a
scheduler (a thread) that takes queued jobs in priority order, one at a
time, and runs them on Ray
Train (training/runner.py). The module-level functions use one runtime per
process, made on first use; make a TrainingRuntime yourself for another
registry or to submit without running.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

import msgspec

from flywheel.protocol.errors import ConfigError, FlywheelError, InvalidInputError, PreconditionFailedError, UnavailableError
from flywheel.registry.db import DatabaseUnreachable, OutageLog
from flywheel.training.jobs import TERMINAL, JobRecord, JobStore
from flywheel.training.loop import append_log, job_paths
from flywheel.training.spec import JobSpec, load_spec, parse_spec, spec_to_dict

log = logging.getLogger(__name__)

POLL_S = 0.5
STALE_S = 30.0  # a running job whose runner has not beaten for this long has lost it


# how often a job's end is retried while the registry's database is away
FINISH_RETRY_S = 1.0

class JobFailedError(FlywheelError):
    """The job ended without a model (its message says why)."""


class JobHandle:
    """A job by id; every method reads its current state (any process)."""

    def __init__(self, runtime: TrainingRuntime, job_id: str) -> None:
        self._rt = runtime
        self.id = job_id

    def status(self) -> JobRecord:
        self._rt._mark_stale()  # a job whose runner died reads as failed, not running forever
        return self._rt.store.get(self.id)

    def wait(self, timeout: float | None = None) -> JobRecord:
        """Block until the job is finished (succeeded, failed or cancelled);
        TimeoutError after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            rec = self.status()
            if rec.state in ("succeeded", "failed", "cancelled"):
                return rec
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.id} still {rec.state} after {timeout}s")
            time.sleep(POLL_S)

    def cancel(self) -> JobRecord:
        """A queued job is cancelled at once; a running one stops at its next
        check (every few steps) and keeps its checkpoints."""
        return self._rt.store.request_cancel(self.id)

    def metrics(self) -> list[dict]:
        """Per-epoch history: epoch, global_step, loss, val_loss, the task's
        metrics (val_accuracy; val_mse and val_mae for regression), the
        user's (val_<name>, a train_step's train_<name>), samples_per_s, lr."""
        path = job_paths(self.status().storage)["metrics"]
        if not os.path.exists(path):
            return []
        rows: dict[int, dict] = {}
        with open(path) as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    # an attempt that resumed from before an epoch's end writes it again
                    rows[row["epoch"]] = row
        return [rows[e] for e in sorted(rows)]

    def progress(self) -> dict | None:
        """The latest step (epoch, step, loss, samples/s), or None."""
        path = job_paths(self.status().storage)["progress"]
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def logs(self) -> str:
        path = job_paths(self.status().storage)["log"]
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            return ""

    def result(self) -> dict:
        """What a succeeded job produced (``ref``: the registered version,
        ``metrics``, ``onnx``, ...); JobFailedError for a failed or cancelled
        job, PreconditionFailedError while it runs."""
        rec = self.status()
        if rec.state == "succeeded":
            return rec.result
        if rec.state in ("failed", "cancelled"):
            raise JobFailedError(f"job {self.id} {rec.state}: {rec.error}")
        raise PreconditionFailedError(f"job {self.id} is {rec.state}; wait() for it first")

    def __repr__(self) -> str:
        return f"JobHandle({self.id!r})"


class TrainingRuntime:
    """A job store, and (``start()``) a scheduler thread running its jobs."""

    def __init__(self, settings=None, *, stale_s: float = STALE_S) -> None:
        """``stale_s``: a running job whose runner has not beaten for this
        long is taken to have lost it (it fails; ``resume`` continues it)."""
        from flywheel.common.settings import load_settings

        self.settings = settings or load_settings()
        self._stale_s = stale_s
        self.store = JobStore.open(self.settings.registry_uri)
        self.runner_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._thread: threading.Thread | None = None
        # one stop event per scheduler thread: a thread that stop() or
        # stop_after() ended keeps its own (set) event while it winds its job
        # down, whatever a later start() does
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._last: str | None = None

    # -- jobs ---------------------------------------------------------------
    def submit(self, spec: JobSpec | dict | str, *, dataset: Any = None, run: bool = True) -> JobHandle:
        """Queue a job (a JobSpec, a dict, or a YAML path). ``dataset``: the
        Ray Data Dataset of a ``kind: ray`` dataset (written to the job's
        folder as Parquet files now, by Ray Data; the job then reads them,
        streamed if the spec says ``stream: true``). ``run``: start this
        process's scheduler if it is not running."""
        if isinstance(spec, str):
            spec = load_spec(spec)
        elif isinstance(spec, dict):
            spec = parse_spec(spec)
        if spec.dataset.kind == "ray" and dataset is None:
            raise InvalidInputError("dataset.kind 'ray': pass the Ray Data Dataset as submit(spec, dataset=ds)")
        spec = _with_code_folder(spec)
        # the job's folder (log, metrics, progress, outputs) is a local or
        # shared path; a URI storage (s3://...) takes the checkpoints only
        local = spec.storage and "://" not in spec.storage
        root = spec.storage if local else os.path.join(self.settings.home, "training")
        job_id = uuid.uuid4().hex[:12]
        storage = os.path.abspath(os.path.join(root, f"{spec.name}-{job_id}"))
        os.makedirs(storage, exist_ok=True)
        if spec.dataset.kind == "ray":
            # written out now, so that any process's scheduler, and a resume
            # after this process is gone, trains on exactly these rows; Ray
            # Data writes the blocks from the cluster, this process never
            # holds them (a folder of Parquet files)
            path = os.path.join(storage, "dataset.parquet")
            dataset.write_parquet(path)
            append_log(job_paths(storage)["log"], f"Ray Dataset written to {path}")
            spec = msgspec.structs.replace(spec, dataset=msgspec.structs.replace(spec.dataset, kind="parquet", path=path))
        rec = self.store.submit(spec_to_dict(spec), name=spec.name, priority=spec.priority, storage=storage,
                                job_id=job_id)
        if run:
            self.start()
        return JobHandle(self, rec.id)

    def attach(self, job_id: str) -> JobHandle:
        self.store.get(job_id)  # NotFoundError naming the id
        return JobHandle(self, job_id)

    def list_jobs(self, states=None) -> list[JobRecord]:
        self._mark_stale()
        return self.store.list(states)

    def resume(self, job_id: str, *, run: bool = True) -> JobHandle:
        """Queue a failed, cancelled or orphaned (its runner died) job again;
        it continues from its latest checkpoint, in the same storage."""
        self._mark_stale()
        rec = self.store.get(job_id)
        cancel = job_paths(rec.storage)["cancel"]
        if os.path.exists(cancel):
            os.remove(cancel)
        self.store.requeue(job_id, stale_after_s=self._stale_s)
        if run:
            self.start()
        return JobHandle(self, job_id)

    def _mark_stale(self) -> None:
        for rec in self.store.stale(self._stale_s):
            if rec.runner != self.runner_id:
                try:  # runner=: only if that runner still holds it (it may have just finished)
                    self.store.finish(rec.id, "failed", runner=rec.runner, error=(
                        f"its runner {rec.runner} stopped (no heartbeat for {self._stale_s:.0f}s); "
                        f"resume({rec.id!r}) continues from its latest checkpoint"))
                except FlywheelError:
                    pass

    # -- the scheduler ------------------------------------------------------
    def start(self) -> None:
        """Run queued jobs from a background thread (idempotent)."""
        with self._lock:
            self._last = None
            if self._thread is not None and self._thread.is_alive() and not self._stop.is_set():
                return
            from flywheel.common.ray_cluster import start_ray

            start_ray(self.settings, log_to_driver=False)
            self._stop = stop = threading.Event()
            self._thread = threading.Thread(target=self._schedule, args=(stop,), name="flywheel-training", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking jobs and end the thread. A running job is handed back
        to the queue (not cancelled: it may be another process's job): it
        stops at its next step and resumes from its latest checkpoint in
        whichever process takes it next. ``timeout``: how long to wait for
        that; a job still running when this process exits is taken for
        orphaned once its heartbeats stop (``resume`` continues it)."""
        with self._lock:
            self._stop.set()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def stop_after(self, job_id: str) -> None:
        """Take no more jobs once ``job_id`` has ended (``flywheel train``
        runs its own job and whatever must run before it, not the queue
        after it). ``start()`` clears it."""
        self._last = job_id

    def _schedule(self, stop: threading.Event) -> None:
        outage = OutageLog(log, "training scheduler: reading the queue")
        while not stop.is_set():
            try:
                with self._lock:  # decided together with start(), which may clear _last meanwhile
                    if self._last is not None and self.store.get(self._last).state in TERMINAL:
                        stop.set()
                        break
                self._mark_stale()
                # by priority, not by what is free now: a job that cannot get
                # its resources fails after resources.wait_s with a message
                # saying so, instead of waiting in the queue unseen
                rec = self.store.claim_next(self.runner_id)
                outage.ok()
            except UnavailableError as exc:  # the registry's database is away: the queue waits in it
                outage.failed(exc)
                rec = None
            except Exception:
                log.exception("training scheduler: claiming a job failed")
                rec = None
            if rec is None:
                stop.wait(POLL_S)
                continue
            try:
                self._run(rec, stop)
            except BaseException as exc:  # the thread must outlive any one job
                log.exception("training scheduler: job %s", rec.id)
                try:
                    self.store.finish(rec.id, "failed", error=f"scheduler error: {exc!r}", runner=self.runner_id)
                except Exception:
                    pass

    def _run(self, rec: JobRecord, stop: threading.Event) -> None:
        from flywheel.training.runner import JobCancelled, run_job

        beating = threading.Event()

        lost = threading.Event()

        def beat() -> None:
            # beats on while a cancel winds the job down (else another
            # process would take it for dead); stops when the job is not ours
            outage = OutageLog(log, f"heartbeat for job {rec.id}")
            while not beating.wait(2.0):
                try:
                    if not self.store.heartbeat(rec.id, self.runner_id):
                        now = self.store.get(rec.id)
                        if now.state != "running" or now.runner != self.runner_id:
                            lost.set()  # taken for stale and resumed elsewhere: stop training
                            return
                    outage.ok()
                except UnavailableError as exc:
                    outage.failed(exc)
                except Exception:
                    log.warning("heartbeat for job %s failed", rec.id, exc_info=True)

        beater = threading.Thread(target=beat, daemon=True)
        beater.start()
        try:
            result = run_job(
                rec, registry_uri=self.settings.registry_uri, artifacts_uri=self.settings.artifacts_uri,
                should_stop=lambda: lost.is_set() or stop.is_set() or self._cancel_requested(rec.id),
            )
            self._finish(rec, stop, "succeeded", result=result)
        except JobCancelled as exc:
            if stop.is_set() and not lost.is_set() and not self._cancel_requested(rec.id):
                self._release(rec)
            else:
                self._finish(rec, stop, "cancelled", error=str(exc))
        except BaseException as exc:  # every failure ends the job with its reason
            message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            log.warning("job %s failed: %s", rec.id, message)
            try:
                append_log(job_paths(rec.storage)["log"], f"failed: {message}")
            except OSError:
                pass
            try:
                self._finish(rec, stop, "failed", error=message)
            except FlywheelError:  # no longer ours (marked stale meanwhile)
                pass
        finally:
            beating.set()

    def _finish(self, rec: JobRecord, stop: threading.Event, state: str, **fields) -> None:
        """Record how the job ended. While the registry's database cannot be
        reached the heartbeat beats on and this tries again, so that a job
        that trained is not reported failed for an outage; it gives up only
        when the scheduler stops (the job is then resumed as stale)."""
        outage = OutageLog(log, f"recording that job {rec.id} {state}")
        tried = False
        while True:
            try:
                self.store.finish(rec.id, state, runner=self.runner_id, **fields)
                outage.ok()
                return
            except DatabaseUnreachable as exc:
                outage.failed(exc)
            except PreconditionFailedError:
                if tried:  # an earlier try committed before its connection was lost
                    return
                raise
            tried = True
            if stop.wait(FINISH_RETRY_S):
                log.warning("job %s %s, but the scheduler stopped before the database was back to record it",
                            rec.id, state)
                return

    def _cancel_requested(self, job_id: str) -> bool:
        try:
            return self.store.get(job_id).cancel_requested
        except FlywheelError:
            return False

    def _release(self, rec: JobRecord) -> None:
        cancel = job_paths(rec.storage)["cancel"]  # the marker that stopped the loop must not stop the next
        if os.path.exists(cancel):
            os.remove(cancel)
        self.store.release(rec.id, self.runner_id)
        append_log(job_paths(rec.storage)["log"], f"handed back to the queue by {self.runner_id} (its process stopped)")

    def close(self, timeout: float = 60.0) -> None:
        """stop() (waiting up to ``timeout`` for a running job to be handed
        back), then close the store, unless the job is still winding down
        (its hand-back needs the store; the process's exit ends both)."""
        self.stop(timeout)
        if self._thread is not None and self._thread.is_alive():
            log.warning("training: a job is still stopping after %.0f s; the job store stays open", timeout)
            return
        self.store.close()


def _with_code_folder(spec: JobSpec) -> JobSpec:
    """The spec with ``code`` as an absolute path, checked to be a folder:
    the job may run in another process (a scheduler elsewhere, a resume),
    whose working directory says nothing about this one's."""
    if not spec.code:
        return spec
    folder = os.path.abspath(os.path.expanduser(spec.code))
    if not os.path.isdir(folder):
        raise ConfigError(f"code {spec.code!r}: no such folder (it should hold the job's Python modules, "
                          f"e.g. the package of model.factory); looked at {folder}")
    return msgspec.structs.replace(spec, code=folder)


_default: TrainingRuntime | None = None
_default_lock = threading.Lock()


def runtime() -> TrainingRuntime:
    """This process's TrainingRuntime (made on first use, from the settings)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = TrainingRuntime()
        return _default


def submit(spec: JobSpec | dict | str, *, dataset: Any = None) -> JobHandle:
    """Queue a job and run it from this process's scheduler (see TrainingRuntime.submit)."""
    return runtime().submit(spec, dataset=dataset)


def list_jobs(states=None) -> list[JobRecord]:
    return runtime().list_jobs(states)


def attach(job_id: str) -> JobHandle:
    return runtime().attach(job_id)


def resume(job_id: str) -> JobHandle:
    return runtime().resume(job_id)

