"""Judging steps, merging worker replies, sizing, recommending: no servers."""

import pytest

from _factories import _cfg, _reply

from flywheel.bench.harness import replicas_needed
from flywheel.bench.harness.configsearch import recommend
from flywheel.bench.harness.pool import judge, merge_replies
from flywheel.bench.harness.runner import ConfigResult
from flywheel.bench.harness.scenario import SLO


def test_merge_adds_counts_and_takes_percentiles_over_all_processes():
    fast = _reply([0.001] * 900)
    slow = _reply([0.1] * 100, errors={"http_json: HTTP 503: full": 10}, proto="grpc")
    step = merge_replies("users", 8, 8, None, [fast, slow])
    assert (step.ok, step.errors) == (1000, 10)
    assert step.error_rate == pytest.approx(10 / 1010, abs=1e-6)
    assert step.throughput_rps == 500.0
    assert step.p50_ms == pytest.approx(1.0, rel=1e-3)
    assert step.p99_ms == pytest.approx(100.0, rel=1e-3)
    assert step.protocols["grpc"].ok == 100
    assert step.protocols["grpc"].errors == 10
    assert step.error_counts == {"http_json: HTTP 503: full": 10}
    assert step.limited_by == "server"


@pytest.mark.parametrize(
    "cpu, busy, rate, done, expected",
    [
        (0.95, 0.6, None, 100, "client"),   # the load generator used its core
        (0.3, 0.99, None, 100, "host"),     # both cores busy: server and client share them
        (0.3, 0.5, 100.0, 100, "server"),   # rate not achieved (50/s of 100/s) with CPU to spare
        (0.3, 0.5, 50.0, 100, "offered load"),
    ],
)
def test_who_limited_the_step(cpu, busy, rate, done, expected):
    reply = _reply([0.001] * done, cpu=cpu, busy=busy, rate=rate)
    step = merge_replies("rate" if rate else "users", rate or 4, 4, rate, [reply])
    assert step.limited_by == expected


def test_judge_names_every_broken_bound():
    slo = SLO(p99_ms=5, max_error_rate=0.01, min_achieved=0.9)
    good = judge(merge_replies("rate", 50, 8, 50.0, [_reply([0.002] * 100, rate=50.0)]), slo)
    assert good.slo_ok
    assert good.slo_failures == []
    reply = _reply([0.002] * 90 + [0.05] * 10, errors={"x": 5}, rate=200.0)
    bad = judge(merge_replies("rate", 200, 8, 200.0, [reply]), slo)
    assert not bad.slo_ok
    text = " | ".join(bad.slo_failures)
    assert "p99 50.0" in text
    assert "error rate" in text
    assert "achieved" in text


def test_replicas_needed_with_headroom():
    assert replicas_needed(1000, 2000, 0.0) == 2
    assert replicas_needed(1000, 2000, 0.25) == 3
    assert replicas_needed(1000, 1, 0.25) == 1
    assert replicas_needed(0, 2000, 0.25) is None
    assert replicas_needed(1000, 0, 0.25) is None


def test_recommendation_is_the_fastest_then_the_cheapest():
    assert recommend([_cfg("a", 1000, 1), _cfg("b", 1500, 2), _cfg("c", 1490, 1)]) == "c"
    assert recommend([_cfg("a", 1000, 1), _cfg("b", 1500, 2)]) == "b"
    assert recommend([ConfigResult(label="x", settings={}, cpus=1, error="deploy failed")]) == ""
