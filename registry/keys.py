"""API keys for Flywheel's endpoints: created, listed, revoked; hashes only.

A key is shown once, at creation, as ``fwk_<id>_<secret>``: ``id`` names it
(in lists, audit entries, metrics) and ``secret`` (32 random bytes) proves
it. The store keeps ``sha256(salt || secret)`` with a per-key salt, never the
secret. A fast hash is enough here, unlike for passwords: the secret has 256
bits of entropy, so there is nothing to guess, and servers verify it on every
request. Key events (create, revoke) and refused calls go to the registry's
append-only audit log under the key's id.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
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
_ENC = msgspec.json.Encoder()


class ApiKey(msgspec.Struct, frozen=True):
    id: str
    name: str
    roles: tuple[str, ...]
    created_at: float
    created_by: str
    revoked_at: float | None = None


class KeyDigest(msgspec.Struct, frozen=True):
    """What a server needs to check a key: no secret in it."""

    salt: str
    hash: str
    roles: frozenset[str]


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

    def create(self, name: str, roles: list[str] | tuple[str, ...], *, actor: str) -> tuple[ApiKey, str]:
        """A new key and its token; the token is not stored and cannot be shown again."""
        if not name or len(name) > 128:
            raise InvalidInputError("key name must be 1-128 characters")
        bad = [r for r in roles if r not in ROLES]
        if bad or not roles:
            raise InvalidInputError(f"roles {list(roles)}: choose one or more of {', '.join(ROLES)}")
        key_id = secrets.token_hex(6)
        secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
        salt = secrets.token_hex(16)
        key = ApiKey(key_id, name, tuple(sorted(set(roles), key=ROLES.index)), time.time(), actor)
        with self._db.tx():
            self._db.execute(
                "INSERT INTO api_keys (id, name, roles, salt, hash, created_at, created_by, revoked_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
                (key.id, name, ",".join(key.roles), salt, _digest(salt, secret), key.created_at, actor),
            )
            self._audit(actor, "key.create", {"key_id": key.id, "name": name, "roles": list(key.roles)})
        return key, f"fwk_{key_id}_{secret}"

    def list(self, *, include_revoked: bool = False) -> list[ApiKey]:
        sql = "SELECT id, name, roles, created_at, created_by, revoked_at FROM api_keys"
        if not include_revoked:
            sql += " WHERE revoked_at IS NULL"
        rows = self._db.execute(sql + " ORDER BY created_at")
        return [ApiKey(i, n, tuple(r.split(",")), c, b, rv) for i, n, r, c, b, rv in rows]

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
        rows = self._db.execute("SELECT id, salt, hash, roles FROM api_keys WHERE revoked_at IS NULL")
        return {i: KeyDigest(s, h, expand_roles(r.split(","))) for i, s, h, r in rows}

    def record_denied(self, events: list[dict]) -> None:
        """Audit refused calls (``key_id`` or "anonymous", ``reason``, ``route``)."""
        with self._db.tx():
            for e in events:
                self._audit(e.get("key_id") or "anonymous", "auth.denied", e)
