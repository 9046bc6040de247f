"""Guard rails: whether a firing trigger may start a training run now.

Checked in this order, the first that holds suppressing the run:

1. a run of this loop is in progress (one run at a time);
2. the endpoint is busy (a canary, a swap), unless ``allow_during_canary``
   and the business is a canary;
3. the cooldown since the last run started has not passed;
4. the rolling 24 h budget of runs is spent.

A manual start skips the cooldown and the daily budget (a person asked for
it, and is accountable), but never the first two: two runs of one loop, or a
run racing a canary on its endpoint, would corrupt the outcome for everyone.
"""

from __future__ import annotations

import msgspec

from flywheel.loops.triggers.durations import format_duration, seconds_field
from flywheel.protocol.errors import ConfigError


class GuardSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A loop's guard rails."""

    cooldown_s: float | str = 3600.0
    """Least time between the starts of two runs (seconds or e.g. "1h"); stored as float seconds."""
    daily_budget: int = 4
    """Most runs started in any rolling 24 h (>= 1)."""
    allow_during_canary: bool = False
    """Start a run while a canary is in progress on the endpoint."""

    def __post_init__(self) -> None:
        seconds_field(self, "cooldown_s")
        if self.daily_budget < 1:
            raise ConfigError(f"daily_budget: expected a whole number of runs >= 1, got {self.daily_budget!r}")


class GuardInput(msgspec.Struct, frozen=True):
    """What the controller knows at the moment a trigger fires."""

    now: float
    last_run_started: float | None
    """When this loop's last run started (None: never)."""
    runs_last_24h: int
    """Runs of this loop started in the 24 h up to ``now``."""
    run_in_progress: str | None
    """The id of this loop's run in progress, if any."""
    endpoint_busy: str | None
    """Why the endpoint cannot take a new version now, e.g. "canary of version 3 in progress"."""
    manual: bool = False
    """A person started it (see the module docstring)."""
    canary: bool = False
    """``endpoint_busy`` is a canary, which ``allow_during_canary`` lets pass."""


def suppression(spec: GuardSpec, g: GuardInput) -> str | None:
    """None when a run may start; otherwise one line naming the guard and
    its numbers, e.g. ``cooldown: last run started 312 s ago, cooldown is 3600 s``."""
    if g.run_in_progress is not None:
        return f"run in progress: {g.run_in_progress}"
    if g.endpoint_busy is not None and not (spec.allow_during_canary and g.canary):
        return f"endpoint busy: {g.endpoint_busy}"
    if g.manual:
        return None
    cooldown = float(spec.cooldown_s)
    if g.last_run_started is not None and g.now - g.last_run_started < cooldown:
        ago = g.now - g.last_run_started
        return (
            f"cooldown: last run started {ago:.0f} s ago, cooldown is {cooldown:.0f} s"
            f" ({format_duration(cooldown)}); next start allowed in {cooldown - ago:.0f} s"
        )
    if g.runs_last_24h >= spec.daily_budget:
        return f"daily budget: {g.runs_last_24h} runs started in the last 24 h, budget is {spec.daily_budget}"
    return None
