"""Durable router state: one JSON document per (deployment, endpoint).

The serving router keeps its endpoints' policies, bandit arm statistics and
canary progress here, in the registry's database (SQLite by default,
PostgreSQL on a cluster), so that losing the process that routes loses
nothing that was accepted. This module knows nothing of the documents'
shape; serving/controller.py owns it.
"""

from __future__ import annotations

import time

import msgspec

from flywheel.registry.db import Db, connect
from flywheel.registry.migrations import migrate

_ENC = msgspec.json.Encoder()


class RouterStateStore:
    """Thread-safe as far as its Db is (one connection per thread)."""

    def __init__(self, db: Db) -> None:
        self._db = db
        migrate(db)

    @classmethod
    def open(cls, uri: str) -> RouterStateStore:
        return cls(connect(uri))

    def close(self) -> None:
        self._db.close()

    def load(self, deployment: str) -> dict[str, dict]:
        """Every endpoint's last saved document for ``deployment``."""
        rows = self._db.execute(
            "SELECT endpoint, state FROM router_state WHERE deployment = ?", (deployment,)
        )
        return {endpoint: msgspec.json.decode(state) for endpoint, state in rows}

    def save(self, deployment: str, endpoint: str, state: dict) -> None:
        """Replace one endpoint's document (atomically)."""
        doc = _ENC.encode(state).decode()
        with self._db.tx():
            self._db.execute(
                "DELETE FROM router_state WHERE deployment = ? AND endpoint = ?", (deployment, endpoint)
            )
            self._db.execute(
                "INSERT INTO router_state (deployment, endpoint, state, updated_at) VALUES (?, ?, ?, ?)",
                (deployment, endpoint, doc, time.time()),
            )

    def delete(self, deployment: str, endpoint: str | None = None) -> None:
        """Forget one endpoint, or (None) every endpoint of ``deployment``."""
        with self._db.tx():
            if endpoint is None:
                self._db.execute("DELETE FROM router_state WHERE deployment = ?", (deployment,))
            else:
                self._db.execute(
                    "DELETE FROM router_state WHERE deployment = ? AND endpoint = ?", (deployment, endpoint)
                )
