"""Authentication, roles and per-key concurrency for the ingress.

One ``Authenticator`` per ingress, used by both transports (HTTP checks in
``HttpRoutes.handle``, gRPC in ``GrpcCalls.call``): that is the one place
per transport. Keys live in the registry database as salted hashes
(``flywheel.registry.keys``); the authenticator re-reads the active ones
every ``reload_interval_s``, so a revoked key stops working within about
that long on every ingress. If the database cannot be read, the last keys
read stay in force (serving goes on; a warning says revocations are not
seen meanwhile).

Refused calls are counted per (key id, reason, route) and written to the
audit log by a separate task, one row per distinct kind with its count, so
that a flood of bad requests costs the database one small transaction per
interval and never delays the key refresh. All database work runs on one
thread of our own (the store's connections belong to it).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from flywheel.registry.keys import KeyDigest, KeyStore, parse_token, verify
from flywheel.protocol.errors import PermissionDeniedError, RateLimitedError, UnauthenticatedError
from flywheel.serving.config import AuthConfig

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
        self._denied: Counter[tuple[str | None, str, str]] = Counter()
        self.dropped_denials = 0
        self._tasks: list[asyncio.Task] = []

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
                log.warning("cannot re-read API keys (revocations are not seen until it works again): %s", exc)

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
        raises UnauthenticatedError / PermissionDeniedError otherwise."""
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
        if need not in digest.roles:
            self._deny(key_id, f"role {need} required", route)
            raise PermissionDeniedError(f"API key {key_id} lacks the {need!r} role needed for {route}")
        return key_id

    def acquire(self, key_id: str) -> None:
        limit = self._config.max_concurrent_per_key
        n = self._in_flight.get(key_id, 0)
        if limit and n >= limit:
            raise RateLimitedError(f"API key {key_id} has {n} requests in flight (limit {limit}); retry later")
        self._in_flight[key_id] = n + 1

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
