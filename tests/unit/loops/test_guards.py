"""Guard rails: which guard suppresses a run, in which order, with numbers."""

from __future__ import annotations

import msgspec
import pytest

from flywheel.loops.guards import GuardInput, GuardSpec, suppression
from flywheel.protocol.errors import ConfigError

NOW = 1_796_650_000.0
SPEC = GuardSpec(cooldown_s=3600, daily_budget=4)


def situation(**changes) -> GuardInput:
    base = dict(now=NOW, last_run_started=None, runs_last_24h=0, run_in_progress=None, endpoint_busy=None)
    return GuardInput(**{**base, **changes})


def test_nothing_in_the_way():
    assert suppression(SPEC, situation()) is None


def test_run_in_progress():
    assert suppression(SPEC, situation(run_in_progress="run-7")) == "run in progress: run-7"


def test_endpoint_busy():
    got = suppression(SPEC, situation(endpoint_busy="swap in progress"))
    assert got == "endpoint busy: swap in progress"


def test_cooldown_says_the_numbers():
    got = suppression(SPEC, situation(last_run_started=NOW - 312))
    assert got == "cooldown: last run started 312 s ago, cooldown is 3600 s (1h); next start allowed in 3288 s"


def test_cooldown_passed():
    assert suppression(SPEC, situation(last_run_started=NOW - 3600, runs_last_24h=1)) is None


def test_daily_budget():
    got = suppression(SPEC, situation(last_run_started=NOW - 7200, runs_last_24h=4))
    assert got == "daily budget: 4 runs started in the last 24 h, budget is 4"


def test_under_the_daily_budget():
    assert suppression(SPEC, situation(last_run_started=NOW - 7200, runs_last_24h=3)) is None


@pytest.mark.parametrize(
    "changes, guard",
    [
        (dict(run_in_progress="r", endpoint_busy="swap", last_run_started=NOW, runs_last_24h=9), "run in progress"),
        (dict(endpoint_busy="swap", last_run_started=NOW, runs_last_24h=9), "endpoint busy"),
        (dict(last_run_started=NOW, runs_last_24h=9), "cooldown"),
    ],
)
def test_the_first_guard_in_order_wins(changes, guard):
    assert suppression(SPEC, situation(**changes)).startswith(guard + ":")


def test_manual_skips_cooldown_and_budget():
    assert suppression(SPEC, situation(manual=True, last_run_started=NOW - 1, runs_last_24h=99)) is None


@pytest.mark.parametrize(
    "changes, guard",
    [(dict(run_in_progress="run-7"), "run in progress"), (dict(endpoint_busy="swap in progress"), "endpoint busy")],
)
def test_manual_never_skips_a_run_in_progress_or_a_busy_endpoint(changes, guard):
    assert suppression(SPEC, situation(manual=True, **changes)).startswith(guard + ":")


def test_allow_during_canary_lets_a_canary_pass():
    spec = GuardSpec(allow_during_canary=True)
    assert suppression(spec, situation(endpoint_busy="canary of version 3 in progress", canary=True)) is None


def test_allow_during_canary_does_not_let_a_swap_pass():
    spec = GuardSpec(allow_during_canary=True)
    assert suppression(spec, situation(endpoint_busy="swap in progress")) == "endpoint busy: swap in progress"


def test_a_canary_suppresses_by_default():
    got = suppression(GuardSpec(), situation(endpoint_busy="canary of version 3 in progress", canary=True))
    assert got == "endpoint busy: canary of version 3 in progress"


def test_zero_cooldown():
    assert suppression(GuardSpec(cooldown_s=0), situation(last_run_started=NOW)) is None


def test_defaults():
    assert GuardSpec() == GuardSpec(cooldown_s=3600.0, daily_budget=4, allow_during_canary=False)


def test_cooldown_accepts_a_duration():
    assert msgspec.convert({"cooldown_s": "2h"}, GuardSpec).cooldown_s == 7200.0


@pytest.mark.parametrize(
    "data, message",
    [
        ({"cooldown_s": -1}, r"cooldown_s: a duration must be a finite number of seconds >= 0"),
        ({"cooldown_s": "soon"}, r"cooldown_s: expected a duration"),
        ({"daily_budget": 0}, r"daily_budget: expected a whole number of runs >= 1, got 0"),
        ({"cooldown": 5}, r"unknown field `cooldown`"),
    ],
)
def test_bad_specs_name_the_field(data, message):
    with pytest.raises(msgspec.ValidationError, match=message):
        msgspec.convert(data, GuardSpec)


def test_bad_spec_in_code_raises_config_error():
    with pytest.raises(ConfigError, match=r"^daily_budget: "):
        GuardSpec(daily_budget=0)
