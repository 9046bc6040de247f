"""The Authenticator's per-key limits (scopes, expiry, request rate) over a
real SQLite key store, without servers: what each transport then maps."""

from __future__ import annotations

import asyncio
import time

import pytest

from flywheel.registry import Registry
from flywheel.registry.keys import KeyStore
from flywheel.protocol.errors import PermissionDeniedError, RateLimitedError, UnauthenticatedError
from flywheel.serving.auth import Authenticator
from flywheel.serving.config import AuthConfig

ROUTE = "POST /v2/models/fraud/infer"


@pytest.fixture
def uri(tmp_path):
    return f"sqlite:///{tmp_path}/registry.db"


def _with_auth(uri: str, config: AuthConfig, body) -> None:
    """Run ``body(auth)`` with a started Authenticator on its own loop."""

    async def run():
        auth = Authenticator(config, uri)
        await auth.start()
        try:
            body(auth)
        finally:
            await auth.aclose()

    asyncio.run(run())


def _bearer(token: str) -> str:
    return f"Bearer {token}"


def _admitted(auth: Authenticator, token: str, n: int) -> int:
    """How many of ``n`` back-to-back calls the key's rate lets through."""
    key_id = auth.authenticate(_bearer(token), "predict", ROUTE)
    ok = 0
    for _ in range(n):
        try:
            auth.acquire(key_id)
        except RateLimitedError:
            continue
        auth.release(key_id)
        ok += 1
    return ok


def test_scopes_take_names_and_globs_and_no_scope_means_every_model(uri):
    store = KeyStore.open(uri)
    listed = store.create("listed", ["predict"], actor="t", models=["fraud", "digits"])[1]
    glob = store.create("glob", ["predict"], actor="t", models=["fraud-*"])[1]
    free = store.create("free", ["predict"], actor="t")[1]
    store.close()

    def body(auth):
        ids = {name: auth.authenticate(_bearer(t), "predict", ROUTE) for name, t in
               (("listed", listed), ("glob", glob), ("free", free))}
        assert not auth.is_scoped(ids["free"])
        for model in ("fraud", "digits"):
            auth.check_model(ids["listed"], model, ROUTE)
        auth.check_model(ids["glob"], "fraud-eu", ROUTE)
        auth.check_model(ids["free"], "anything", ROUTE)
        auth.check_model(ids["listed"], None, "GET /metrics")  # server-wide: role alone
        with pytest.raises(PermissionDeniedError, match=rf"API key {ids['listed']} may not call model 'mnist'"):
            auth.check_model(ids["listed"], "mnist", ROUTE)
        with pytest.raises(PermissionDeniedError, match=rf"API key {ids['glob']} may not call model 'fraud'"):
            auth.check_model(ids["glob"], "fraud", ROUTE)  # 'fraud-*' needs the dash

    _with_auth(uri, AuthConfig(enabled=True), body)


def test_an_out_of_scope_call_is_audited_under_the_key(uri):
    store = KeyStore.open(uri)
    key, token = store.create("scoped", ["predict"], actor="t", models=["digits"])
    store.close()

    def body(auth):
        with pytest.raises(PermissionDeniedError):
            auth.check_model(auth.authenticate(_bearer(token), "predict", ROUTE), "fraud", ROUTE)

    _with_auth(uri, AuthConfig(enabled=True), body)  # aclose writes what is pending
    reg = Registry.open(uri, uri.removeprefix("sqlite:///") + ".artifacts")
    try:
        denied = [e for e in reg.audit() if e.action == "auth.denied"]
    finally:
        reg.close()
    assert [(e.actor, e.after["reason"], e.after["route"]) for e in denied] == [
        (key.id, "model fraud out of scope", ROUTE)
    ]


def test_an_expired_key_is_refused_as_expired(uri):
    store = KeyStore.open(uri)
    key, token = store.create("brief", ["predict"], actor="t", expires_at=time.time() + 0.5)
    store.close()

    def body(auth):
        deadline = time.monotonic() + 10
        while True:  # valid until it expires; then refused, by name
            try:
                auth.authenticate(_bearer(token), "predict", ROUTE)
            except UnauthenticatedError as exc:
                assert f"API key {key.id} expired at " in exc.message
                return
            assert time.monotonic() < deadline, "the key never expired"
            time.sleep(0.05)

    _with_auth(uri, AuthConfig(enabled=True), body)


def test_the_server_default_rate_applies_to_keys_without_their_own(uri):
    store = KeyStore.open(uri)
    default = store.create("default", ["predict"], actor="t")[1]
    own = store.create("own", ["predict"], actor="t", rate=0.001, burst=5)[1]
    unlimited = store.create("unlimited", ["predict"], actor="t", rate=0)[1]
    store.close()

    def body(auth):
        # rates far below one token per test run: the buckets hold just their burst
        assert _admitted(auth, default, 10) == 3
        assert _admitted(auth, own, 10) == 5
        assert _admitted(auth, unlimited, 50) == 50

    _with_auth(uri, AuthConfig(enabled=True, rate_per_key=0.001, burst_per_key=3), body)


def test_without_a_burst_a_key_gets_one_seconds_worth_and_at_least_one(uri):
    store = KeyStore.open(uri)
    tokens = [store.create(f"k{i}", ["predict"], actor="t", rate=r)[1] for i, r in enumerate((4.0, 0.001))]
    store.close()

    def body(auth):
        assert _admitted(auth, tokens[0], 4) == 4  # a full bucket: one second's worth
        key_id = auth.authenticate(_bearer(tokens[0]), "predict", ROUTE)
        with pytest.raises(RateLimitedError, match=r"rate of 4 requests/s \(burst 4\)"):
            for _ in range(10_000):  # faster than 4/s, so the bucket runs dry
                auth.acquire(key_id)
                auth.release(key_id)
        assert _admitted(auth, tokens[1], 3) == 1

    _with_auth(uri, AuthConfig(enabled=True), body)


def test_an_empty_bucket_says_when_to_retry(uri):
    store = KeyStore.open(uri)
    key, token = store.create("slow", ["predict"], actor="t", rate=0.01, burst=1)
    store.close()

    def body(auth):
        key_id = auth.authenticate(_bearer(token), "predict", ROUTE)
        auth.acquire(key_id)
        auth.release(key_id)
        with pytest.raises(RateLimitedError, match=rf"API key {key.id} is over its rate of 0.01 requests/s") as err:
            auth.acquire(key_id)
        # one token at 0.01/s: about 100 s away, never less than a second
        assert 90 <= err.value.retry_after_s <= 100
        assert 90 <= err.value.retry_after_whole_s() <= 100

    _with_auth(uri, AuthConfig(enabled=True), body)


def test_a_call_refused_for_the_in_flight_cap_takes_no_token(uri):
    store = KeyStore.open(uri)
    token = store.create("capped", ["predict"], actor="t", rate=0.001, burst=2)[1]
    store.close()

    def body(auth):
        key_id = auth.authenticate(_bearer(token), "predict", ROUTE)
        auth.acquire(key_id)  # token 1, in flight
        with pytest.raises(RateLimitedError, match="requests in flight") as err:
            auth.acquire(key_id)
        assert err.value.retry_after_s is None
        auth.release(key_id)
        auth.acquire(key_id)  # token 2 is still there

    _with_auth(uri, AuthConfig(enabled=True, max_concurrent_per_key=1), body)
