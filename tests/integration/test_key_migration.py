"""Keys made before schema v7 (scopes, expiry, rate) keep working once the
registry is upgraded, on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import hashlib
import time

import pytest

from flywheel.registry.db import connect
from flywheel.registry.keys import KeyStore, parse_token, verify
from flywheel.registry.migrations import current_version, migrate

pytestmark = pytest.mark.integration


def test_a_v6_key_keeps_working_unscoped_unexpiring_at_the_default_rate(store_uri):
    db = connect(store_uri)
    assert migrate(db, target=6) == 6
    # a key as v6 code wrote it: columns up to revoked_at only
    salt, secret = "00" * 16, "s" * 43
    digest = hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()
    db.execute("INSERT INTO api_keys (id, name, roles, salt, hash, created_at, created_by, revoked_at) "
               "VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
               ("0123456789ab", "legacy", "operate", salt, digest, time.time(), "v6-user"))
    db.close()

    store = KeyStore.open(store_uri)  # upgrades
    try:
        assert current_version(connect(store_uri)) >= 7
        digest = store.active()["0123456789ab"]
        assert verify(digest, secret)
        assert digest.roles == {"operate", "predict"}
        assert (digest.models, digest.expires_at, digest.rate, digest.burst) == ((), None, None, None)
        assert digest.allows("any-model")
        [key] = store.list()
        assert (key.name, key.models, key.expires_at, key.rate) == ("legacy", (), None, None)
        # and new keys with every limit round-trip on the same database
        new, token = store.create("scoped", ["predict"], actor="t", models=["fraud-*", "digits"],
                                  expires_at=time.time() + 3600, rate=2.5, burst=7)
        stored = store.active()[new.id]
        assert verify(stored, parse_token(token)[1])
        assert (stored.models, stored.rate, stored.burst) == (("fraud-*", "digits"), 2.5, 7)
        assert stored.expires_at == pytest.approx(new.expires_at)
    finally:
        store.close()
