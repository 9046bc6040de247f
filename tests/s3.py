"""A real S3 HTTP API for tests: moto's server (``moto[server]``, a test
dependency) in a process of its own, on a given address and port, with a
bucket made for the test. Stopped by its PID.

Clients find it the way they find any S3-compatible store: through the
standard variables botocore reads (``AWS_ENDPOINT_URL`` and the keys; see
:meth:`MotoServer.env`), which s3fs, and so every ``s3://`` URI of
Flywheel's, honours."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

REGION = "us-east-1"


class MotoServer:
    """``start()`` runs ``python -m moto.server`` on ``host:port`` (with
    ``popen``, e.g. bench.netns ``Hosts.popen`` bound to a host, to start it
    inside a network namespace); ``make_bucket(name)``; ``stop()``."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.endpoint = f"http://{host}:{port}"
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="fw-moto-", suffix=".log", delete=False).name

    def env(self) -> dict[str, str]:
        """The variables an S3 client needs for this server (any keys do:
        moto does not check signatures)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION}

    def start(self, popen=None, ready=None, timeout_s: float = 60.0) -> MotoServer:
        """``popen(argv, log=path)``: how to start it (default: here);
        ``ready()``: whether it answers (default: a GET from here; a server
        on a namespace's own loopback must be asked from inside it)."""
        ready = ready or self._answers
        argv = [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)]
        if popen is None:
            with open(self.log, "ab") as out:
                self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        else:
            self.proc = popen(argv, log=self.log)
        deadline = time.monotonic() + timeout_s
        while not ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                with open(self.log, errors="replace") as f:
                    raise RuntimeError(f"moto server on {self.endpoint} did not start: {f.read()[-2000:]}")
            time.sleep(0.2)
        return self

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (S3's CreateBucket, a plain PUT); its URI."""
        req = urllib.request.Request(f"{self.endpoint}/{name}", data=b"", method="PUT")
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200, resp.status
        return f"s3://{name}"

    def stop(self) -> None:
        """SIGTERM by PID, then SIGKILL if it lingers."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def close(self) -> None:
        self.stop()
        try:
            os.remove(self.log)
        except OSError:
            pass
