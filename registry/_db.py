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
from urllib.parse import urlparse

from flywheel.runtime.errors import ConfigError


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
    """One connection per thread; WAL mode so readers never block the writer."""

    dialect = "sqlite"

    def __init__(self, path: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._local = threading.local()
        self._conn()  # fail fast on a bad path

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self._path, timeout=60, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA busy_timeout=60000")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return self._conn().execute(render(sql, "sqlite"), tuple(params)).fetchall()

    @contextlib.contextmanager
    def tx(self) -> Iterator[None]:
        conn = self._conn()
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
        path = uri[len("sqlite://"):]
        if not path.startswith("/"):
            raise ConfigError(f"registry uri {uri!r}: use sqlite:///absolute/path.db")
        return SqliteDb(path)
    if parsed.scheme in ("", "file"):
        return SqliteDb(os.path.abspath(parsed.path if parsed.scheme else uri))
    raise ConfigError(f"registry uri {uri!r}: expected sqlite:///..., a file path or postgresql://...")
