"""The drift trigger: k of the last n windows after memory["since"]."""

from __future__ import annotations

import datetime as dt

import msgspec
import pytest

from flywheel.loops.triggers import DriftTrigger, DriftWindow, parse_triggers
from flywheel.loops.triggers.drift import reset
from flywheel.loops.triggers.fixed import FixedSignals
from flywheel.protocol.errors import ConfigError

T0 = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.timezone.utc).timestamp()


def windows(pattern: str, start: float = T0) -> list[DriftWindow]:
    """'..xx.' -> one window a minute, x drifted."""
    return [DriftWindow(ts=start + 60 * i, drifted=c == "x") for i, c in enumerate(pattern)]


@pytest.mark.parametrize(
    "k, n, pattern, fires",
    [
        (3, 5, "", False),
        (3, 5, "xx", False),
        (3, 5, "xxx", True),
        (3, 5, "x.x.x", True),
        (3, 5, "xx...x", False),  # only the last 5 count
        (3, 5, "xxx.....", False),
        (1, 1, ".....x", True),
        (1, 1, "x.", False),
        (5, 5, "xxxxx", True),
    ],
)
def test_fires_when_k_of_the_last_n_drifted(k, n, pattern, fires):
    signals = FixedSignals(windows=windows(pattern))
    assert (DriftTrigger(k=k, n=n).check(signals, {}, T0 + 3600, endpoint="ep") is not None) is fires


def test_the_firing_says_how_many_and_when():
    signals = FixedSignals(windows=windows("x.x.x"))
    firing = DriftTrigger(k=3, n=5).check(signals, {}, T0 + 3600, endpoint="ep")
    assert firing is not None
    assert firing.kind == "drift"
    assert firing.reason == "drift in 3 of the last 5 windows (newest at 2026-12-07 12:04:00 UTC)"
    assert firing.detail["drifted"] == 3


def test_it_asks_about_its_endpoint():
    signals = FixedSignals(windows=windows("xxx"))
    DriftTrigger().check(signals, {}, T0, endpoint="fraud")
    assert signals.calls == [("drift_windows", "fraud")]


def test_the_same_windows_never_fire_twice():
    trigger, signals, memory = DriftTrigger(k=2, n=3), FixedSignals(windows=windows("xxx")), {}
    assert trigger.check(signals, memory, T0, endpoint="ep") is not None
    assert memory["since"] == T0 + 120
    assert trigger.check(signals, memory, T0 + 1, endpoint="ep") is None


def test_new_drifted_windows_fire_again():
    trigger, signals, memory = DriftTrigger(k=2, n=3), FixedSignals(windows=windows("xxx")), {}
    trigger.check(signals, memory, T0, endpoint="ep")
    signals.windows = windows("xxx" + "x")
    assert trigger.check(signals, memory, T0, endpoint="ep") is None  # one new window is not two
    signals.windows = windows("xxx" + "xx")
    assert trigger.check(signals, memory, T0, endpoint="ep") is not None


def test_memory_survives_a_json_round_trip():
    trigger, signals, memory = DriftTrigger(k=2, n=3), FixedSignals(windows=windows("xxx")), {}
    trigger.check(signals, memory, T0, endpoint="ep")
    memory = msgspec.json.decode(msgspec.json.encode(memory))
    assert trigger.check(signals, memory, T0 + 1, endpoint="ep") is None


def test_reset_forgets_windows_up_to_now():
    trigger, signals, memory = DriftTrigger(k=1, n=5), FixedSignals(windows=windows("..x..")), {}
    reset(memory, T0 + 600)
    assert trigger.check(signals, memory, T0 + 600, endpoint="ep") is None


def test_windows_out_of_order_are_sorted():
    signals = FixedSignals(windows=list(reversed(windows("xx..."))))
    assert DriftTrigger(k=2, n=3).check(signals, {}, T0, endpoint="ep") is None


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            {"kind": "drift", "k": 0, "n": 5},
            r"triggers\[0\]\.k: expected a count of drifted windows from 1 to n \(5\), got 0",
        ),
        ({"kind": "drift", "k": 6, "n": 5}, r"triggers\[0\]\.k: .* got 6"),
        ({"kind": "drift", "k": 1, "n": 1001}, r"triggers\[0\]\.n: expected a window count from 1 to 1000, got 1001"),
        ({"kind": "drift", "k": 1, "n": 0}, r"triggers\[0\]\.n: "),
        ({"kind": "drift", "k": "3"}, r"triggers\[0\]\.k: Expected `int`, got `str`"),
    ],
)
def test_bad_specs_name_the_field(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_triggers([spec])
