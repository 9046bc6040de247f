"""API keys in a real SQLite registry file: hashes only, roles, revocation, audit."""

import pytest

from flywheel.registry import Registry
from flywheel.registry.keys import KeyStore, expand_roles, parse_token, verify
from flywheel.protocol.errors import InvalidInputError, NotFoundError


@pytest.fixture
def store(tmp_path):
    s = KeyStore.open(f"sqlite:///{tmp_path}/registry.db")
    yield s
    s.close()


def test_token_is_shown_once_and_only_its_salted_hash_is_stored(store, tmp_path):
    key, token = store.create("checkout-app", ["predict"], actor="ops")
    key_id, secret = parse_token(token)
    assert key_id == key.id
    assert len(secret) == 43
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("registry.db*"))
    assert secret.encode() not in raw
    assert token.encode() not in raw
    digest = store.active()[key.id]
    assert verify(digest, secret)
    assert not verify(digest, secret[:-1] + ("A" if secret[-1] != "A" else "B"))
    # two keys never share a salt, so equal secrets would not share a hash
    other, _ = store.create("other", ["predict"], actor="ops")
    assert store.active()[other.id].salt != digest.salt


def test_roles_include_the_weaker_ones():
    assert expand_roles(["admin"]) == {"admin", "operate", "predict"}
    assert expand_roles(["operate"]) == {"operate", "predict"}
    assert expand_roles(["predict"]) == {"predict"}


def test_revoked_keys_drop_out_of_the_active_set_and_the_list(store):
    a, _ = store.create("a", ["predict"], actor="ops")
    b, _ = store.create("b", ["operate"], actor="ops")
    store.revoke(a.id, actor="security")
    assert set(store.active()) == {b.id}
    assert [k.id for k in store.list()] == [b.id]
    revoked = {k.id: k for k in store.list(include_revoked=True)}[a.id]
    assert revoked.revoked_at is not None
    with pytest.raises(NotFoundError, match="no API key '000000000000'"):
        store.revoke("000000000000", actor="ops")


@pytest.mark.parametrize("roles", [[], ["root"], ["predict", "superuser"]])
def test_bad_roles_are_refused_by_name(store, roles):
    with pytest.raises(InvalidInputError, match="choose one or more of admin, operate, predict"):
        store.create("x", roles, actor="ops")


def test_malformed_tokens_do_not_parse():
    for bad in ("", "Bearer x", "fwk_123_abc", "fwk_zzzzzzzzzzzz_" + "a" * 43, "fwk_0123456789ab_" + "a" * 42):
        assert parse_token(bad) is None


def test_key_events_and_refusals_land_in_the_audit_log_without_secrets(store, tmp_path):
    key, token = store.create("a", ["predict"], actor="ops")
    store.revoke(key.id, actor="security")
    store.record_denied([{"key_id": key.id, "reason": "unknown, revoked or wrong key", "route": "POST /v2/models/m/infer"},
                         {"key_id": None, "reason": "missing or malformed credentials", "route": "GET /metrics"}])
    reg = Registry.open(f"sqlite:///{tmp_path}/registry.db", str(tmp_path / "artifacts"))
    entries = reg.audit()
    reg.close()
    assert [e.action for e in entries] == ["key.create", "key.revoke", "auth.denied", "auth.denied"]
    assert entries[1].actor == "security"
    assert entries[1].after == {"key_id": key.id}
    assert entries[2].actor == key.id
    assert entries[3].actor == "anonymous"
    assert all(token not in repr(e) for e in entries)


def test_a_read_only_database_fails_writes_with_a_clear_error(tmp_path):
    from flywheel.registry.db import SqliteDb
    from flywheel.protocol.errors import UnavailableError

    db = SqliteDb(str(tmp_path / "r.db"))
    db.execute("CREATE TABLE t (x INTEGER)")
    db._conn().execute("PRAGMA query_only=ON")  # what a read-only file or mount looks like to SQLite
    with pytest.raises(UnavailableError, match=r"r.db is read-only"):
        db.execute("INSERT INTO t VALUES (1)")
    assert db.execute("SELECT count(*) FROM t") == [(0,)]
