from __future__ import annotations

import json
import math

import numpy as np
import pytest

from flywheel.protocol.errors import ConfigError, InvalidInputError, PreconditionFailedError
from flywheel.serving.canary import (
    BUCKET_EDGES,
    Canary,
    CanaryConfig,
    GateConfig,
    VariantWindow,
)


def window(requests: int = 100, errors: int = 0, latency_s: float = 0.010, rewards: tuple = ()) -> VariantWindow:
    w = VariantWindow()
    for i in range(requests):
        w.observe(latency_s, ok=i >= errors)
    for r in rewards:
        w.add_reward(r)
    return w


def config(**kw) -> CanaryConfig:
    kw.setdefault("hold_s", 10.0)
    return CanaryConfig(variant="2", baseline="1", **kw)


# -- the ramp -------------------------------------------------------------------------------------


def test_healthy_canary_ramps_through_every_step_and_promotes():
    c = Canary(config(), now=0.0)
    t, seen = 0.0, []
    while not c.finished:
        seen.append(c.weights())
        assert c.step_started_at == t
        base = window() if c.percent < 100 else VariantWindow()  # at 100 % the baseline gets no traffic
        assert c.evaluate(t + 5, base, window()).action == "hold"
        d = c.evaluate(t + 10, base, window())
        assert all(g.passed for g in d.gates), d.gates
        t += 10
    assert d.action == "promote"
    assert c.status == "promoted"
    assert [w["2"] for w in seen] == [0.01, 0.05, 0.25, 0.5, 1.0]
    assert all(sum(w.values()) == pytest.approx(1.0) for w in seen)
    assert c.weights() == {"2": 1.0}
    assert [h["action"] for h in c.history] == ["start", "advance", "advance", "advance", "advance", "promote"]
    # the 100 % step judged the baseline by the stats of the earlier steps
    p99 = next(g for g in d.gates if g.name == "p99")
    assert p99.value == pytest.approx(1.0)
    assert "earlier steps" in p99.detail
    assert c.evaluate(100.0, window(), window(errors=100)).action == "hold"  # finished: no change


def test_promote_off_completes_at_full_traffic():
    c = Canary(config(steps=(50, 100), promote=False), now=0.0)
    assert c.evaluate(10, window(), window()).action == "advance"
    d = c.evaluate(20, VariantWindow(), window())
    assert d.action == "hold"
    assert "completed" in d.reason
    assert c.status == "completed"
    assert c.weights() == {"1": 0.0, "2": 1.0}


# -- gates ----------------------------------------------------------------------------------------


def test_error_gate_rolls_back_at_once():
    c = Canary(config(), now=0.0)
    d = c.evaluate(1.0, window(errors=1), window(errors=6))  # +5 points, long before hold_s
    assert d.action == "rollback"
    assert "error_rate" in d.reason
    gate = next(g for g in d.gates if g.name == "error_rate")
    assert not gate.passed
    assert gate.value == pytest.approx(0.05)
    assert gate.limit == 0.01
    assert c.status == "rolled_back"
    assert c.weights() == {"1": 1.0, "2": 0.0}
    assert c.history[-1]["action"] == "rollback"
    assert c.history[-1]["gates"][0]["name"] == "error_rate"


def test_p99_gate_rolls_back_a_slow_canary():
    c = Canary(config(), now=0.0)
    d = c.evaluate(1.0, window(latency_s=0.010), window(latency_s=0.050))
    assert d.action == "rollback"
    (gate,) = [g for g in d.gates if not g.passed]
    assert gate.name == "p99"
    assert gate.value == pytest.approx(5.0, rel=0.13)
    assert gate.limit == 2.0


def test_p99_gate_compares_with_a_1ms_floor():
    c = Canary(config(), now=0.0)
    d = c.evaluate(1.0, window(latency_s=20e-6), window(latency_s=1.5e-3))  # 75x a 20 us baseline
    assert d.action == "hold"
    assert all(g.passed for g in d.gates)
    d = c.evaluate(2.0, VariantWindow(), window(latency_s=1.5e-3))
    p99 = next(g for g in d.gates if g.name == "p99")
    assert p99.passed
    assert "no baseline requests" in p99.detail


