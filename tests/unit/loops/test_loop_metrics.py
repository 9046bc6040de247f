"""The loop controller's Prometheus metrics, read back from their exposition."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from flywheel.loops.metrics import OUTCOMES, LoopMetrics


def samples(metrics: LoopMetrics) -> dict[tuple[str, frozenset], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for s in family.samples
    }


def value(metrics: LoopMetrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, frozenset(labels.items())))


def test_runs_are_counted_by_trigger_and_outcome():
    m = LoopMetrics()
    m.run_started("fraud", "drift")
    m.run_started("fraud", "drift")
    m.run_started("fraud", "schedule")
    m.run_finished("fraud", "promoted")
    m.run_finished("fraud", "rolled_back")
    assert value(m, "flywheel_loop_runs_started_total", loop="fraud", trigger="drift") == 2
    assert value(m, "flywheel_loop_runs_started_total", loop="fraud", trigger="schedule") == 1
    assert value(m, "flywheel_loop_runs_finished_total", loop="fraud", outcome="promoted") == 1
    assert value(m, "flywheel_loop_runs_finished_total", loop="fraud", outcome="rolled_back") == 1


def test_every_outcome_series_exists_at_zero_once_the_loop_is_seen():
    """An alert on increase() cannot see a series' first increment if the
    series appears already at 1."""
    m = LoopMetrics()
    m.add_loop("fraud")
    for outcome in OUTCOMES:
        assert value(m, "flywheel_loop_runs_finished_total", loop="fraud", outcome=outcome) == 0
    assert value(m, "flywheel_loop_training_jobs_failed_total", loop="fraud") == 0
    assert value(m, "flywheel_loop_run_in_progress", loop="fraud") == 0


def test_unknown_outcome_is_refused():
    with pytest.raises(ValueError, match="outcome must be one of promoted, .* not 'won'"):
        LoopMetrics().run_finished("fraud", "won")


def test_phase_and_finish_move_the_in_progress_gauges():
    m = LoopMetrics()
    m.phase("fraud", in_progress=True, since=1000.0)
    assert value(m, "flywheel_loop_run_in_progress", loop="fraud") == 1
    assert value(m, "flywheel_loop_run_phase_started_timestamp_seconds", loop="fraud") == 1000.0
    m.run_finished("fraud", "refused")
    assert value(m, "flywheel_loop_run_in_progress", loop="fraud") == 0
    assert value(m, "flywheel_loop_run_phase_started_timestamp_seconds", loop="fraud") == 0


def test_tick_sets_last_progress_which_is_absent_before_the_first_tick():
    m = LoopMetrics()
    m.add_loop("fraud")
    assert value(m, "flywheel_loop_last_progress_timestamp_seconds", loop="fraud") is None
    m.tick("fraud", 1234.5)
    assert value(m, "flywheel_loop_last_progress_timestamp_seconds", loop="fraud") == 1234.5


def test_suppressed_triggers_and_failed_jobs_are_counted():
    m = LoopMetrics()
    m.suppressed("fraud", "cooldown")
    m.job_failed("fraud")
    m.job_failed("fraud")
    assert value(m, "flywheel_loop_triggers_suppressed_total", loop="fraud", guard="cooldown") == 1
    assert value(m, "flywheel_loop_training_jobs_failed_total", loop="fraud") == 2


def test_notification_series_start_at_zero_per_webhook_and_event():
    m = LoopMetrics()
    m.add_webhook("hooks.example:443", ["run_failed", "canary_rolled_back"])
    m.delivered("hooks.example:443", "run_failed")
    m.dead_letter("hooks.example:443", "canary_rolled_back")
    assert value(m, "flywheel_notify_deliveries_total", webhook="hooks.example:443", event="run_failed") == 1
    assert value(m, "flywheel_notify_deliveries_total", webhook="hooks.example:443", event="canary_rolled_back") == 0
    assert value(m, "flywheel_notify_dead_letters_total", webhook="hooks.example:443", event="run_failed") == 0
    assert value(m, "flywheel_notify_dead_letters_total", webhook="hooks.example:443", event="canary_rolled_back") == 1


def test_each_instance_has_its_own_registry():
    a, b = LoopMetrics(), LoopMetrics()
    a.run_started("fraud", "manual")
    assert value(b, "flywheel_loop_runs_started_total", loop="fraud", trigger="manual") is None
