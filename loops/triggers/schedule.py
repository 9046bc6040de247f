"""``{kind: schedule, every: "6h"}`` or ``{kind: schedule, cron: "0 3 * * *"}``.

The first check records the next due time without firing. A check at or past
the due time fires once and schedules the next due time after ``now``: slots
missed while the controller was down fire once, not once each. ``every``
keeps its phase (due times stay ``first + k * every``); ``cron`` is in UTC.
When the rule in the spec changes, the next check reschedules from ``now``
without firing.

memory: ``{"due": float, "rule": str}``.
"""

from __future__ import annotations

import math

import msgspec

from flywheel.loops.triggers.base import Firing, Signals, register, utc_text
from flywheel.loops.triggers.cron import parse_cron
from flywheel.loops.triggers.durations import format_duration, parse_duration
from flywheel.protocol.errors import ConfigError

# counting missed cron slots past this many is not worth the time
_MAX_MISSED_COUNT = 1000


@register
class ScheduleTrigger(msgspec.Struct, tag="schedule", tag_field="kind", frozen=True, forbid_unknown_fields=True):
    """Fire every ``every`` (a duration, e.g. "6h", or seconds), or at the
    times of a five-field UTC ``cron`` expression: exactly one of the two."""

    every: float | str | None = None
    cron: str | None = None

    def __post_init__(self) -> None:
        if (self.every is None) == (self.cron is None):
            raise ConfigError("every/cron: a schedule takes exactly one of every (e.g. 6h) or cron (e.g. '0 3 * * *')")
        if self.every is not None:
            if parse_duration(self.every, "every") <= 0:
                raise ConfigError(f"every: must be longer than 0 s, got {self.every!r}")
        else:
            parse_cron(self.cron)  # type: ignore[arg-type]  # ConfigError names the cron field

    @property
    def rule(self) -> str:
        """The schedule in words, e.g. ``every 6h`` or ``cron '0 3 * * *'``."""
        if self.cron is not None:
            return f"cron {self.cron!r}"
        return f"every {format_duration(self.period_s)}"

    @property
    def period_s(self) -> float:
        """Seconds between firings of an ``every`` schedule (0 for cron)."""
        return 0.0 if self.every is None else parse_duration(self.every, "every")

    def next_due(self, after: float) -> float:
        """The first due time strictly after ``after`` for a fresh schedule."""
        if self.cron is not None:
            return parse_cron(self.cron).next_after(after)
        return after + self.period_s

    def check(self, signals: Signals, memory: dict, now: float, *, endpoint: str) -> Firing | None:
        due = memory.get("due")
        if due is None or memory.get("rule") != self.rule:
            memory.update(due=self.next_due(now), rule=self.rule)
            return None
        if now < due:
            return None
        if self.cron is not None:
            cron = parse_cron(self.cron)
            following = cron.next_after(due)
            missed = 0
            while following <= now and missed < _MAX_MISSED_COUNT:
                missed += 1
                following = cron.next_after(following)
            if following <= now:
                following = cron.next_after(now)
        else:
            period = self.period_s
            missed = math.floor((now - due) / period)
            following = due + (missed + 1) * period
            if following <= now:  # float rounding at an exact multiple
                following += period
        memory["due"] = following
        late = f", {missed} more slot(s) missed" if missed else ""
        return Firing(
            kind="schedule",
            reason=f"schedule: {self.rule} was due at {utc_text(due)}{late}",
            detail={"due": due, "missed": missed, "next_due": following},
        )
