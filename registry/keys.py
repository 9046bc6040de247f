"""API keys for Flywheel's endpoints: created, listed, revoked; hashes only.

A key is shown once, at creation, as ``fwk_<id>_<secret>``: ``id`` names it
(in lists, audit entries, metrics) and ``secret`` (32 random bytes) proves
it. The store keeps ``sha256(salt || secret)`` with a per-key salt, never the
secret. A fast hash is enough here, unlike for passwords: the secret has 256
bits of entropy, so there is nothing to guess, and servers verify it on every
request. Key events (create, revoke) and refused calls go to the registry's
append-only audit log under the key's id.

A key may also carry limits, all optional: model scopes (names or globs such
as ``fraud-*``; none: every model), an expiry (epoch seconds), and its own
request rate and burst (None: the server's default; rate 0: no limit).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import math
import re
import secrets
import time

import msgspec

from flywheel.registry.db import Db, connect
from flywheel.registry.migrations import migrate
from flywheel.protocol.errors import InvalidInputError, NotFoundError

# Each role includes the ones after it.
ROLES = ("admin", "operate", "predict")
_IMPLIES = {"admin": frozenset(ROLES), "operate": frozenset(("operate", "predict")), "predict": frozenset(("predict",))}
_TOKEN = re.compile(r"^fwk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
_SCOPE = re.compile(r"^[A-Za-z0-9_.*?\[\]!-]{1,128}$")  # a model name, or a glob of one
_ENC = msgspec.json.Encoder()


class ApiKey(msgspec.Struct, frozen=True):
    id: str
    name: str
    roles: tuple[str, ...]
    created_at: float
    created_by: str
    revoked_at: float | None = None
    models: tuple[str, ...] = ()  # names or globs; empty: every model
    expires_at: float | None = None
    rate: float | None = None  # requests/s; None: the server's default, 0: no limit
    burst: int | None = None  # None: one second's worth of ``rate``


class KeyDigest(msgspec.Struct, frozen=True):
    """What a server needs to check a key: no secret in it."""

    salt: str
    hash: str
    roles: frozenset[str]
    models: tuple[str, ...] = ()
    expires_at: float | None = None
    rate: float | None = None
    burst: int | None = None

    def allows(self, model: str) -> bool:
        """Whether the key's scopes cover ``model`` (no scopes: every model)."""
        return not self.models or any(fnmatch.fnmatchcase(model, p) for p in self.models)


def expand_roles(roles) -> frozenset[str]:
    out: set[str] = set()
    for r in roles:
        out |= _IMPLIES[r]
    return frozenset(out)


