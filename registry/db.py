"""A thin, dialect-aware DB layer over sqlite3 and psycopg (PostgreSQL).

SQL is written once with ``?`` placeholders and ``{serial}``/``{real}``
tokens; this module adapts it. Every mutation runs inside :meth:`Db.tx`, a
write transaction that serialises writers (SQLite: BEGIN IMMEDIATE; PostgreSQL:
row locks taken by the statements themselves).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from flywheel.protocol.errors import ConfigError, UnavailableError


class Db:
    dialect: str

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        raise NotImplementedError

    def tx(self) -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


_TOKENS = {
    "sqlite": {"serial": "INTEGER PRIMARY KEY AUTOINCREMENT", "real": "REAL"},
    "postgresql": {"serial": "BIGSERIAL PRIMARY KEY", "real": "DOUBLE PRECISION"},
}


def render(sql: str, dialect: str) -> str:
    sql = sql.replace("{serial}", _TOKENS[dialect]["serial"]).replace("{real}", _TOKENS[dialect]["real"])
    return sql.replace("?", "%s") if dialect == "postgresql" else sql


class SqliteDb(Db):
    """One connection per thread; WAL mode so readers never block the writer.

    A writer waits up to ``timeout_s`` for another writer's lock; then, and
    on a read-only file, it fails with an UnavailableError that says which
    (not sqlite3's bare "database is locked")."""

    dialect = "sqlite"

    def __init__(self, path: str, timeout_s: float = 60.0) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._timeout_s = timeout_s
        self._local = threading.local()
        self._conn()  # fail fast on a bad path

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self._path, timeout=self._timeout_s, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA busy_timeout={int(self._timeout_s * 1000)}")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def _explained(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as exc:
            text = str(exc)
            if "locked" in text or "busy" in text:
                raise UnavailableError(
                    f"registry database {self._path} is locked by another writer "
                    f"(waited {self._timeout_s:g}s); try again"
                ) from None
            if "readonly" in text or "read-only" in text:
                raise UnavailableError(f"registry database {self._path} is read-only: {text}") from None
            raise

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._explained():
            return self._conn().execute(render(sql, "sqlite"), tuple(params)).fetchall()

    @contextlib.contextmanager
    def tx(self) -> Iterator[None]:
        conn = self._conn()
        with self._explained():
            conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


class PostgresDb(Db):
    dialect = "postgresql"

    def __init__(self, dsn: str) -> None:
        try:
            import psycopg
        except ImportError as exc:  # pragma: no cover - psycopg is a core dependency
            raise ConfigError("PostgreSQL registries need psycopg: pip install 'psycopg[binary]'") from exc
        self._conn = psycopg.connect(dsn, autocommit=True)
        self._lock = threading.RLock()
        self._in_tx = False

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            cur = self._conn.execute(render(sql, "postgresql"), tuple(params))
            return cur.fetchall() if cur.description else []

    @contextlib.contextmanager
    def tx(self) -> Iterator[None]:
        with self._lock, self._conn.transaction():
            yield

    def close(self) -> None:
        self._conn.close()


def connect(uri: str) -> Db:
    """``sqlite:///abs/path.db``, a plain file path, or ``postgresql://...``."""
    parsed = urlparse(uri)
    if parsed.scheme in ("postgresql", "postgres"):
        return PostgresDb(uri)
    if parsed.scheme == "sqlite":
        path = parsed.path if parsed.netloc == "" else uri[len("sqlite://"):]
        if not path.startswith("/"):
            raise ConfigError(f"registry uri {uri!r}: use sqlite:///absolute/path.db")
        options = parse_qs(parsed.query)
        try:
            timeout = float(options.get("timeout", ["60"])[0])
        except ValueError:
            timeout = -1.0
        if not 0 < timeout <= 3600:  # also false for nan
            raise ConfigError(f"registry uri {uri!r}: timeout must be seconds in (0, 3600]") from None
        return SqliteDb(path, timeout_s=timeout)
    if parsed.scheme in ("", "file"):
        return SqliteDb(os.path.abspath(parsed.path if parsed.scheme else uri))
    raise ConfigError(f"registry uri {uri!r}: expected sqlite:///..., a file path or postgresql://...")
