"""Five-field UTC cron: parsing, next_after, and errors that name the field."""

from __future__ import annotations

import datetime as dt
import random

import pytest

from flywheel.loops.triggers.cron import parse_cron
from flywheel.protocol.errors import ConfigError

UTC = dt.timezone.utc


def ts(*args: int) -> float:
    return dt.datetime(*args, tzinfo=UTC).timestamp()


def upcoming(expr: str, start: float, count: int) -> list[dt.datetime]:
    cron, t, out = parse_cron(expr), start, []
    for _ in range(count):
        t = cron.next_after(t)
        out.append(dt.datetime.fromtimestamp(t, tz=UTC))
    return out


# 2026-12-07 is a Monday
MONDAY_NOON = ts(2026, 12, 7, 12, 0)


@pytest.mark.parametrize(
    "expr, start, expected",
    [
        ("0 3 * * *", MONDAY_NOON, [(2026, 12, 8, 3, 0), (2026, 12, 9, 3, 0)]),
        ("*/15 9-17 * * 1-5", ts(2026, 12, 7, 17, 40), [(2026, 12, 7, 17, 45), (2026, 12, 8, 9, 0)]),
        ("*/15 9-17 * * 1-5", ts(2026, 12, 11, 17, 50), [(2026, 12, 14, 9, 0), (2026, 12, 14, 9, 15)]),
        ("0 0 1 * *", MONDAY_NOON, [(2027, 1, 1, 0, 0), (2027, 2, 1, 0, 0)]),
        ("0 0 * * 0", MONDAY_NOON, [(2026, 12, 13, 0, 0), (2026, 12, 20, 0, 0)]),
        ("30 6 * 2 *", MONDAY_NOON, [(2027, 2, 1, 6, 30), (2027, 2, 2, 6, 30)]),
        ("0 0 29 2 *", MONDAY_NOON, [(2028, 2, 29, 0, 0), (2032, 2, 29, 0, 0)]),
        ("5,10-12 0 * * *", MONDAY_NOON, [(2026, 12, 8, 0, 5), (2026, 12, 8, 0, 10), (2026, 12, 8, 0, 11)]),
        ("0 0-10/5 * * *", MONDAY_NOON, [(2026, 12, 8, 0, 0), (2026, 12, 8, 5, 0), (2026, 12, 8, 10, 0)]),
        ("50/5 * * * *", MONDAY_NOON, [(2026, 12, 7, 12, 50), (2026, 12, 7, 12, 55), (2026, 12, 7, 13, 50)]),
        ("59 23 31 12 *", MONDAY_NOON, [(2026, 12, 31, 23, 59), (2027, 12, 31, 23, 59)]),
    ],
)
def test_next_after(expr, start, expected):
    assert upcoming(expr, start, len(expected)) == [dt.datetime(*e, tzinfo=UTC) for e in expected]


def test_next_after_is_strictly_after_a_matching_minute():
    assert parse_cron("0 3 * * *").next_after(ts(2026, 12, 8, 3, 0)) == ts(2026, 12, 9, 3, 0)


def test_next_after_a_fraction_of_a_second_before_the_slot():
    assert parse_cron("0 3 * * *").next_after(ts(2026, 12, 8, 2, 59) + 59.5) == ts(2026, 12, 8, 3, 0)


def test_sunday_is_0_and_7():
    assert upcoming("0 0 * * 0", MONDAY_NOON, 5) == upcoming("0 0 * * 7", MONDAY_NOON, 5)


def test_weekday_range_through_7_wraps_to_sunday():
    days = {d.isoweekday() for d in upcoming("0 0 * * 5-7", MONDAY_NOON, 9)}
    assert days == {5, 6, 7}  # Friday, Saturday, Sunday


def test_both_day_fields_restricted_match_either():
    # the 13th of the month OR a Friday
    got = upcoming("0 0 13 * 5", MONDAY_NOON, 4)
    assert [d.day for d in got] == [11, 13, 18, 25]


def test_an_unrestricted_day_of_month_leaves_day_of_week_alone():
    got = upcoming("0 0 * * 5", MONDAY_NOON, 3)
    assert all(d.isoweekday() == 5 for d in got)