def _digest(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


def parse_token(token: str) -> tuple[str, str] | None:
    """(key id, secret) of a well-formed token, else None."""
    m = _TOKEN.match(token)
    return (m.group(1), m.group(2)) if m else None


def verify(digest: KeyDigest, secret: str) -> bool:
    return hmac.compare_digest(_digest(digest.salt, secret), digest.hash)


class KeyStore:
    """API keys in the registry database (same URI as the registry)."""

    def __init__(self, db: Db) -> None:
        self._db = db
        migrate(db)

    @classmethod
    def open(cls, uri: str) -> KeyStore:
        return cls(connect(uri))

    def close(self) -> None:
        self._db.close()

    def _audit(self, actor: str, action: str, after: dict) -> None:
        self._db.execute(
            "INSERT INTO audit (ts, actor, action, model, version, before_json, after_json) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (time.time(), actor, action, "", None, "null", _ENC.encode(after).decode()),
        )

    def create(
        self, name: str, roles: list[str] | tuple[str, ...], *, actor: str, models: list[str] | tuple[str, ...] = (),
        expires_at: float | None = None, rate: float | None = None, burst: int | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key and its token; the token is not stored and cannot be shown again.

        ``models``: names or globs the key may address (empty: every model);
        ``expires_at``: epoch seconds, in the future; ``rate`` (requests/s,
        0 = no limit) and ``burst`` (tokens, needs ``rate``): None takes
        the server's ``server.auth`` defaults. Raises InvalidInputError
        naming the bad argument."""
        if not name or len(name) > 128:
            raise InvalidInputError("key name must be 1-128 characters")
        bad = [r for r in roles if r not in ROLES]
        if bad or not roles:
            raise InvalidInputError(f"roles {list(roles)}: choose one or more of {', '.join(ROLES)}")
        models = _check_limits(models, expires_at, rate, burst)
        key_id = secrets.token_hex(6)
        secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
        salt = secrets.token_hex(16)
        key = ApiKey(key_id, name, tuple(sorted(set(roles), key=ROLES.index)), time.time(), actor,
                     models=models, expires_at=expires_at, rate=rate, burst=burst)
        with self._db.tx():
            self._db.execute(
                "INSERT INTO api_keys (id, name, roles, salt, hash, created_at, created_by, revoked_at, "
                "scopes, expires_at, rate, burst) VALUES (?, ?, ?, ?, ?, ?, ?, NULL, ?, ?, ?, ?)",
                (key.id, name, ",".join(key.roles), salt, _digest(salt, secret), key.created_at, actor,
                 ",".join(models), expires_at, rate, burst),
            )
            limits = {k: v for k, v in (("models", list(models)), ("expires_at", expires_at), ("rate", rate),
                                        ("burst", burst)) if v not in (None, [])}
            self._audit(actor, "key.create", {"key_id": key.id, "name": name, "roles": list(key.roles), **limits})
        return key, f"fwk_{key_id}_{secret}"

    def list(self, *, include_revoked: bool = False) -> list[ApiKey]:
        sql = "SELECT id, name, roles, created_at, created_by, revoked_at, scopes, expires_at, rate, burst FROM api_keys"
        if not include_revoked:
            sql += " WHERE revoked_at IS NULL"
        rows = self._db.execute(sql + " ORDER BY created_at")
        return [ApiKey(i, n, tuple(r.split(",")), c, b, rv, _scopes(sc), e, rt, bu)
                for i, n, r, c, b, rv, sc, e, rt, bu in rows]

    def revoke(self, key_id: str, *, actor: str) -> None:
        with self._db.tx():
            rows = self._db.execute("SELECT revoked_at FROM api_keys WHERE id = ?", (key_id,))
            if not rows:
                raise NotFoundError(f"no API key {key_id!r}")
            if rows[0][0] is None:
                self._db.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?", (time.time(), key_id))
                self._audit(actor, "key.revoke", {"key_id": key_id})

    def active(self) -> dict[str, KeyDigest]:
        """Every unrevoked key's digest, by id (what servers poll)."""
        rows = self._db.execute(
            "SELECT id, salt, hash, roles, scopes, expires_at, rate, burst FROM api_keys WHERE revoked_at IS NULL"
        )
        return {i: KeyDigest(s, h, expand_roles(r.split(",")), _scopes(sc), e, rt, bu)
                for i, s, h, r, sc, e, rt, bu in rows}

    def record_denied(self, events: list[dict]) -> None:
        """Audit refused calls (``key_id`` or "anonymous", ``reason``, ``route``)."""
        with self._db.tx():
            for e in events:
                self._audit(e.get("key_id") or "anonymous", "auth.denied", e)


def _scopes(stored: str) -> tuple[str, ...]:
    return tuple(stored.split(",")) if stored else ()


def _check_limits(models, expires_at, rate, burst) -> tuple[str, ...]:
    """The scopes, deduplicated in order; InvalidInputError for a bad limit."""
    for m in models:
        if not _SCOPE.match(m):
            raise InvalidInputError(
                f"model scope {m!r}: give a model name or a glob of letters, digits and _.- with * ? [ ] "
                "(e.g. fraud-*), 1-128 characters"
            )
    if expires_at is not None and not (math.isfinite(expires_at) and expires_at > time.time()):
        raise InvalidInputError(f"expiry {expires_at!r} must be a time in the future (epoch seconds)")
    if rate is not None and not (math.isfinite(rate) and rate >= 0):
        raise InvalidInputError(f"rate {rate!r} must be a number of requests per second >= 0 (0 = no limit)")
    if burst is not None:
        if rate is None or rate == 0:
            raise InvalidInputError("burst needs a rate above 0: it is the size of that rate's token bucket")
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise InvalidInputError(f"burst {burst!r} must be a whole number of requests >= 1")
    return tuple(dict.fromkeys(models))
