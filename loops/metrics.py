"""Prometheus metrics of the loop controller and its webhook notifier.

One :class:`LoopMetrics` holds its own ``CollectorRegistry`` (never the
process-global one), so that several controllers, or tests, never share a
counter. The alert rules in ``configs/alerts/flywheel-rules.yaml`` read these
names: renaming one breaks ``tests/unit/configs/test_alert_rules.py``.

Series that alerts compute ``increase()`` over are created at zero the first
time a loop or webhook is seen: Prometheus cannot see the first increment of a
series that appears already at 1.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

OUTCOMES = ("promoted", "rolled_back", "refused", "failed", "cancelled")


class LoopMetrics:
    """Counters and gauges of loop runs and notifications. Thread-safe."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._started = Counter("flywheel_loop_runs_started", "Loop runs started, by what triggered them",
                                ["loop", "trigger"], registry=r)
        self._finished = Counter("flywheel_loop_runs_finished",
                                 "Loop runs finished, by outcome (" + ", ".join(OUTCOMES) + ")",
                                 ["loop", "outcome"], registry=r)
        self._suppressed = Counter("flywheel_loop_triggers_suppressed",
                                   "Triggers a guard rail kept from starting a run (cool-down, budget, ...)",
                                   ["loop", "guard"], registry=r)
        self._in_progress = Gauge("flywheel_loop_run_in_progress", "1 while a run of the loop is in progress",
                                  ["loop"], registry=r)
        self._phase_started = Gauge("flywheel_loop_run_phase_started_timestamp_seconds",
                                    "When the current run entered its current phase (0 when idle)",
                                    ["loop"], registry=r)
        self._progress = Gauge("flywheel_loop_last_progress_timestamp_seconds",
                               "Last time the controller's tick ran for the loop", ["loop"], registry=r)
        self._jobs_failed = Counter("flywheel_loop_training_jobs_failed", "Training jobs of loop runs that failed",
                                    ["loop"], registry=r)
        self._delivered = Counter("flywheel_notify_deliveries", "Webhook notifications delivered (2xx answer)",
                                  ["webhook", "event"], registry=r)
        self._dead = Counter("flywheel_notify_dead_letters",
                             "Webhook notifications given up on (retries exhausted, refused, queue full, closed)",
                             ["webhook", "event"], registry=r)
        self._lock = threading.Lock()
        self._loops: set[str] = set()
        self._webhook_events: set[tuple[str, str]] = set()

    # -- loops ---------------------------------------------------------------

    def add_loop(self, loop: str) -> None:
        """Create the loop's series at zero (idempotent; every other loop
        method calls it). Its last-progress gauge appears with the first
        :meth:`tick`, so that a loop never ticked does not look stuck."""
        with self._lock:
            if loop in self._loops:
                return
            self._loops.add(loop)
        for outcome in OUTCOMES:
            self._finished.labels(loop, outcome)
        self._jobs_failed.labels(loop)
        self._in_progress.labels(loop).set(0)
        self._phase_started.labels(loop).set(0)

    def run_started(self, loop: str, trigger: str) -> None:
        self.add_loop(loop)
        self._started.labels(loop, trigger).inc()

    def run_finished(self, loop: str, outcome: str) -> None:
        """Count a finished run; ``outcome`` is one of :data:`OUTCOMES`
        (ValueError otherwise). Also marks the loop idle."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, not {outcome!r}")
        self.add_loop(loop)
        self._finished.labels(loop, outcome).inc()
        self.phase(loop, in_progress=False, since=0.0)

    def suppressed(self, loop: str, guard: str) -> None:
        self.add_loop(loop)
        self._suppressed.labels(loop, guard).inc()

    def phase(self, loop: str, in_progress: bool, since: float) -> None:
        """The loop's run entered a phase at ``since`` (Unix seconds), or the
        loop is idle (``in_progress=False``: the phase timestamp reads 0)."""
        self.add_loop(loop)
        self._in_progress.labels(loop).set(1 if in_progress else 0)
        self._phase_started.labels(loop).set(since if in_progress else 0)

    def tick(self, loop: str, now: float) -> None:
        """The controller's tick ran for the loop at ``now`` (Unix seconds)."""
        self.add_loop(loop)
        self._progress.labels(loop).set(now)

    def job_failed(self, loop: str) -> None:
        self.add_loop(loop)
        self._jobs_failed.labels(loop).inc()

    # -- notifications -------------------------------------------------------

    def add_webhook(self, webhook: str, events: Iterable[str]) -> None:
        """Create the webhook's delivery and dead-letter series at zero."""
        for event in events:
            self._add_webhook_event(webhook, event)

    def _add_webhook_event(self, webhook: str, event: str) -> None:
        with self._lock:
            if (webhook, event) in self._webhook_events:
                return
            self._webhook_events.add((webhook, event))
        self._delivered.labels(webhook, event)
        self._dead.labels(webhook, event)

    def delivered(self, webhook: str, event: str) -> None:
        self._add_webhook_event(webhook, event)
        self._delivered.labels(webhook, event).inc()

    def dead_letter(self, webhook: str, event: str) -> None:
        self._add_webhook_event(webhook, event)
        self._dead.labels(webhook, event).inc()

    def exposition(self) -> bytes:
        """All of these metrics in the Prometheus text format."""
        return generate_latest(self.registry)
