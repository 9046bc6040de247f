"""The schedule trigger: every / cron, first check arms, missed slots fire once."""

from __future__ import annotations

import datetime as dt

import msgspec
import pytest

from flywheel.loops.triggers import ScheduleTrigger, parse_triggers
from flywheel.loops.triggers.fixed import FixedSignals
from flywheel.protocol.errors import ConfigError

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 12, 7, 12, 0, tzinfo=UTC).timestamp()
SIGNALS = FixedSignals()


def roundtrip(memory: dict) -> dict:
    return msgspec.json.decode(msgspec.json.encode(memory))


def check(trigger: ScheduleTrigger, memory: dict, now: float):
    return trigger.check(SIGNALS, memory, now, endpoint="ep")


def test_every_first_check_arms_without_firing():
    memory: dict = {}
    assert check(ScheduleTrigger(every="1h"), memory, T0) is None
    assert memory["due"] == T0 + 3600


@pytest.mark.parametrize("offset, fires", [(0, False), (3599, False), (3600, True), (3700, True)])
def test_every_fires_at_the_due_time(offset, fires):
    trigger, memory = ScheduleTrigger(every="1h"), {}
    check(trigger, memory, T0)
    assert (check(trigger, memory, T0 + offset) is not None) is fires


def test_every_fires_once_per_slot_and_keeps_its_phase():
    trigger, memory = ScheduleTrigger(every=600), {}
    check(trigger, memory, T0)
    fired = [t for t in range(int(T0), int(T0) + 3600, 45) if check(trigger, memory, t)]
    assert len(fired) == 5  # slots at +600 ... +3000; +3600 is not reached
    assert memory["due"] == T0 + 3600


def test_every_missed_slots_fire_once():
    trigger, memory = ScheduleTrigger(every="1h"), {}
    check(trigger, memory, T0)
    firing = check(trigger, memory, T0 + 5 * 3600 + 10)
    assert firing is not None
    assert firing.detail["missed"] == 4
    assert check(trigger, memory, T0 + 5 * 3600 + 20) is None
    assert memory["due"] == T0 + 6 * 3600


def test_cron_first_check_arms_then_fires_at_the_slot():
    trigger, memory = ScheduleTrigger(cron="0 3 * * *"), {}
    assert check(trigger, memory, T0) is None
    due = dt.datetime(2026, 12, 8, 3, 0, tzinfo=UTC).timestamp()
    assert memory["due"] == due
    assert check(trigger, memory, due - 1) is None
    firing = check(trigger, memory, due + 5)
    assert firing is not None
    assert firing.reason == "schedule: cron '0 3 * * *' was due at 2026-12-08 03:00:00 UTC"
    assert memory["due"] == due + 86400


def test_cron_downtime_fires_once_and_counts_missed_slots():
    trigger, memory = ScheduleTrigger(cron="0 3 * * *"), {}
    check(trigger, memory, T0)
    three_days_later = T0 + 3 * 86400
    firing = check(trigger, memory, three_days_later)
    assert firing is not None and firing.detail["missed"] == 2
    assert check(trigger, memory, three_days_later + 60) is None
    assert memory["due"] > three_days_later


def test_memory_survives_a_json_round_trip_and_a_new_trigger_object():
    memory: dict = {}
    check(ScheduleTrigger(every="1h"), memory, T0)
    memory = roundtrip(memory)
    assert check(ScheduleTrigger(every="1h"), memory, T0 + 3600) is not None
    memory = roundtrip(memory)
    assert check(ScheduleTrigger(every="1h"), memory, T0 + 3601) is None


def test_a_changed_rule_rearms_from_now_without_firing():
    memory: dict = {}
    check(ScheduleTrigger(every="1d"), memory, T0)
    assert check(ScheduleTrigger(every="1h"), memory, T0 + 2 * 86400) is None
    assert memory["due"] == T0 + 2 * 86400 + 3600


def test_the_rule_in_words():
    assert ScheduleTrigger(every=21600).rule == "every 6h"
    assert ScheduleTrigger(cron="0 3 * * *").rule == "cron '0 3 * * *'"


def test_signals_are_not_consulted():
    signals = FixedSignals()
    ScheduleTrigger(every="1h").check(signals, {}, T0, endpoint="ep")
    assert signals.calls == []


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"kind": "schedule"}, r"triggers\[0\]\.every/cron: a schedule takes exactly one of every"),
        ({"kind": "schedule", "every": "1h", "cron": "0 3 * * *"}, r"exactly one of every"),
        ({"kind": "schedule", "every": "0s"}, r"triggers\[0\]\.every: must be longer than 0 s"),
        ({"kind": "schedule", "every": "soon"}, r"triggers\[0\]\.every: expected a duration"),
        ({"kind": "schedule", "cron": "0 3 * * 9"}, r"triggers\[0\]\.cron: day-of-week: 9 is out of range 0-7"),
    ],
)
def test_bad_specs_name_the_field(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_triggers([spec])
