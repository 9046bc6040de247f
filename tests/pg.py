"""A real PostgreSQL server for tests, started from Debian's `postgresql`
package binaries into a temporary folder on a free port of loopback (or of
another address of this machine: the multi-node tests bind their network
namespaces' gateway, which every namespace reaches)."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class PostgresServer:
    """start() -> DSN of the `postgres` database; stop() shuts it down.
    Raises RuntimeError with the reason when no server can be started.
    For outage tests, stop_server() and start_server() stop and start the
    same server again (same data, same port). ``host``: the one address it
    listens on (and its DSNs name)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.dir = tempfile.mkdtemp(prefix="fw-pg-")
        self.host = host
        self.port = _free_port(host)
        self._as: list[str] = []

    def _run(self, *args: str) -> None:
        proc = subprocess.run([*self._as, *args], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {proc.stderr.strip() or proc.stdout.strip()}")

    def start(self) -> str:
        initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
        if not initdb or not pg_ctl:
            raise RuntimeError("no PostgreSQL server binaries (install Debian's 'postgresql' package)")
        if os.geteuid() == 0:  # postgres refuses to run as root
            import pwd

            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root and there is no 'postgres' user") from None
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        data = os.path.join(self.dir, "data")
        self._run(initdb, "-D", data, "-A", "trust", "-U", "flywheel", "--no-sync", "-E", "UTF8")
        if self.host != "127.0.0.1":
            # initdb lets in loopback only; let in the hosts on this
            # address's own subnets (the namespaces on the bridge)
            with open(os.path.join(data, "pg_hba.conf"), "a") as f:
                f.write("host all all samenet trust\n")
        self.start_server()
        return self.dsn("postgres")

    def start_server(self) -> None:
        """Start the server on the data folder and port it was made with;
        returns once it takes connections."""
        self._run(
            _bin("pg_ctl"), "-D", os.path.join(self.dir, "data"), "-l", os.path.join(self.dir, "log"), "-w",
            "-t", "60", "-o", f"-p {self.port} -k {self.dir} -c listen_addresses={self.host} -c fsync=off", "start",
        )

    def stop_server(self) -> None:
        """Stop the server, keeping its data (``fast``: open sessions are
        ended, as in a restart by an operator); returns once it is down."""
        self._run(_bin("pg_ctl"), "-D", os.path.join(self.dir, "data"), "-m", "fast", "-w", "stop")

    def dsn(self, database: str) -> str:
        return f"postgresql://flywheel@{self.host}:{self.port}/{database}"

    def new_database(self) -> str:
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)

    def stop(self) -> None:
        pg_ctl = _bin("pg_ctl")
        if pg_ctl and os.path.isdir(os.path.join(self.dir, "data")):
            subprocess.run([*self._as, pg_ctl, "-D", os.path.join(self.dir, "data"), "-m", "fast", "stop"],
                           capture_output=True, timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


def started_or_skip(host: str = "127.0.0.1") -> PostgresServer:
    """A started server of the caller's own (stop() it), or pytest.skip with
    the reason where none can start. Outage tests take one of their own, so
    that a test that fails while the server is stopped leaves the session's
    server alone. ``host``: the address it listens on (see PostgresServer)."""
    import pytest

    server = PostgresServer(host)
    try:
        server.start()
    except RuntimeError as exc:
        server.stop()
        pytest.skip(f"PostgreSQL unavailable: {exc}")
    return server
