"""What a loop's triggers read from the deployment (loops/signals.py): the
production variant's drift windows, one per scored window; rewards over a
time window from the endpoint's running totals; labelled accuracy from the
captures. A real SQLite registry; the endpoint's answers are given data."""

from __future__ import annotations

import pytest

from flywheel.loops.signals import DeploymentSignals, merge_windows, production_variant
from flywheel.loops.triggers import DriftWindow
from flywheel.protocol.errors import UnavailableError
from flywheel.registry import Registry


class Ops:
    def __init__(self):
        self.variants = {"1": {"rewards": 0, "reward_sum": 0.0}, "2": {"rewards": 0, "reward_sum": 0.0}}
        self.weights = {"1": 0.9, "2": 0.1}
        self.history: dict[str, list] = {}

    def status(self, endpoint):
        return {"variants": self.variants, "weights": self.weights}

    def drift_history(self, endpoint, version):
        return self.history.get(version, [])


@pytest.fixture
def reg(tmp_path):
    r = Registry.open(f"sqlite:///{tmp_path}/reg.db", str(tmp_path / "a"))
    yield r
    r.close()


def test_windows_scored_by_several_tests_are_one_window():
    history = [{"ts": 10.0, "any_drift": False}, {"ts": 10.2, "any_drift": True}, {"ts": 20.0, "any_drift": False}]
    assert merge_windows(history) == [DriftWindow(10.0, True), DriftWindow(20.0, False)]


def test_the_production_variant_is_the_registrys_else_the_most_traffic():
    status = {"variants": {"1": {}, "2": {}}, "weights": {"1": 0.2, "2": 0.8}}
    assert production_variant(status, 1) == "1"
    assert production_variant(status, 7) == "2"
    assert production_variant(status, None) == "2"


def test_drift_windows_come_from_the_production_version(reg):
    reg.register_version("digits", {"model.onnx": b"1"}, actor="t")
    reg.set_alias("digits", "production", 1, actor="t")
    ops = Ops()
    ops.history = {"1": [{"ts": 5.0, "any_drift": True}], "2": [{"ts": 6.0, "any_drift": False}]}
    s = DeploymentSignals(ops, reg, model_of={"digits": "digits"}, capture_of={})
    assert s.drift_windows("digits") == [DriftWindow(5.0, True)]


def test_rewards_over_a_window_are_the_totals_difference(reg):
    now = [1000.0]
    ops = Ops()
    s = DeploymentSignals(ops, reg, model_of={}, capture_of={}, clock=lambda: now[0])
    ops.variants["1"].update(rewards=10, reward_sum=9.0)
    first = s.quality("digits", 60)
    assert (first.rewards, first.mean_reward) == (10, 0.9)  # nothing older yet: everything so far
    now[0] += 100
    ops.variants["1"].update(rewards=30, reward_sum=11.0)  # 20 more rewards worth 2.0
    later = s.quality("digits", 60)
    assert later.rewards == 20
    assert later.mean_reward == pytest.approx(0.1)
    assert (later.labelled, later.accuracy) == (0, None)  # no capture


def test_an_unreachable_endpoint_is_an_error_the_trigger_reports(reg):
    class Down(Ops):
        def status(self, endpoint):
            raise UnavailableError("no answer")

    s = DeploymentSignals(Down(), reg, model_of={}, capture_of={})
    with pytest.raises(UnavailableError):
        s.drift_windows("digits")
