"""Per-key limits in the key store (a real SQLite file): scopes, expiry,
rate and burst are stored, listed, audited, and refused when malformed."""

import math
import time

import pytest

from flywheel.registry import Registry
from flywheel.registry.keys import KeyStore
from flywheel.protocol.errors import InvalidInputError


@pytest.fixture
def store(tmp_path):
    s = KeyStore.open(f"sqlite:///{tmp_path}/registry.db")
    yield s
    s.close()


def test_limits_round_trip_through_list_and_active(store):
    expires = time.time() + 3600
    key, _ = store.create("app", ["predict"], actor="ops", models=["fraud", "digits", "fraud"],
                          expires_at=expires, rate=50, burst=100)
    assert key.models == ("fraud", "digits")  # duplicates dropped, order kept
    [listed] = store.list()
    assert (listed.models, listed.rate, listed.burst) == (("fraud", "digits"), 50.0, 100)
    assert listed.expires_at == pytest.approx(expires)
    digest = store.active()[key.id]
    assert digest.allows("digits")
    assert not digest.allows("mnist")


def test_globs_match_whole_names(store):
    key, _ = store.create("g", ["predict"], actor="ops", models=["fraud-*", "mnist-v[12]"])
    digest = store.active()[key.id]
    assert [m for m in ("fraud-eu", "fraud", "xfraud-eu", "mnist-v1", "mnist-v3") if digest.allows(m)] == \
        ["fraud-eu", "mnist-v1"]


def test_a_key_without_limits_stores_none(store):
    key, _ = store.create("plain", ["predict"], actor="ops")
    digest = store.active()[key.id]
    assert (digest.models, digest.expires_at, digest.rate, digest.burst) == ((), None, None, None)
    assert digest.allows("anything")


def test_the_limits_are_in_the_create_audit_entry(store, tmp_path):
    key, _ = store.create("app", ["predict"], actor="ops", models=["fraud"], rate=2.0, burst=3)
    reg = Registry.open(f"sqlite:///{tmp_path}/registry.db", str(tmp_path / "artifacts"))
    [entry] = [e for e in reg.audit() if e.action == "key.create"]
    reg.close()
    assert entry.after == {"key_id": key.id, "name": "app", "roles": ["predict"], "models": ["fraud"],
                           "rate": 2.0, "burst": 3}


@pytest.mark.parametrize("kwargs, message", [
    ({"models": ["fraud digits"]}, "model scope 'fraud digits': give a model name or a glob"),
    ({"models": [""]}, "model scope ''"),
    ({"models": ["a/b"]}, "model scope 'a/b'"),
    ({"expires_at": 1.0}, "must be a time in the future"),
    ({"expires_at": math.nan}, "must be a time in the future"),
    ({"rate": -1.0}, "rate -1.0 must be a number of requests per second >= 0"),
    ({"rate": math.inf}, "rate inf must be"),
    ({"burst": 5}, "burst needs a rate above 0"),
    ({"rate": 0.0, "burst": 5}, "burst needs a rate above 0"),
    ({"rate": 1.0, "burst": 0}, "burst 0 must be a whole number of requests >= 1"),
    ({"rate": 1.0, "burst": 2.5}, "burst 2.5 must be a whole number"),
])
def test_bad_limits_are_refused_by_name_and_nothing_is_stored(store, kwargs, message):
    with pytest.raises(InvalidInputError, match=message.replace("[", r"\[").replace("(", r"\(")):
        store.create("bad", ["predict"], actor="ops", **kwargs)
    assert store.list() == []
