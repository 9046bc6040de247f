"""PostgresDb against a real PostgreSQL that restarts or drops its session:
the next call reconnects by itself, nothing is applied twice, and calls made
while the server is down fail fast with UnavailableError naming the database.

No Ray here (so no integration marker, like test_registry_store.py); the
server is this module's own, so stopping it leaves the session's alone."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from _poll import wait_for
from pg import started_or_skip
from flywheel.protocol.errors import UnavailableError
from flywheel.registry.db import CONNECT_TIMEOUT_S, connect

FAST_S = CONNECT_TIMEOUT_S + 2.0  # generous: a refused loopback port fails in milliseconds


@pytest.fixture(scope="module")
def server():
    s = started_or_skip()
    yield s
    s.stop()


@pytest.fixture
def db(server):
    d = connect(server.new_database())
    d.execute("CREATE TABLE t (x INTEGER)")
    yield d
    d.close()


def _restart(server) -> None:
    server.stop_server()
    server.start_server()


def _pid(db) -> int:
    return db.execute("SELECT pg_backend_pid()")[0][0]


def _kill_session(server, pid: int) -> None:
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]


def _kill_while_running(server, pid: int, fn) -> BaseException | object:
    """Run ``fn`` in a thread, end session ``pid`` while its statement runs
    (a pg_sleep), and return what ``fn`` returned or raised."""
    out: list = []

    def call() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out.append(exc)

    t = threading.Thread(target=call)
    t.start()
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as admin:
        wait_for(lambda: admin.execute(
            "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND state = 'active' AND query LIKE '%%pg_sleep%%'",
            (pid,)).fetchone(), 10, "the statement to be running")
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    t.join(30)
    assert not t.is_alive(), "the call did not return after its session was ended"
    return out[0]


def test_the_first_call_after_a_restart_works_whatever_it_is(server, db):
    db.execute("INSERT INTO t VALUES (?)", (1,))
    _restart(server)
    assert db.execute("SELECT x FROM t") == [(1,)]
    _restart(server)
    db.execute("INSERT INTO t VALUES (?)", (2,))
    _restart(server)
    with db.tx():
        db.execute("INSERT INTO t VALUES (?)", (3,))
    assert db.execute("SELECT x FROM t ORDER BY x") == [(1,), (2,), (3,)]


def test_calls_while_the_server_is_down_fail_fast_naming_the_database(server, db):
    db.execute("INSERT INTO t VALUES (?)", (1,))
    where = f"postgresql://flywheel@127.0.0.1:{server.port}/"
    server.stop_server()
    try:
        for call in (lambda: db.execute("SELECT x FROM t"), lambda: db.execute("INSERT INTO t VALUES (2)")):
            started = time.monotonic()
            with pytest.raises(UnavailableError, match=f"registry database {where}t_[0-9a-f]+ is unreachable"):
                call()
            assert time.monotonic() - started < FAST_S
        started = time.monotonic()
        with pytest.raises(UnavailableError, match="is unreachable"):
            with db.tx():
                db.execute("INSERT INTO t VALUES (3)")
        assert time.monotonic() - started < FAST_S
    finally:
        server.start_server()
    assert db.execute("SELECT x FROM t") == [(1,)]  # the next call reconnects; nothing of the outage applied


def test_a_session_lost_inside_a_transaction_is_not_retried(server, db):
    with pytest.raises(UnavailableError, match="the transaction was not committed"):
        with db.tx():
            db.execute("INSERT INTO t VALUES (1)")
            _kill_session(server, _pid(db))
            db.execute("INSERT INTO t VALUES (2)")
    assert db.execute("SELECT count(*) FROM t") == [(0,)]


def test_a_block_that_swallows_the_lost_session_still_fails_its_transaction(server, db):
    with pytest.raises(UnavailableError, match="the transaction was not committed"):
        with db.tx():
            db.execute("INSERT INTO t VALUES (1)")
            _kill_session(server, _pid(db))
            with pytest.raises(UnavailableError):
                db.execute("INSERT INTO t VALUES (2)")
            with pytest.raises(UnavailableError):  # not on a new connection, outside the transaction
                db.execute("INSERT INTO t VALUES (3)")
    assert db.execute("SELECT count(*) FROM t") == [(0,)]


def test_a_read_whose_session_is_lost_runs_again_on_a_new_one(server, db):
    db.execute("INSERT INTO t VALUES (1)")
    got = _kill_while_running(server, _pid(db), lambda: db.execute("SELECT x FROM t, pg_sleep(2)"))
    assert got == [(1,)]


def test_a_write_whose_session_is_lost_is_not_applied_twice(server, db):
    got = _kill_while_running(server, _pid(db), lambda: db.execute("INSERT INTO t SELECT 1 FROM pg_sleep(2)"))
    assert isinstance(got, UnavailableError)
    assert "whether the statement was applied is unknown" in got.message
    assert db.execute("SELECT count(*) FROM t") == [(0,)]  # ended before it finished, and not run again


def test_sql_errors_pass_through_and_keep_the_connection(db):
    pid = _pid(db)
    with pytest.raises(psycopg.errors.UndefinedTable):
        db.execute("SELECT * FROM no_such_table")
    with pytest.raises(psycopg.errors.UndefinedTable):
        with db.tx():
            db.execute("INSERT INTO no_such_table VALUES (1)")
    assert _pid(db) == pid


def test_a_closed_handle_does_not_reconnect(db):
    db.close()
    with pytest.raises(UnavailableError, match="this handle was closed"):
        db.execute("SELECT 1")
