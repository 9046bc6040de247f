"""One loop's turns: triggers -> guard rails -> a run through its phases.

A run moves ``training -> evaluating -> gating [-> awaiting_approval] ->
canary`` and ends with an outcome (promoted, rolled_back, refused, failed,
cancelled). Each :meth:`LoopRunner.tick` looks once at what the current phase
waits for (a job's state, the gates, the endpoint's canary) and moves on when
it is there; nothing blocks between ticks. A phase's progress lives in the
run's row (registry/loop_store.py) before the next step is taken, so a
controller that dies anywhere resumes the run from its row: a job it had
submitted is waited for (or resumed from its checkpoint once its runner is
found dead), a canary it had started is watched on the endpoint.

Every step is one audit entry tagged with the run id, so ``flywheel models
audit --loop-run ID`` reads trigger -> job -> version -> evaluation -> gates
-> canary -> outcome.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from flywheel.loops.guards import GuardInput, suppression
from flywheel.loops.spec import LoopSpec
from flywheel.loops.triggers import Firing, Signals, manual_firing
from flywheel.protocol.errors import ErrorCode, FlywheelError, PreconditionFailedError

log = logging.getLogger(__name__)

PHASES = ("training", "evaluating", "gating", "awaiting_approval", "canary")
OUTCOMES = ("promoted", "rolled_back", "refused", "failed", "cancelled")
_DAY_S = 86400.0
# errors a later tick may not see again (the endpoint restarting, the
# registry's database busy); any other refusal ends the run
_TRANSIENT = frozenset((ErrorCode.UNAVAILABLE, ErrorCode.DEADLINE_EXCEEDED, ErrorCode.RESOURCE_EXHAUSTED,
                        ErrorCode.RATE_LIMITED, ErrorCode.INTERNAL))
REPEAT_S = 300.0  # a repeated suppression is recorded at most this often
_TERMINAL_JOB = ("succeeded", "failed", "cancelled")


class EndpointOps(Protocol):
    """What a loop asks of the running endpoint (its HTTP face, as operate)."""

    def status(self, endpoint: str) -> dict: ...
    def add_variant(self, endpoint: str, model: dict) -> Any: ...
    def remove_variant(self, endpoint: str, version: str) -> Any: ...
    def start_canary(self, endpoint: str, canary: dict) -> Any: ...
    def abort_canary(self, endpoint: str) -> Any: ...


class Jobs(Protocol):
    """The training queue (flywheel.training.TrainingRuntime)."""

    def submit(self, spec: dict, *, run: bool = True) -> Any: ...
    def resume(self, job_id: str, *, run: bool = True) -> Any: ...
    def job(self, job_id: str) -> Any: ...  # a JobRecord: .state, .error, .result
    def find(self, name: str) -> Any: ...  # the job of that name (a JobRecord), or None
    def cancel(self, job_id: str) -> Any: ...


Evaluator = Callable[[str, int, "int | None", dict, str], dict]


def endpoint_busy(status: dict | None) -> str | None:
    """Why the endpoint cannot take a new candidate now (None: it can)."""
    if not status:
        return None
    canary = status.get("canary")
    if canary and canary.get("status") == "running":
        return f"a canary of version {canary.get('variant')} is in progress"
    swap = status.get("swap")
    if swap and swap.get("phase") not in (None, "done", "failed", "finished"):
        return "a swap is in progress"
    return None


class LoopRunner:
    """Drives one loop. Not thread-safe: one controller thread ticks it."""

    def __init__(self, spec: LoopSpec, *, deployment: str, store, registry, jobs: Jobs, endpoint: EndpointOps,
                 signals: Signals, evaluator: Evaluator, notifier=None, metrics=None,
                 capture_path: str = "", variant_template: dict | None = None, data_root: str = "",
                 clock: Callable[[], float] = time.time) -> None:
        self.spec = spec
        self.deployment = deployment
        self._store = store
        self._reg = registry
        self._jobs = jobs
        self._ep = endpoint
        self._signals = signals
        self._evaluate = evaluator
        self._notifier = notifier
        self._metrics = metrics
        self._capture = capture_path
        self._data_root = data_root  # where a run's captured data is fixed at submission ("" = not fixed)
        # the endpoint's model config less its identity: a candidate is served
        # as its predecessor is (backend, batching, drift, capture)
        self._template = {k: v for k, v in (variant_template or {}).items()
                          if k not in ("name", "version", "ref", "path", "artifact")}
        self._clock = clock
        self.actor = f"loop:{spec.name}"
        self._state: dict = {}

    # -- the tick ----------------------------------------------------------------
    def tick(self) -> None:
        now = self._clock()
        # the loop's document for this tick: phases may change it too (a
        # promotion resets the drift triggers); saved once, at the end
        self._state = state = self._store.load_state(self.deployment, self.spec.name)
        manual, cancel = self._commands(state)
        runs = self._store.runs(self.deployment, self.spec.name, unfinished=True, limit=1)
        run = runs[0] if runs else None
        if run is not None and cancel is not None:
            self._cancel(run, cancel)
        elif run is not None:
            self._advance_safely(run, now)
        firings = list(manual)
        if not state.get("paused"):
            firings += self._check_triggers(state, now)
        for firing in firings:
            self._consider(firing, now)
        self._store.save_state(self.deployment, self.spec.name, state)
        if self._metrics is not None:
            self._metrics.tick(self.spec.name, now)
            current = self._current()
            since = current.detail.get("phase_since", current.updated_at) if current else 0.0
            if current is not None and current.phase == "awaiting_approval":
                since = now  # waiting on people (approval_timeout_s bounds it), not stuck
            self._metrics.phase(self.spec.name, current is not None, since)

    def _commands(self, state: dict) -> tuple[list[Firing], str | None]:
        """Apply pause / resume / manual-trigger / cancel requests queued in
        the loop's events (by the CLI or HTTP) since the last tick; returns
        the manual firings and who asked to cancel the current run (None)."""
        after = int(state.get("commands_after", 0))
        firings, cancel = [], None
        for ev in self._store.events(self.deployment, self.spec.name, after_id=after):
            after = ev.id
            who = ev.detail.get("actor", "unknown")
            if ev.kind == "pause_requested":
                state["paused"] = True
            elif ev.kind == "resume_requested":
                state["paused"] = False
            elif ev.kind == "trigger_requested":
                firings.append(manual_firing(who, ev.detail.get("note", "")))
            elif ev.kind == "cancel_requested":
                cancel = who + (f": {ev.detail['note']}" if ev.detail.get("note") else "")
        state["commands_after"] = after
        return firings, cancel

    def _check_triggers(self, state: dict, now: float) -> list[Firing]:
        memory = state.setdefault("triggers", {})
        fired = []
        for i, trig in enumerate(self.spec.triggers):
            mem = memory.setdefault(trigger_key(trig), {})
            try:
                firing = trig.check(self._signals, mem, now, endpoint=self.spec.endpoint)
            except FlywheelError as exc:
                log.warning("loop %s: trigger %d (%s) could not be checked: %s",
                            self.spec.name, i, type(trig).__name__, exc.message)
                continue
            except OSError as exc:
                log.warning("loop %s: trigger %d (%s) could not be checked: %s",
                            self.spec.name, i, type(trig).__name__, exc)
                continue
            if firing is not None:
                fired.append(firing)
        return fired  # the first may start a run; the guards record the rest as suppressed

    def _consider(self, firing: Firing, now: float) -> None:
        current = self._current()
        last = self._store.runs(self.deployment, self.spec.name, limit=1)
        status, busy = None, None
        try:
            status = self._ep.status(self.spec.endpoint)
            busy = endpoint_busy(status)
        except FlywheelError as exc:  # unknown is not idle: a canary may be running there
            busy = f"the endpoint's status is unavailable ({exc.message})"
        g = GuardInput(
            now=now,
            last_run_started=last[0].started_at if last else None,
            runs_last_24h=len(self._store.runs(self.deployment, self.spec.name, since=now - _DAY_S, limit=10_000)),
            run_in_progress=current.id if current else None,
            endpoint_busy=busy,
            manual=firing.kind == "manual",
            canary=bool(status and (status.get("canary") or {}).get("status") == "running"),
        )
        why = suppression(self.spec.guards, g)
        if why is not None:
            guard = why.split(":", 1)[0]
            if self._metrics is not None:
                self._metrics.suppressed(self.spec.name, guard)
            # every suppression is counted; the same trigger held back by the
            # same guard is recorded (and notified) once per REPEAT_S, with
            # how often it fired meanwhile, not once per tick
            key, last = f"{firing.kind}:{guard}", self._state.get("last_suppressed") or {}
            if last.get("key") == key and now - last.get("ts", 0.0) < REPEAT_S:
                last["repeats"] = last.get("repeats", 0) + 1
                return
            detail = {"trigger": firing.kind, "reason": firing.reason, "suppressed": why,
                      "repeats_before": last.get("repeats", 0) if last.get("key") == key else 0}
            self._state["last_suppressed"] = {"key": key, "ts": now, "repeats": 0}
            if firing.kind == "drift":
                self._notify("drift_detected", {"reason": firing.reason, **firing.detail})
            self._event("trigger_suppressed", detail)
            self._notify("trigger_suppressed", detail)
            return
        try:
            run = self._store.start_run(self.deployment, self.spec.name, self.spec.endpoint, trigger=firing.kind,
                                        reason=firing.reason, phase="training",
                                        detail={"trigger_detail": firing.detail}, now=now)
        except PreconditionFailedError as exc:  # another controller started one meanwhile
            self._event("trigger_suppressed", {"trigger": firing.kind, "suppressed": exc.message})
            return
        self._audit(run.id, "loop_trigger", None, {"trigger": firing.kind, "reason": firing.reason,
                                                   **firing.detail})
        self._event("run_started", {"trigger": firing.kind, "reason": firing.reason}, run.id)
        if firing.kind == "drift":
            self._notify("drift_detected", {"run": run.id, "reason": firing.reason, **firing.detail})
        self._notify("run_started", {"run": run.id, "trigger": firing.kind, "reason": firing.reason})
        if self._metrics is not None:
            self._metrics.run_started(self.spec.name, firing.kind)
        self._advance_safely(run, now)

    def _current(self):
        runs = self._store.runs(self.deployment, self.spec.name, unfinished=True, limit=1)
        return runs[0] if runs else None

    # -- phases ------------------------------------------------------------------
    def _advance_safely(self, run, now: float) -> None:
        """One step of ``run``; a step that fails is recorded and tried again
        at the next tick (the run's row says where it stands), and never
        keeps the tick from saving the loop's state."""
        try:
            self._advance(run, now)
            if run.detail.get("retrying_since"):
                self._store.update_run(run.id, detail={"retrying_since": 0.0, "last_error": ""})
            return
        except FlywheelError as exc:
            log.warning("loop %s: run %s, phase %s: %s", self.spec.name, run.id, run.phase, exc.message)
            message, transient = exc.message, exc.code in _TRANSIENT
            refused = exc.code == ErrorCode.FAILED_PRECONDITION  # e.g. the gates, judged again at the canary's start
        except Exception as exc:  # noqa: BLE001 - a bug in one step must not stop the loop's bookkeeping
            log.exception("loop %s: run %s, phase %s failed", self.spec.name, run.id, run.phase)
            message, transient, refused = f"{type(exc).__name__}: {exc}", True, False
        run = self._store.get_run(run.id)
        if run.finished:
            return
        if not transient:  # a refusal that no retry changes
            self._finish(run, "refused" if refused else "failed", f"{run.phase}: {message}")
            return
        since = run.detail.get("retrying_since") or now
        if now - since > self.spec.stuck_after_s:
            self._finish(run, "failed", f"{run.phase}: still failing after {now - since:.0f} s: {message}")
            return
        if message != run.detail.get("last_error"):  # each new error once, not once per tick
            self._event("error", {"phase": run.phase, "error": message}, run.id)
        self._store.update_run(run.id, detail={"retrying_since": since, "last_error": message})

    def _advance(self, run, now: float) -> None:
        step = getattr(self, f"_phase_{run.phase}")
        step(run, now)

    def _phase_training(self, run, now: float) -> None:
        job_id = run.detail.get("job_id")
        if not job_id:
            # exactly once: the job's name is written down before it is
            # submitted, and a controller that died in between finds the job
            # by that name instead of submitting a second one
            if "job_name" not in run.detail:
                job = self.job_spec(run)
                source = job["dataset"]
                if source.get("kind") == "captured" and self._data_root:
                    from flywheel.loops.snapshot import freeze_dataset

                    job["dataset"] = freeze_dataset(job, os.path.join(self._data_root, run.id, "dataset.parquet"))
                run = self._store.update_run(run.id, detail={"job_name": job["name"], "dataset": job["dataset"],
                                                             "dataset_source": source})
            job = self.job_spec(run, fresh=False)
            found = self._jobs.find(job["name"])
            job_id = found.id if found is not None else self._jobs.submit(job, run=True).id
            self._store.update_run(run.id, detail={"job_id": job_id})
            self._audit(run.id, "loop_job", None, {"job_id": job_id, "job_name": job["name"],
                                                   "dataset": job["dataset"]})
            self._event("job_submitted", {"job_id": job_id}, run.id)
            return
        rec = self._jobs.job(job_id)
        if rec.state not in _TERMINAL_JOB:
            return
        if rec.state == "succeeded":
            ref = (rec.result or {}).get("ref", "")
            version = int(ref.rsplit("/", 1)[1]) if "/" in ref else None
            if version is None:
                self._finish(run, "failed", f"job {job_id} succeeded but registered no version")
                return
            self._store.update_run(run.id, phase="evaluating", detail={"version": version})
            self._audit(run.id, "loop_version", version, {"job_id": job_id, "ref": ref,
                                                          "metrics": (rec.result or {}).get("metrics", {})})
            self._event("version_registered", {"version": version, "ref": ref}, run.id)
            return
        retries = int(run.detail.get("job_resumes", 0))
        if rec.state == "failed" and retries < self.spec.job_retries:
            self._jobs.resume(job_id, run=True)
            self._store.update_run(run.id, detail={"job_resumes": retries + 1})
            self._event("job_resumed", {"job_id": job_id, "error": rec.error}, run.id)
            return
        if self._metrics is not None:
            self._metrics.job_failed(self.spec.name)
        self._finish(run, "cancelled" if rec.state == "cancelled" else "failed",
                     f"training job {job_id} {rec.state}: {rec.error}")

    def _phase_evaluating(self, run, now: float) -> None:
        version = run.detail["version"]
        production = self._production_version()
        job = self.job_spec(run, fresh=False)
        metrics = self._evaluate(self.spec.model_name, version, production, job, run.id)
        self._store.update_run(run.id, phase="gating", detail={"evaluation": metrics, "production": production})
        self._audit(run.id, "loop_evaluation", version, {"production": production, **metrics})
        self._event("evaluated", {"production": production, **metrics}, run.id)

    def _phase_gating(self, run, now: float) -> None:
        version = run.detail["version"]
        self.ensure_policy()
        failures = self._reg.check_gates(self.spec.model_name, version)
        if not failures:
            self._store.update_run(run.id, phase="canary", detail={"gates": "passed"})
            self._audit(run.id, "loop_gates", version, {"passed": True})
            self._event("gates_passed", {}, run.id)
            return
        if all(f.startswith("approvals:") for f in failures):
            if run.phase != "awaiting_approval":
                self._store.update_run(run.id, phase="awaiting_approval", detail={"waiting_for": failures})
                self._audit(run.id, "loop_gates", version, {"passed": False, "awaiting_approval": failures})
                self._event("approval_needed", {"failures": failures}, run.id)
                self._notify("approval_needed", {"run": run.id, "model": self.spec.model_name,
                                                 "version": version, "failures": failures})
                return
            if now - run.detail.get("phase_since", run.updated_at) > self.spec.approval_timeout_s:
                self._notify("gate_refused", {"run": run.id, "model": self.spec.model_name, "version": version,
                                              "failures": failures, "reason": "approval timed out"})
                self._finish(run, "refused", f"no approval within {self.spec.approval_timeout_s:g} s: "
                             + "; ".join(failures))
            return
        self._audit(run.id, "loop_gates", version, {"passed": False, "failures": failures})
        self._notify("gate_refused", {"run": run.id, "model": self.spec.model_name, "version": version,
                                      "failures": failures})
        self._finish(run, "refused", "; ".join(failures))

    _phase_awaiting_approval = _phase_gating

    def _phase_canary(self, run, now: float) -> None:
        version = run.detail["version"]
        variant = str(version)
        status = self._ep.status(self.spec.endpoint)
        state = (status.get("variants") or {}).get(variant)
        if not run.detail.get("variant_added"):
            if state is None:
                self._ep.add_variant(self.spec.endpoint, {**self._template, "version": variant,
                                                          "ref": f"{self.spec.model_name}/{version}"})
            self._store.update_run(run.id, detail={"variant_added": True, "variant_added_at": now})
            self._event("variant_added", {"variant": variant}, run.id)
            return
        canary = status.get("canary") or {}
        if not run.detail.get("canary_started") and canary.get("variant") == variant:
            # started by an earlier tick whose answer was lost: watch it, never start it twice
            self._store.update_run(run.id, detail={"canary_started": True})
            return
        if not run.detail.get("canary_started"):
            if state is None:
                # the endpoint drops a variant that failed to load (its events say why)
                waited = now - run.detail.get("variant_added_at", now)
                if run.detail.get("variant_seen") or waited > self.spec.load_timeout_s:
                    self._finish(run, "failed", f"variant {variant} did not load on {self.spec.endpoint}: "
                                 + _last_event(status, variant))
                return
            if not run.detail.get("variant_seen"):
                self._store.update_run(run.id, detail={"variant_seen": True})
            if state.get("status") == "failed":
                self._finish(run, "failed", f"variant {variant} failed to load: {state.get('error')}")
                return
            if state.get("status") != "ready":
                return
            plan = {**self.spec.canary, "variant": variant}
            self._ep.start_canary(self.spec.endpoint, plan)
            self._store.update_run(run.id, detail={"canary_started": True, "canary_plan": plan})
            self._audit(run.id, "loop_canary", version, {"plan": plan})
            self._event("canary_started", {"plan": plan}, run.id)
            return
        if canary.get("variant") != variant:
            return  # the canary's state is not reported yet
        history = canary.get("history") or []
        steps = [h.get("percent") for h in history if h.get("action") == "advance"]
        if steps != run.detail.get("canary_steps", []):
            self._store.update_run(run.id, detail={"canary_steps": steps})
            self._event("canary_step", {"percent": steps[-1] if steps else None}, run.id)
        outcome = {"promoted": "promoted", "completed": "promoted", "rolled_back": "rolled_back",
                   "aborted": "rolled_back"}.get(canary.get("status", ""))
        if outcome is None:
            return
        reason = (history[-1].get("reason") if history else "") or canary.get("status", "")
        if outcome == "promoted":
            self._forget_drift()
        self._notify("canary_promoted" if outcome == "promoted" else "canary_rolled_back",
                     {"run": run.id, "model": self.spec.model_name, "version": version, "reason": reason})
        self._finish(run, outcome, reason)

    def _remove_candidate(self, run) -> None:
        """A candidate that will not serve does not stay loaded (best effort:
        the endpoint may have dropped it already)."""
        try:
            self._ep.remove_variant(self.spec.endpoint, str(run.detail["version"]))
        except FlywheelError as exc:
            log.info("loop %s: removing candidate %s: %s", self.spec.name, run.detail["version"], exc.message)

    def _cancel(self, run, who: str) -> None:
        """End ``run`` as cancelled at an operator's request: its training
        job cancelled, its canary aborted (traffic back to the baseline)."""
        job_id = run.detail.get("job_id")
        if run.phase == "training" and job_id:
            try:
                self._jobs.cancel(job_id)
            except FlywheelError as exc:
                log.info("loop %s: cancelling job %s: %s", self.spec.name, job_id, exc.message)
        if run.phase == "canary" and run.detail.get("canary_started"):
            try:
                self._ep.abort_canary(self.spec.endpoint)
            except FlywheelError as exc:
                log.info("loop %s: aborting the canary: %s", self.spec.name, exc.message)
        self._finish(run, "cancelled", f"cancelled by {who} in phase {run.phase}")

    def ensure_policy(self) -> None:
        """Set the loop's declared gate policy on its model when the
        declaration is new or changed and the model exists (not on every
        restart: an operator's later change stands until the loop's config
        changes). Called at start and before every gate check, so a model
        that the loop's first job registers gets it before it is judged."""
        if self.spec.policy is None:
            return
        from flywheel.registry import parse_policy

        policy = parse_policy(self.spec.policy)
        digest = hashlib.sha256(msgspec.json.encode(policy)).hexdigest()
        state = self._state if self._state else self._store.load_state(self.deployment, self.spec.name)
        if state.get("policy_applied") == digest:
            return
        try:
            self._reg.set_policy(self.spec.model_name, policy, actor=self.actor)
        except FlywheelError as exc:
            if exc.code == ErrorCode.NOT_FOUND:
                return  # registered by the first job; applied before its gates
            raise
        state["policy_applied"] = digest
        if state is not self._state:
            self._store.save_state(self.deployment, self.spec.name, state)

    def _forget_drift(self) -> None:
        """Windows scored against the version just replaced say nothing of
        the new one: the drift triggers stop counting them."""
        from flywheel.loops.triggers import DriftTrigger
        from flywheel.loops.triggers.drift import reset

        memory = self._state.setdefault("triggers", {})
        for trig in self.spec.triggers:
            if isinstance(trig, DriftTrigger):
                reset(memory.setdefault(trigger_key(trig), {}), self._clock())

    # -- endings and records -------------------------------------------------------
    def _finish(self, run, outcome: str, reason: str) -> None:
        if outcome != "promoted" and run.detail.get("variant_added"):
            self._remove_candidate(run)
        run = self._store.update_run(run.id, outcome=outcome, detail={"outcome_reason": reason}, finish=True)
        self._audit(run.id, "loop_outcome", run.detail.get("version"), {"outcome": outcome, "reason": reason})
        self._event("run_finished", {"outcome": outcome, "reason": reason}, run.id)
        self._notify("run_failed" if outcome == "failed" else "run_finished",
                     {"run": run.id, "outcome": outcome, "reason": reason, "version": run.detail.get("version")})
        if self._metrics is not None:
            self._metrics.run_finished(self.spec.name, outcome)
        log.info("loop %s: run %s ended %s: %s", self.spec.name, run.id, outcome, reason)

    def _audit(self, run_id: str, action: str, version: int | None, detail: dict) -> None:
        self._reg.record(self.actor, action, self.spec.model_name, version, detail, loop_run=run_id)

    def _event(self, kind: str, detail: dict, run_id: str = "") -> None:
        self._store.add_event(self.deployment, self.spec.name, kind, detail, run_id=run_id)

    def _notify(self, event: str, payload: dict) -> None:
        if self._notifier is not None:
            self._notifier.notify(event, {"loop": self.spec.name, "endpoint": self.spec.endpoint, **payload})

    def _production_version(self) -> int | None:
        try:
            return self._reg.resolve(f"{self.spec.model_name}@production").version
        except FlywheelError:
            return None

    # -- the job -------------------------------------------------------------------
    def job_spec(self, run, *, fresh: bool = True) -> dict:
        """The template made concrete for ``run``: its own name, registered
        under the loop's model, no canary of its own, the loop's priority,
        and (with ``data.captured``) captured traffic mixed into its data.
        ``fresh=False`` rebuilds the spec the run submitted (its dataset
        as recorded), for the evaluation of the same held-out rows."""
        job = dict(self.spec.job)
        job["name"] = run.detail.get("job_name") or f"{self.spec.name}-{uuid.uuid4().hex[:8]}"
        job["priority"] = self.spec.priority
        job["export"] = {**job.get("export", {}), "onnx": True, "register": True,
                         "model_name": self.spec.model_name, "canary_url": "", "canary": {}}
        if not fresh and "dataset" in run.detail:
            job["dataset"] = run.detail["dataset"]
        elif self.spec.data.captured and self._capture:
            job["dataset"] = self._captured_dataset(job.get("dataset", {}))
        else:
            job["dataset"] = dict(job.get("dataset", {}))
        return job

    def _captured_dataset(self, original: dict) -> dict:
        since = 0.0
        if self.spec.data.since == "last_run":
            done = [r for r in self._store.runs(self.deployment, self.spec.name, limit=50) if r.finished]
            since = done[0].started_at if done else 0.0
        return captured_dataset(original, path=self._capture, endpoint=self.spec.endpoint, since=since,
                                fraction=self.spec.data.captured_fraction)


def trigger_key(trig) -> str:
    """What a trigger's memory is filed under: its kind and settings, so
    that reordering a loop's triggers keeps each one's memory, and a changed
    trigger starts afresh."""
    digest = hashlib.sha256(msgspec.json.encode(trig)).hexdigest()[:12]
    return f"{type(trig).__struct_config__.tag}:{digest}"


def captured_dataset(original: dict, *, path: str, endpoint: str, since: float, fraction: float) -> dict:
    """A training ``dataset`` mapping of kind ``captured`` (the endpoint's
    labelled captures since ``since``) mixed with ``original`` (the
    template's dataset mapping) so that captured rows make ``fraction``
    of the training set (training/spec.py DatasetSpec)."""
    orig = dict(original) or {"kind": "digits"}
    # ``until`` frozen now: the evaluation rebuilds exactly these rows (and
    # so the same held-out split) however many are captured meanwhile
    out = {"kind": "captured", "path": path, "endpoint": endpoint, "since": since, "until": time.time(),
           "captured_fraction": fraction, "mix": orig}
    for key in ("validation_fraction", "reference_rows"):
        if key in orig:
            out[key] = orig[key]
    return out


def _last_event(status: dict, variant: str) -> str:
    """Why the endpoint dropped ``variant``: its load error, else the newest
    event naming it."""
    failed = (status.get("failed") or {}).get(variant)
    if failed:
        return failed
    for ev in reversed(status.get("events") or []):
        text = str(ev.get("detail", ""))
        if variant in text:
            return text
    return "the endpoint no longer lists it"
