"""Authentication, roles and per-key concurrency for the ingress.

One ``Authenticator`` per ingress, used by both transports (HTTP checks in
``HttpRoutes.handle``, gRPC in ``AuthInterceptor``): that is the one place
per transport. Keys live in the registry database as salted hashes
(``flywheel.registry.keys``); the authenticator re-reads the active ones
every ``reload_interval_s`` off the loop, so a revoked key stops working
within about that long on every ingress. Refused calls are queued and
written to the audit log by the same background task (key id, reason,
route; never the secret).
"""

from __future__ import annotations

import asyncio
import logging

from flywheel.registry.keys import KeyDigest, KeyStore, parse_token, verify
from flywheel.runtime.errors import PermissionDeniedError, RateLimitedError, UnauthenticatedError
from flywheel.serving.config import AuthConfig

log = logging.getLogger(__name__)

MAX_PENDING_AUDIT = 10_000


class Authenticator:
    def __init__(self, config: AuthConfig, keys_uri: str) -> None:
        self._config = config
        self._uri = keys_uri
        self._store: KeyStore | None = None
        self._keys: dict[str, KeyDigest] = {}
        self._in_flight: dict[str, int] = {}
        self._denied: list[dict] = []
        self.dropped_audit = 0
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Load the keys once (failing loudly), then keep them fresh."""
        loop = asyncio.get_running_loop()
        self._store = await loop.run_in_executor(None, KeyStore.open, self._uri)
        self._keys = await loop.run_in_executor(None, self._store.active)
        if not self._keys:
            log.warning("auth is on and there are no API keys: every call will be refused "
                        "(create one with `flywheel keys create`)")
        self._task = loop.create_task(self._refresh_forever())

    async def _refresh_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._config.reload_interval_s)
            try:
                self._keys = await loop.run_in_executor(None, self._store.active)
                if self._denied:
                    batch, self._denied = self._denied, []
                    await loop.run_in_executor(None, self._store.record_denied, batch)
            except Exception as exc:  # a locked or unreachable DB: keep the last keys, say so
                log.warning("cannot refresh API keys from the registry: %s", exc)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._store is not None:
            self._store.close()

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
        if len(self._denied) >= MAX_PENDING_AUDIT:
            self.dropped_audit += 1
            return
        self._denied.append({"key_id": key_id, "reason": reason, "route": route})


def _bearer(value: str | None) -> str | None:
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


