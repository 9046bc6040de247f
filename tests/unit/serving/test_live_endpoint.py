"""An ingress replica's view of one endpoint: choices, ids, feedback."""

from __future__ import annotations

import pytest

from flywheel.protocol.errors import ConfigError, InvalidInputError, UnavailableError
from flywheel.serving._private.live_endpoint import LiveEndpoint, usable_request_id

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
