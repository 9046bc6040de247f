"""Authentication, roles, model scopes and per-key limits for the ingress.

One ``Authenticator`` per ingress, used by both transports (HTTP checks in
``HttpRoutes.handle``, gRPC in ``GrpcCalls.call``): that is the one place
per transport. Keys live in the registry database as salted hashes
(``flywheel.registry.keys``); the authenticator re-reads the active ones
every ``reload_interval_s``, so a revoked key stops working within about
that long on every ingress. If the database cannot be read, the last keys
read stay in force (serving goes on; one warning per outage says
revocations are not seen meanwhile), and the next refresh after it is back
(the store reconnects by itself) applies what changed, revocations included.

Per call, in this order: the key (valid, not expired), its role for the
route, its model scopes for the model the call addresses (``check_model``;
server-wide routes have none), then ``acquire``: the key's request rate (a
token bucket per key in this ingress, the key's own ``rate``/``burst`` or
``server.auth``'s defaults) and its cap on requests in flight.

Refused calls are counted per (key id, reason, route) and written to the
audit log by a separate task, one row per distinct kind with its count, so
that a flood of bad requests costs the database one small transaction per
interval and never delays the key refresh. All database work runs on one
thread of our own (the store's connections belong to it).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from flywheel.registry.db import OutageLog
from flywheel.registry.keys import KeyDigest, KeyStore, parse_token, verify
from flywheel.protocol.errors import PermissionDeniedError, RateLimitedError, UnauthenticatedError
from flywheel.serving.config import AuthConfig
from flywheel.serving._private.token_bucket import TokenBucket

log = logging.getLogger(__name__)

MAX_DENIAL_KINDS = 1000  # distinct (key, reason, route) per interval; beyond: counted as dropped
MAX_ROUTE_CHARS = 200


class Authenticator:
    def __init__(self, config: AuthConfig, keys_uri: str) -> None:
        self._config = config
        self._uri = keys_uri
        self._db_thread = ThreadPoolExecutor(1, thread_name_prefix="flywheel-keys")
        self._store: KeyStore | None = None
        self._keys: dict[str, KeyDigest] = {}
        self._in_flight: dict[str, int] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._denied: Counter[tuple[str | None, str, str]] = Counter()
        self.dropped_denials = 0
        self._tasks: list[asyncio.Task] = []
        self._outage = OutageLog(log, "re-reading API keys (revocations are not seen until it works again)")

    async def _db(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._db_thread, fn, *args)

    async def start(self) -> None:
        """Load the keys once (failing loudly), then keep them fresh."""
        self._store = await self._db(KeyStore.open, self._uri)
        self._keys = await self._db(self._store.active)
        if not self._keys:
            log.warning("auth is on and there are no API keys: every call will be refused "
                        "(create one with `flywheel keys create`)")
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._refresh_forever()), loop.create_task(self._audit_forever())]

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._config.reload_interval_s)
            try:
                self._keys = await self._db(self._store.active)
            except Exception as exc:  # unreadable DB: keep the last keys, say so
                self._outage.failed(exc)
                continue
            self._outage.ok()
            for gone in self._buckets.keys() - self._keys.keys():
                del self._buckets[gone]

    async def _audit_forever(self) -> None:
        while True:
            await asyncio.sleep(self._config.reload_interval_s)
            await self._flush()

    async def _flush(self) -> None:
        if not self._denied and not self.dropped_denials:
            return
        batch, self._denied = self._denied, Counter()
        rows = [{"key_id": k, "reason": r, "route": route, "count": n} for (k, r, route), n in batch.items()]
        if self.dropped_denials:
            rows.append({"key_id": None, "reason": "more kinds of refused calls than recorded",
                         "route": "", "count": self.dropped_denials})
            self.dropped_denials = 0
        try:
            await self._db(self._store.record_denied, rows)
        except Exception as exc:
            log.warning("cannot write %d refused-call audit entries: %s", len(rows), exc)

    async def aclose(self) -> None:
        """Stop the background tasks, write what is pending, close the store."""
        for t in self._tasks:
            t.cancel()
        if self._store is not None:
            await self._flush()
            await self._db(self._store.close)
        self._db_thread.shutdown(wait=False)

    def authenticate(self, credentials: str | None, need: str, route: str) -> str:
        """The caller's key id if it may call ``route`` with role ``need``;
        raises UnauthenticatedError (no key, a wrong, revoked or expired
        one) or PermissionDeniedError (role) otherwise."""
        token = _bearer(credentials)
        parsed = parse_token(token) if token else None
        if parsed is None:
            self._deny(None, "missing or malformed credentials", route)
            raise UnauthenticatedError(
                "this server needs an API key: send 'Authorization: Bearer <key>' (gRPC: 'authorization' metadata)"
            )
        key_id, secret = parsed
        digest = self._keys.get(key_id)
        if digest is None or not verify(digest, secret):
            self._deny(key_id, "unknown, revoked or wrong key", route)
            raise UnauthenticatedError(f"API key {key_id} is not valid (unknown, revoked, or a wrong secret)")
        if digest.expires_at is not None and time.time() >= digest.expires_at:
            self._deny(key_id, "expired", route)
            expired = dt.datetime.fromtimestamp(digest.expires_at, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
            raise UnauthenticatedError(f"API key {key_id} expired at {expired}; create a new one")
        if need not in digest.roles:
            self._deny(key_id, f"role {need} required", route)
            raise PermissionDeniedError(f"API key {key_id} lacks the {need!r} role needed for {route}")
        return key_id

    async def key_name(self, key_id: str) -> str:
        """The name the key was created with: who it identifies (an approval
        is recorded as ``key:<name>``). Read from the store, since the keys
        held for checking carry no names; UnauthenticatedError when the key
        is no longer active."""
        for key in await self._db(self._store.list):
            if key.id == key_id:
                return key.name
        raise UnauthenticatedError(f"API key {key_id} is no longer active")

    def is_scoped(self, key_id: str) -> bool:
        """Whether the key may call only some models (so that a transport
        reads the model name of a call only when it matters)."""
        digest = self._keys.get(key_id)
        return digest is not None and bool(digest.models)

    def check_model(self, key_id: str, model: str | None, route: str) -> None:
        """Raises PermissionDeniedError when ``model`` is outside the key's
        scopes; ``model`` None (a server-wide route) is governed by role alone."""
        digest = self._keys.get(key_id)
        if model is None or digest is None or digest.allows(model):
            return
        self._deny(key_id, f"model {model} out of scope", route)
        raise PermissionDeniedError(
            f"API key {key_id} may not call model {model!r} (its models: {', '.join(digest.models)})"
        )

    def acquire(self, key_id: str) -> None:
        """Take one request of the key's rate and one in-flight slot (give
        the slot back with ``release``); RateLimitedError when either is
        used up, with the delay after which the rate allows a retry."""
        limit = self._config.max_concurrent_per_key
        n = self._in_flight.get(key_id, 0)
        if limit and n >= limit:
            raise RateLimitedError(f"API key {key_id} has {n} requests in flight (limit {limit}); retry later")
        digest = self._keys.get(key_id)
        if digest is not None:
            self._take(key_id, digest)  # after the cap: a call it refuses costs no token
        self._in_flight[key_id] = n + 1

    def _take(self, key_id: str, digest: KeyDigest) -> None:
        rate, burst = (self._config.rate_per_key, self._config.burst_per_key) if digest.rate is None \
            else (digest.rate, digest.burst or 0)
        if not rate:
            return
        capacity = float(burst) if burst else max(1.0, rate)  # no burst: one second's worth
        now = time.monotonic()
        bucket = self._buckets.get(key_id)
        if bucket is None:
            bucket = self._buckets[key_id] = TokenBucket(rate, capacity, now)
        elif bucket.rate != rate or bucket.capacity != capacity:
            bucket.reshape(rate, capacity, now)
        wait = bucket.take(now)
        if wait:
            raise RateLimitedError(
                f"API key {key_id} is over its rate of {rate:g} requests/s (burst {capacity:g}); "
                f"retry in {wait:.3g} s", retry_after_s=wait,
            )

    def release(self, key_id: str) -> None:
        n = self._in_flight.get(key_id, 1) - 1
        if n:
            self._in_flight[key_id] = n
        else:
            self._in_flight.pop(key_id, None)

    def _deny(self, key_id: str | None, reason: str, route: str) -> None:
        kind = (key_id, reason, route[:MAX_ROUTE_CHARS])
        if kind in self._denied or len(self._denied) < MAX_DENIAL_KINDS:
            self._denied[kind] += 1
        else:
            self.dropped_denials += 1


def _bearer(value: str | None) -> str | None:
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None
