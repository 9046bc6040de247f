"""A thin, dialect-aware DB layer over sqlite3 and psycopg (PostgreSQL).

SQL is written once with ``?`` placeholders and ``{serial}``/``{real}``
tokens; this module adapts it. Every mutation runs inside :meth:`Db.tx`, a
write transaction that serialises writers (SQLite: BEGIN IMMEDIATE; PostgreSQL:
row locks taken by the statements themselves).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from flywheel.protocol.errors import ConfigError, UnavailableError


class DatabaseUnreachable(UnavailableError):
    """The registry's database cannot be reached now (PostgreSQL down, the
    network gone): worth retrying once it is back, unlike a refusal."""


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


CONNECT_TIMEOUT_S = 5  # a server that is down fails a call in about this long at most, never hangs it


class PostgresDb(Db):
    """One psycopg connection, shared by the process's threads: calls and
    transactions take turns under a lock (a transaction holds it to its end).
    A pool would let threads overlap, but each user of a store here is one
    background thread or one request at a time, and a transaction must stay
    on the connection it began on.

    The connection is reopened when it is lost (the server restarted, the
    network dropped it), by the call that finds it lost:

    - before a call, an idle connection with something to read (the server's
      goodbye, or end of file) is reopened, so the first call after a restart
      works;
    - a plain SELECT that loses its connection runs once more on a new one
      (reading twice is harmless); any other statement raises UnavailableError
      saying that whether it was applied is unknown (never applied twice);
    - ``tx()`` reopens a lost connection only at BEGIN, before any of the
      block ran; lost later, it raises UnavailableError and the next call
      reconnects.

    While the server is unreachable, every call fails within
    ``connect_timeout_s`` (the URI's ``connect_timeout`` where it sets one;
    at once on a refused port) with UnavailableError naming the database.
    SQL errors (a constraint, a missing table) are raised as psycopg raises
    them, and keep the connection."""

    dialect = "postgresql"

    def __init__(self, dsn: str, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        try:
            import psycopg
            from psycopg.conninfo import conninfo_to_dict
        except ImportError as exc:  # pragma: no cover - psycopg is a core dependency
            raise ConfigError("PostgreSQL registries need psycopg: pip install 'psycopg[binary]'") from exc
        self._psycopg = psycopg
        self._dsn = dsn
        info = conninfo_to_dict(dsn)
        self._timeout = {} if "connect_timeout" in info else {"connect_timeout": max(1, round(connect_timeout_s))}
        self.where = _describe(info)
        self._lock = threading.RLock()
        self._depth = 0  # tx() nesting; > 0: the connection is inside a transaction
        self._closed = False
        self._conn = None
        self._live()  # fail fast on a wrong address

    # -- the connection ----------------------------------------------------------
    def _live(self):
        """The connection, reopened first if it is lost or has been closed."""
        if self._closed:
            raise UnavailableError(f"registry database {self.where}: this handle was closed")
        conn = self._conn
        if conn is not None and (conn.closed or conn.broken or _has_input(conn)):
            self._drop()
        if self._conn is None:
            try:
                self._conn = self._psycopg.connect(self._dsn, autocommit=True, **self._timeout)
            except self._psycopg.OperationalError as exc:
                raise self._unreachable(exc) from None
        return self._conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _lost(self, conn, exc: BaseException) -> bool:
        """Whether ``exc`` ended the connection (not an SQL error on it)."""
        return isinstance(exc, self._psycopg.Error) and (conn.closed or conn.broken)

    def _unreachable(self, exc: BaseException | None, doing: str = "") -> UnavailableError:
        text = str(exc).strip() if exc is not None else ""
        reason = text.splitlines()[0] if text else (type(exc).__name__ if exc is not None else "connection lost")
        return DatabaseUnreachable(f"registry database {self.where} is unreachable{doing}: {reason}")

    def _in_tx(self):
        """The transaction's connection; UnavailableError once it was lost
        (a block that caught that error cannot go on in a new one)."""
        if self._conn is None:
            raise self._unreachable(None, " (the transaction was not committed)")
        return self._conn

    # -- calls -------------------------------------------------------------------
    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        query, args = render(sql, "postgresql"), tuple(params)
        with self._lock:
            if self._depth:
                return self._run(self._in_tx(), query, args, " (the transaction was not committed)")
            if not _rereadable(query):
                return self._run(self._live(), query, args, " (whether the statement was applied is unknown)")
            conn = self._live()
            try:
                return self._run(conn, query, args)
            except UnavailableError:  # the session was lost under a plain SELECT: once more on a new one
                pass
            return self._run(self._live(), query, args)

    def _run(self, conn, query: str, args: tuple, doing: str = "") -> list[tuple]:
        try:
            return _rows(conn.execute(query, args))
        except Exception as exc:
            if not self._lost(conn, exc):
                raise
            self._drop()
            raise self._unreachable(exc, doing) from None

    @contextlib.contextmanager
    def tx(self) -> Iterator[None]:
        with self._lock:
            txn, conn = self._begin()
            self._depth += 1
            try:
                yield
            except BaseException as exc:
                self._depth -= 1
                if self._conn is conn:  # else lost meanwhile: nothing to roll back
                    self._end(txn, conn, exc)
                raise
            self._depth -= 1
            if self._conn is not conn:  # the block caught the UnavailableError of a lost connection
                raise self._unreachable(None, " (the transaction was not committed)")
            self._end(txn, conn, None)

    def _begin(self):
        """BEGIN (a SAVEPOINT when nested). Nothing of the block has run yet,
        so an outer BEGIN that finds the connection lost reconnects once."""
        for attempt in (1, 2):
            conn = self._in_tx() if self._depth else self._live()
            txn = conn.transaction()
            try:
                txn.__enter__()
                return txn, conn
            except Exception as exc:
                if not self._lost(conn, exc):
                    raise
                self._drop()
                if self._depth or attempt == 2:
                    raise self._unreachable(exc) from None
        raise AssertionError("not reached")  # pragma: no cover

    def _end(self, txn, conn, exc: BaseException | None) -> None:
        """COMMIT (``exc`` None) or ROLLBACK; a connection lost at COMMIT
        leaves the outcome unknown, and says so."""
        try:
            txn.__exit__(type(exc) if exc is not None else None, exc, exc.__traceback__ if exc is not None else None)
        except Exception as lost:
            if not self._lost(conn, lost):
                raise
            self._drop()
            if exc is None:
                raise self._unreachable(lost, " (whether the transaction committed is unknown)") from None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._drop()


def _rows(cur) -> list[tuple]:
    return cur.fetchall() if cur.description else []


def _has_input(conn) -> bool:
    """Whether an idle connection's socket can be read: the server said
    something unasked (it is shutting the session down) or closed it."""
    if not hasattr(select, "poll"):  # Windows
        return bool(select.select([conn.fileno()], [], [], 0)[0])
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
    return bool(poller.poll(0))


def _rereadable(query: str) -> bool:
    """A plain SELECT: running it again changes nothing. Advisory locks are
    held by the session, so a lock call is not run again on another one."""
    text = query.lstrip().lower()
    return text.startswith("select") and "pg_advisory" not in text


def _describe(info: dict) -> str:
    """The database's address for messages, without its password."""
    user = f"{info['user']}@" if info.get("user") else ""
    host = info.get("host") or info.get("hostaddr") or "localhost"
    port = f":{info['port']}" if info.get("port") else ""
    return f"postgresql://{user}{host}{port}/{info.get('dbname', '')}"


class OutageLog:
    """How a background task reports a database it cannot reach: one warning
    when the failures start and one line when a call works again, instead of
    one per tick (the task keeps ticking meanwhile). One per task; not
    thread-safe."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        """``what``: the task, as the start of a sentence ("re-reading API keys")."""
        self._log = logger
        self._what = what
        self._since: float | None = None

    @property
    def down(self) -> bool:
        return self._since is not None

    def failed(self, exc: BaseException) -> None:
        if self._since is None:
            self._since = time.monotonic()
            message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            self._log.warning("%s failed (retried quietly until it works again): %s", self._what, message)

    def ok(self) -> None:
        if self._since is not None:
            self._log.info("%s works again after %.1f s", self._what, time.monotonic() - self._since)
            self._since = None


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
