"""training/torch_backend.py: finding the interface that holds a node's
address (what gloo is bound to; the two-node run is in
tests/integration/test_cluster_training.py)."""

from __future__ import annotations

from flywheel.training.torch_backend import interface_of


def test_the_loopback_address_is_on_the_loopback_interface():
    assert interface_of("127.0.0.1") == "lo"


def test_an_address_no_interface_holds_has_none():
    assert interface_of("203.0.113.9") is None  # TEST-NET-3: never assigned here


def test_ipv6_and_garbage_have_none():
    assert interface_of("::1") is None
    assert interface_of("not-an-address") is None
