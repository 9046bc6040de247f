"""An ingress replica's view of one endpoint: choices, ids, feedback."""

from __future__ import annotations

import pytest

from flywheel.protocol.errors import ConfigError, InvalidInputError, UnavailableError
from flywheel.serving._private.live_endpoint import LiveEndpoint, render_endpoint_metrics, usable_request_id

STICKY = {"header": "flywheel-routing-key", "parameter": "routing_key"}


def test_request_ids_that_could_split_a_header_are_not_echoed():
    assert usable_request_id("req-42_a.b:c")
    for bad in ("x\r\nSet-Cookie: s=1", "has space", "é", "", None, "a" * 129):
        assert not usable_request_id(bad)


def test_a_snapshot_that_cannot_be_applied_leaves_routing_as_it_was():
    ep = LiveEndpoint("m")
    ep.configure({"routable": ["1", "2"], "weights": {"1": 1.0, "2": 1.0}, "sticky": STICKY}, {"1", "2"})
    with pytest.raises(ConfigError, match="policy.kind 'nope'"):
        ep.configure({"routable": ["1", "2"], "weights": None, "policy": {"kind": "nope"}, "sticky": STICKY},
                     {"1", "2"})
    assert ep.choose("alice") in ("1", "2")
    assert ep.needs_key


def test_no_ready_variant_is_unavailable_not_unknown():
    ep = LiveEndpoint("m")
    ep.configure({"routable": ["3"], "weights": {"3": 1.0}, "sticky": STICKY}, {"1"})  # 3 not loaded here
    with pytest.raises(UnavailableError, match="endpoint 'm' has no ready variant"):
        ep.choose(None)


def test_feedback_validates_before_it_uses_the_id_up():
    ep = LiveEndpoint("m")
    ep.configure({"routable": ["1", "2"], "weights": None, "policy": {"kind": "thompson"},
                  "policy_state": None, "sticky": STICKY}, {"1", "2"})
    ep.remember("r1", "2", ship=True)
    with pytest.raises(InvalidInputError, match=r"reward 3.0 for variant '2': .* expects rewards in \[0, 1\]"):
        ep.take_feedback("r1", 3.0)
    assert ep.take_feedback("r1", 1.0) == "2"
    assert ep.take_feedback("r1", 1.0) is None
    windows, rewards, ids, used = ep.take_report()
    assert rewards == {"2": [1, 1.0, 1.0]}
    assert ids == [("r1", "m", "2")]
    assert used == [("r1", "m")]


def _families(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(text)}


def test_endpoint_counters_follow_the_prometheus_naming_conventions():
    ep = LiveEndpoint("m")
    ep.totals = {"1": {"requests": 10, "errors": 1, "rewards": 4, "reward_sum": 3.0,
                       "shadow_compared": 2, "shadow_agreed": 1, "shadow_abs_diff_sum": 0.5}}
    text = render_endpoint_metrics([ep]).decode()
    counters = [line.split()[2] for line in text.splitlines()
                if line.startswith("# TYPE") and line.endswith(" counter")]
    assert counters
    assert [c for c in counters if not c.endswith("_total")] == []
    # the sums are counters too: summed rewards over a window, divided by rewards counted, is the mean reward
    assert 'flywheel_endpoint_reward_sum_total{endpoint="m",variant="1"} 3.0' in text
    assert 'flywheel_endpoint_shadow_abs_diff_sum_total{endpoint="m",variant="1"} 0.5' in text


def test_the_canary_share_is_a_ratio_and_no_lifetime_quantile_is_exported():
    ep = LiveEndpoint("m")
    ep.canary_step = 25.0  # the controller's snapshot speaks percent
    ep.totals = {"1": {"requests": 10, "p99_ms": 12.0}}
    families = _families(render_endpoint_metrics([ep]).decode())
    ratio = families["flywheel_endpoint_canary_traffic_ratio"]
    assert [s.value for s in ratio.samples] == [0.25]
    # per-variant latency comes from the windowable histogram flywheel_request_latency_seconds
    assert not [name for name in families if "p99" in name or "percent" in name]
