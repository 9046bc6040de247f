"""Durations in configs: numbers of seconds or text with units."""

from __future__ import annotations

import msgspec
import pytest

from flywheel.loops.triggers.durations import format_duration, parse_duration, seconds_field
from flywheel.protocol.errors import ConfigError


@pytest.mark.parametrize(
    "value, seconds",
    [(0, 0.0), (90, 90.0), (2.5, 2.5), ("30s", 30.0), ("5m", 300.0), ("6h", 21600.0), ("1d", 86400.0),
     ("1w", 604800.0), ("1h30m", 5400.0), ("1.5h", 5400.0), ("120", 120.0), (" 2H ", 7200.0)],
)
def test_parse_duration(value, seconds):
    assert parse_duration(value, "every") == seconds


@pytest.mark.parametrize("value", ["", "h", "5 minutes", "-5m", "5y", "1h-", True, -1, float("inf"), float("nan")])
def test_bad_durations_name_the_field(value):
    with pytest.raises(ConfigError, match=r"^every: "):
        parse_duration(value, "every")


@pytest.mark.parametrize("seconds, text", [(3600, "1h"), (90, "90s"), (300, "5m"), (172800, "2d"), (1.5, "1.5s")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


class _Spec(msgspec.Struct, frozen=True):
    wait_s: float | str = 1.0

    def __post_init__(self) -> None:
        seconds_field(self, "wait_s")


def test_seconds_field_stores_float_seconds_in_a_frozen_struct():
    assert msgspec.convert({"wait_s": "2m"}, _Spec).wait_s == 120.0


def test_seconds_field_round_trips_as_seconds():
    spec = msgspec.convert({"wait_s": "2m"}, _Spec)
    assert msgspec.json.decode(msgspec.json.encode(spec), type=_Spec) == spec
