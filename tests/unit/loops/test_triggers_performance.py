"""The performance trigger: a metric below a threshold, then disarmed."""

from __future__ import annotations

import msgspec
import pytest

from flywheel.loops.triggers import PerformanceTrigger, Quality, parse_triggers
from flywheel.loops.triggers.fixed import FixedSignals
from flywheel.protocol.errors import ConfigError

T0 = 1_796_650_000.0


def rewards(mean: float | None, count: int) -> Quality:
    return Quality(rewards=count, mean_reward=mean, labelled=0, accuracy=None)


def labels(accuracy: float | None, count: int) -> Quality:
    return Quality(rewards=0, mean_reward=None, labelled=count, accuracy=accuracy)


REWARD = PerformanceTrigger(metric="reward", below=0.5, window_s=600, min_samples=20)
ACCURACY = PerformanceTrigger(metric="accuracy", below=0.9, window_s="10m", min_samples=50)


@pytest.mark.parametrize(
    "trigger, quality, fires",
    [
        (REWARD, rewards(0.4, 20), True),
        (REWARD, rewards(0.4, 19), False),  # too few samples
        (REWARD, rewards(0.5, 100), False),  # at the threshold is not below
        (REWARD, rewards(None, 0), False),
        (REWARD, rewards(float("nan"), 100), False),
        (REWARD, labels(0.1, 100), False),  # labels are not rewards
        (ACCURACY, labels(0.85, 50), True),
        (ACCURACY, labels(0.85, 49), False),
        (ACCURACY, rewards(0.0, 100), False),
    ],
)
def test_fires_below_the_threshold_with_enough_samples(trigger, quality, fires):
    assert (trigger.check(FixedSignals(quality=quality), {}, T0, endpoint="ep") is not None) is fires


def test_the_firing_says_what_and_asks_for_the_window():
    signals = FixedSignals(quality=labels(0.8512, 64))
    firing = ACCURACY.check(signals, {}, T0, endpoint="fraud")
    assert firing is not None
    assert firing.reason == "accuracy 0.8512 over the last 10m is below 0.9 (64 samples)"
    assert signals.calls == [("quality", "fraud", 600.0)]


def test_disarmed_after_firing_until_the_window_passes():
    signals, memory = FixedSignals(quality=rewards(0.3, 50)), {}
    assert REWARD.check(signals, memory, T0, endpoint="ep") is not None
    assert REWARD.check(signals, memory, T0 + 599, endpoint="ep") is None
    memory = msgspec.json.decode(msgspec.json.encode(memory))
    assert REWARD.check(signals, memory, T0 + 600, endpoint="ep") is not None


def test_recovery_rearms():
    signals, memory = FixedSignals(quality=rewards(0.3, 50)), {}
    REWARD.check(signals, memory, T0, endpoint="ep")
    signals.feedback = rewards(0.7, 50)
    assert REWARD.check(signals, memory, T0 + 60, endpoint="ep") is None
    assert memory == {}
    signals.feedback = rewards(0.3, 50)
    assert REWARD.check(signals, memory, T0 + 120, endpoint="ep") is not None


def test_a_recovery_on_too_few_samples_does_not_rearm():
    signals, memory = FixedSignals(quality=rewards(0.3, 50)), {}
    REWARD.check(signals, memory, T0, endpoint="ep")
    signals.feedback = rewards(0.9, 3)
    REWARD.check(signals, memory, T0 + 60, endpoint="ep")
    signals.feedback = rewards(0.3, 50)
    assert REWARD.check(signals, memory, T0 + 120, endpoint="ep") is None


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"kind": "performance", "metric": "loss", "below": 1}, r"triggers\[0\]\.metric: Invalid enum value 'loss'"),
        ({"kind": "performance", "metric": "reward"}, r"Object missing required field `below`"),
        (
            {"kind": "performance", "metric": "reward", "below": float("nan")},
            r"triggers\[0\]\.below: expected a finite",
        ),
        ({"kind": "performance", "metric": "reward", "below": 1, "window_s": 0}, r"triggers\[0\]\.window_s: "),
        ({"kind": "performance", "metric": "reward", "below": 1, "min_samples": 0}, r"triggers\[0\]\.min_samples: "),
    ],
)
def test_bad_specs_name_the_field(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_triggers([spec])
