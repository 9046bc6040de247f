"""``{kind: performance, metric: reward, below: 0.6, window_s: 600, min_samples: 20}``:
fire when the endpoint's feedback over the last ``window_s`` is below a
threshold.

``reward`` is the mean reward (samples: rewards received); ``accuracy`` is
the accuracy of labelled predictions (samples: labels received). Fewer than
``min_samples`` samples never fire.

After firing the trigger is disarmed, so one bad stretch starts one run. It
re-arms when a check sees the metric back at or above ``below`` (with
``min_samples`` samples), or once ``window_s`` has passed since it fired, so
that whatever model is serving by then is judged on feedback it earned
itself, not on the stretch that fired.

memory: ``{"fired_at": float}`` while disarmed, empty while armed.
"""

from __future__ import annotations

import math
from typing import Literal

import msgspec

from flywheel.loops.triggers.base import Firing, Quality, Signals, register, require
from flywheel.loops.triggers.durations import format_duration, seconds_field


def _reading(metric: str, q: Quality) -> tuple[float | None, int]:
    if metric == "reward":
        return q.mean_reward, q.rewards
    return q.accuracy, q.labelled


@register
class PerformanceTrigger(
    msgspec.Struct, tag="performance", tag_field="kind", frozen=True, forbid_unknown_fields=True
):
    """Fire when ``metric`` over the last ``window_s`` (a duration) is below
    ``below``, measured on at least ``min_samples`` samples."""

    metric: Literal["reward", "accuracy"]
    below: float
    window_s: float | str = 600.0
    min_samples: int = 20

    def __post_init__(self) -> None:
        require(math.isfinite(self.below), "below", "a finite number", self.below)
        require(seconds_field(self, "window_s") > 0, "window_s", "a duration longer than 0 s", self.window_s)
        require(self.min_samples >= 1, "min_samples", "a whole number >= 1", self.min_samples)

    def check(self, signals: Signals, memory: dict, now: float, *, endpoint: str) -> Firing | None:
        window = float(self.window_s)
        value, samples = _reading(self.metric, signals.quality(endpoint, window))
        measured = value is not None and not math.isnan(value) and samples >= self.min_samples
        fired_at = memory.get("fired_at")
        if fired_at is not None:
            recovered = measured and value >= self.below  # type: ignore[operator]
            if not (recovered or now - fired_at >= window):
                return None
            memory.pop("fired_at")
        if not measured or value >= self.below:  # type: ignore[operator]
            return None
        memory["fired_at"] = now
        return Firing(
            kind="performance",
            reason=(
                f"{self.metric} {value:.4g} over the last {format_duration(window)} is below {self.below:g}"
                f" ({samples} samples)"
            ),
            detail={"metric": self.metric, "value": value, "below": self.below, "samples": samples,
                    "window_s": window},
        )
