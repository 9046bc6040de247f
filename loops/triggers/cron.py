"""Five-field cron expressions, evaluated in UTC.

``minute hour day-of-month month day-of-week``; each field is ``*``, a
number, a range ``a-b``, a step ``*/n``, ``a-b/n`` or ``a/n`` (``a`` to the
field's maximum), or a comma-separated list of those. Day-of-week runs 0-7,
0 and 7 both Sunday. No names (``MON``, ``JAN``) and no ``@daily`` macros.

Day matching follows Vixie cron: when both day-of-month and day-of-week are
restricted (neither field starts with ``*``), a day matches if EITHER does;
otherwise both must (so ``*/2`` counts as unrestricted for this rule, as in
Vixie cron).
"""

from __future__ import annotations

import calendar
import datetime as _dt
import math

import msgspec

from flywheel.protocol.errors import ConfigError

_UTC = _dt.timezone.utc
# (name, lowest, highest) per field, in order
_FIELDS = (
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day-of-month", 1, 31),
    ("month", 1, 12),
    ("day-of-week", 0, 7),
)
# "0 0 29 2 *" waits up to 8 years for a leap year; this bounds the search
_MAX_STEPS = 100_000


class Cron(msgspec.Struct, frozen=True):
    """A parsed expression: the allowed values of each field (day-of-week
    0-6, Sunday 0) and whether the day fields were restricted."""

    expr: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    days_restricted: bool
    weekdays_restricted: bool

    def _day_matches(self, d: _dt.datetime) -> bool:
        dom = d.day in self.days
        dow = (d.isoweekday() % 7) in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return dom or dow
        return dom and dow

    def next_after(self, ts: float) -> float:
        """The first matching minute strictly after ``ts`` (Unix seconds)."""
        t = _dt.datetime.fromtimestamp(math.floor(ts / 60) * 60, tz=_UTC) + _dt.timedelta(minutes=1)
        for _ in range(_MAX_STEPS):
            if t.month not in self.months:
                year, month = (t.year + 1, 1) if t.month == 12 else (t.year, t.month + 1)
                t = t.replace(year=year, month=month, day=1, hour=0, minute=0)
            elif not self._day_matches(t):
                t = (t + _dt.timedelta(days=1)).replace(hour=0, minute=0)
            elif t.hour not in self.hours:
                t = (t + _dt.timedelta(hours=1)).replace(minute=0)
            elif t.minute not in self.minutes:
                t += _dt.timedelta(minutes=1)
            else:
                return t.timestamp()
        # parse_cron refuses expressions that never match, so this is a bug
        raise RuntimeError(f"cron {self.expr!r}: no match found after {ts}")


def _parse_value(text: str, name: str, lo: int, hi: int) -> int:
    if not text.isdigit():
        raise ConfigError(f"{name}: {text!r} is not a number")
    value = int(text)
    if not lo <= value <= hi:
        raise ConfigError(f"{name}: {value} is out of range {lo}-{hi}")
    return value


def _parse_field(text: str, name: str, lo: int, hi: int) -> set[int]:
    values: set[int] = set()
    for part in text.split(","):
        if not part:
            raise ConfigError(f"{name}: empty list item in {text!r}")
        base, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) < 1:
                raise ConfigError(f"{name}: step {step_text!r} must be a whole number >= 1")
            step = int(step_text)
        if base == "*":
            start, stop = lo, hi
        elif "-" in base:
            a, _, b = base.partition("-")
            start, stop = _parse_value(a, name, lo, hi), _parse_value(b, name, lo, hi)
            if start > stop:
                raise ConfigError(f"{name}: range {base} runs backwards")
        else:
            start = _parse_value(base, name, lo, hi)
            stop = hi if slash else start
        values.update(range(start, stop + 1, step))
    return values


def parse_cron(expr: str, field: str = "cron") -> Cron:
    """Parse a five-field expression; ConfigError, prefixed with ``field``,
    says which part of it (minute, hour, day-of-month, month, day-of-week)
    is wrong and why, e.g. ``cron: minute: 61 is out of range 0-59 (in '61 * * * *')``.
    An expression that matches no date at all (``0 0 31 2 *``) is refused too."""
    parts = expr.split()
    if len(parts) != 5:
        raise ConfigError(
            f"{field}: expected 5 fields (minute hour day-of-month month day-of-week), got {len(parts)} (in {expr!r})"
        )
    try:
        sets = [_parse_field(text, name, lo, hi) for text, (name, lo, hi) in zip(parts, _FIELDS)]
    except ConfigError as exc:
        raise ConfigError(f"{field}: {exc.message} (in {expr!r})") from None
    minutes, hours, days, months, weekdays = sets
    weekdays = {d % 7 for d in weekdays}
    days_restricted = not parts[2].startswith("*")
    weekdays_restricted = not parts[4].startswith("*")
    cron = Cron(
        expr=expr,
        minutes=frozenset(minutes),
        hours=frozenset(hours),
        days=frozenset(days),
        months=frozenset(months),
        weekdays=frozenset(weekdays),
        days_restricted=days_restricted,
        weekdays_restricted=weekdays_restricted,
    )
    # without the OR rule, a day-of-month must exist in some allowed month (Feb 29 counts)
    if not (days_restricted and weekdays_restricted):
        longest = max(calendar.monthrange(2000, m)[1] for m in months)
        if min(days) > longest:
            raise ConfigError(f"{field}: day-of-month never occurs in the allowed months (in {expr!r})")
    return cron