def test_reward_gate_needs_min_rewards_then_rolls_back_on_a_drop():
    gates = GateConfig(max_reward_drop=0.05, min_rewards=20)
    c = Canary(config(gates=gates), now=0.0)
    d = c.evaluate(1.0, window(rewards=[0.8] * 30), window(rewards=[0.6] * 10))
    reward = next(g for g in d.gates if g.name == "reward")
    assert d.action == "hold"
    assert reward.passed
    assert reward.value is None
    assert "not judged" in reward.detail
    d = c.evaluate(2.0, window(rewards=[0.8] * 30), window(rewards=[0.6] * 30))
    reward = next(g for g in d.gates if g.name == "reward")
    assert d.action == "rollback"
    assert not reward.passed
    assert reward.value == pytest.approx(0.2)


def test_drift_gate():
    c = Canary(config(gates=GateConfig(max_drift=0.3)), now=0.0)
    assert c.evaluate(1.0, window(), window(), drift=None).action == "hold"
    assert c.evaluate(2.0, window(), window(), drift=0.2).action == "hold"
    d = c.evaluate(3.0, window(), window(), drift=0.5)
    assert d.action == "rollback"
    assert "drift" in d.reason


def test_a_drift_gated_step_does_not_advance_without_a_score():
    c = Canary(config(gates=GateConfig(max_drift=0.3), max_step_s=60.0), now=0.0)
    d = c.evaluate(11.0, window(), window(), drift=None)  # healthy past hold_s, but no drift window yet
    assert d.action == "hold"
    assert "waiting for a drift window" in d.reason
    assert c.evaluate(12.0, window(), window(), drift=0.1).action == "advance"
    d = c.evaluate(80.0, window(), window(), drift=None)  # the next step never got a score
    assert d.action == "rollback"
    assert "no drift score" in d.reason


def test_too_few_requests_holds_without_judging():
    c = Canary(config(), now=0.0)
    d = c.evaluate(60.0, window(), window(requests=5, errors=5))  # all failed, but only 5 of 20
    assert d.action == "hold"
    assert d.gates == []
    assert "5 of 20" in d.reason
    assert c.status == "running"
    assert c.step == 0


def test_not_enough_traffic_rolls_back_after_max_step_s():
    c = Canary(config(max_step_s=120.0), now=0.0)
    assert c.evaluate(119.0, window(), window(requests=19)).action == "hold"
    d = c.evaluate(120.0, window(), window(requests=19))
    assert d.action == "rollback"
    assert "not enough traffic" in d.reason
    assert c.status == "rolled_back"


def test_abort():
    c = Canary(config(), now=0.0)
    c.evaluate(10.0, window(), window())
    c.abort(12.0, "operator said so")
    assert c.status == "aborted"
    assert c.weights() == {"1": 1.0, "2": 0.0}
    assert c.history[-1] | {} == {"time": 12.0, "step": 1, "percent": 0.0, "action": "abort",
                                  "reason": "operator said so", "gates": []}
    assert c.evaluate(13.0, window(), window()).action == "hold"
    with pytest.raises(PreconditionFailedError, match="aborted"):
        c.abort(14.0, "again")


def test_resume_from_state_mid_ramp():
    c = Canary(config(), now=100.0)
    c.evaluate(110.0, window(), window())
    c.evaluate(120.0, window(), window())
    c.evaluate(125.0, window(), window())
    state = json.loads(json.dumps(c.state()))
    r = Canary.from_state(CanaryConfig(variant="2", hold_s=10.0), state)  # baseline from the state
    assert (r.step, r.status, r.step_started_at, r.weights()) == (2, "running", 120.0, {"1": 0.75, "2": 0.25})
    assert r.history == c.history
    assert r.last_gates == c.last_gates
    assert r.state() == c.state()
    t = 130.0
    while not r.finished:
        base = window() if r.percent < 100 else VariantWindow()
        r.evaluate(t, base, window())
        t += 10
    assert r.status == "promoted"
    assert t == 160.0
    with pytest.raises(InvalidInputError, match="'2', not '3'"):
        Canary.from_state(CanaryConfig(variant="3", baseline="1"), state)
    with pytest.raises(InvalidInputError, match="malformed"):
        Canary.from_state(config(), {"variant": "2"})