def test_a_star_step_counts_as_unrestricted_for_the_day_rule():
    # Vixie cron: "*/2" starts with "*", so the day fields AND: odd days that are Fridays
    got = upcoming("0 0 */2 * 5", MONDAY_NOON, 3)
    assert all(d.isoweekday() == 5 and d.day % 2 == 1 for d in got)


def _brute_force(expr: str, start: float, count: int) -> list[dt.datetime]:
    """Walk minute by minute, matching each field by hand."""
    fields = expr.split()

    def allowed(text: str, lo: int, hi: int) -> set[int]:
        out: set[int] = set()
        for part in text.split(","):
            base, _, step = part.partition("/")
            a, b = (lo, hi) if base == "*" else (int(base.split("-")[0]), int(base.split("-")[-1]))
            out.update(range(a, b + 1, int(step or 1)))
        return out

    mins, hours, doms, months = (allowed(f, lo, hi) for f, lo, hi in zip(fields, (0, 0, 1, 1), (59, 23, 31, 12)))
    dows = {d % 7 for d in allowed(fields[4], 0, 7)}
    t = dt.datetime.fromtimestamp(start, tz=UTC).replace(second=0) + dt.timedelta(minutes=1)
    out = []
    while len(out) < count:
        dom_ok, dow_ok = t.day in doms, t.isoweekday() % 7 in dows
        restricted = not fields[2].startswith("*") and not fields[4].startswith("*")
        day_ok = (dom_ok or dow_ok) if restricted else (dom_ok and dow_ok)
        if t.minute in mins and t.hour in hours and t.month in months and day_ok:
            out.append(t)
        t += dt.timedelta(minutes=1)
    return out


def test_agrees_with_a_minute_by_minute_walk():
    rng = random.Random(7)
    for _ in range(25):
        expr = " ".join(
            [
                rng.choice(["*", "*/7", "0,30", "5-20/5", str(rng.randrange(60))]),
                rng.choice(["*", "*/6", "9-17", str(rng.randrange(24))]),
                rng.choice(["*", "1,15", "10-20", "*/3"]),
                rng.choice(["*", "1-6", "*/2", "12"]),
                rng.choice(["*", "1-5", "0", "7", "6,0"]),
            ]
        )
        start = MONDAY_NOON + rng.randrange(0, 86400 * 365)
        assert upcoming(expr, start, 3) == _brute_force(expr, start, 3), expr


@pytest.mark.parametrize(
    "expr, message",
    [
        ("0 3 * *", r"cron: expected 5 fields \(minute hour day-of-month month day-of-week\), got 4"),
        ("0 3 * * * *", r"got 6"),
        ("61 * * * *", r"cron: minute: 61 is out of range 0-59 \(in '61 \* \* \* \*'\)"),
        ("0 24 * * *", r"hour: 24 is out of range 0-23"),
        ("0 0 0 * *", r"day-of-month: 0 is out of range 1-31"),
        ("0 0 * 13 *", r"month: 13 is out of range 1-12"),
        ("0 0 * * 8", r"day-of-week: 8 is out of range 0-7"),
        ("*/0 * * * *", r"minute: step '0' must be a whole number >= 1"),
        ("5-3 * * * *", r"minute: range 5-3 runs backwards"),
        ("x * * * *", r"minute: 'x' is not a number"),
        ("0 0 * JAN *", r"month: 'JAN' is not a number"),
        ("1,,2 * * * *", r"minute: empty list item"),
        ("0 0 31 2 *", r"day-of-month never occurs in the allowed months"),
        ("0 0 30,31 2 *", r"day-of-month never occurs in the allowed months"),
    ],
)
def test_bad_expressions_name_the_field(expr, message):
    with pytest.raises(ConfigError, match=message):
        parse_cron(expr)


def test_the_error_prefix_is_the_config_field():
    with pytest.raises(ConfigError, match=r"^schedule\.cron: hour: "):
        parse_cron("0 25 * * *", field="schedule.cron")


def test_a_day_that_exists_only_with_the_or_rule_is_accepted():
    # the 31st never comes in February, but Mondays do
    got = upcoming("0 0 31 2 1", MONDAY_NOON, 1)
    assert got[0].isoweekday() == 1 and got[0].month == 2