@pytest.mark.parametrize(
    "kw, fragment",
    [
        ({"steps": (1, 5, 50)}, "canary.steps"),
        ({"steps": (5, 5, 100)}, "canary.steps"),
        ({"steps": (0, 100)}, "canary.steps"),
        ({"steps": ()}, "canary.steps"),
        ({"hold_s": 0.0}, "canary.hold_s 0.0 must be a finite number > 0"),
        ({"max_step_s": -1.0}, "canary.max_step_s"),
        ({"baseline": "2"}, "canary.baseline '2' must differ"),
        ({"variant": ""}, "canary.variant"),
    ],
)
def test_canary_config_errors_name_the_field(kw, fragment):
    with pytest.raises(ConfigError, match=fragment):
        CanaryConfig(**{"variant": "2", "baseline": "1", **kw})


@pytest.mark.parametrize(
    "kw, fragment",
    [
        ({"max_error_rate_increase": 1.5}, r"gates.max_error_rate_increase 1.5 must lie in \[0, 1\]"),
        ({"max_p99_ratio": 0.0}, "gates.max_p99_ratio"),
        ({"max_reward_drop": -0.1}, "gates.max_reward_drop"),
        ({"max_drift": math.nan}, "gates.max_drift"),
        ({"min_requests": 0}, "gates.min_requests"),
    ],
)
def test_gate_config_errors_name_the_field(kw, fragment):
    with pytest.raises(ConfigError, match=fragment):
        GateConfig(**kw)


def test_canary_needs_a_baseline():
    with pytest.raises(ConfigError, match="canary.baseline is empty"):
        Canary(CanaryConfig(variant="2"), now=0.0)


# -- the window -----------------------------------------------------------------------------------


def test_bucket_edges_span_10us_to_60s_log_spaced():
    assert BUCKET_EDGES[0] == pytest.approx(1e-5)
    assert 60 <= BUCKET_EDGES[-1] < 70
    ratios = np.diff(np.log10(BUCKET_EDGES))
    assert np.allclose(ratios, 1 / 20)


def test_quantiles_are_within_one_bucket_of_numpy():
    rng = np.random.default_rng(0)
    lat = rng.lognormal(mean=np.log(0.005), sigma=1.0, size=20_000)
    w = VariantWindow()
    for x in lat.tolist():
        w.observe(x, ok=True)
    width = 10 ** (1 / 20)
    for q in (0.1, 0.5, 0.9, 0.99, 0.999):
        true = np.percentile(lat, q * 100)
        assert true / width <= w.quantile(q) <= true * width, q
    assert w.p99() == w.quantile(0.99)
    assert w.quantile(1.0) == pytest.approx(lat.max())


def test_window_merge_and_wire_round_trip():
    rng = np.random.default_rng(1)
    lat = rng.lognormal(np.log(0.002), 1.0, size=1000).tolist()
    a, b, whole = VariantWindow(), VariantWindow(), VariantWindow()
    for i, x in enumerate(lat):
        (a if i % 2 else b).observe(x, ok=i % 10 != 0)
        whole.observe(x, ok=i % 10 != 0)
    a.add_reward(1.0)
    b.add_reward(0.0)
    a.observe_shadow(True, 0.01)
    b.observe_shadow(False, math.inf)
    wire = json.loads(json.dumps(a.to_wire()))
    merged = VariantWindow.from_wire(wire).merge(b)
    assert merged.buckets == whole.buckets
    assert merged.requests == 1000
    assert merged.error_rate == 0.1
    assert merged.p99() == whole.p99()
    assert merged.mean_reward == 0.5
    assert (merged.shadow_compared, merged.shadow_agreement, merged.shadow_abs_diff_sum) == (2, 0.5, 0.01)
    assert len(wire["buckets"]) < len(BUCKET_EDGES)  # sparse
    with pytest.raises(InvalidInputError, match="buckets"):
        VariantWindow.from_wire({**wire, "nb": 7})
    merged.reset()
    assert merged.requests == 0
    assert merged.p99() is None
    assert merged.mean_reward is None
    assert merged.error_rate == 0.0


def test_window_rejects_bad_latencies():
    w = VariantWindow()
    for bad in (-0.001, math.nan, math.inf):
        with pytest.raises(InvalidInputError, match="latency_s"):
            w.observe(bad, ok=True)
    w.observe(0.0, ok=True)
    w.observe(1e6, ok=False)  # past the last edge: the overflow bucket
    assert w.buckets[0] == 1
    assert w.buckets[-1] == 1
    assert w.quantile(1.0) == 1e6
