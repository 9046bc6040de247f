"""One V2 infer call to the test MLP (64 -> 10) on a fresh connection, for the
tests that kill servers: returns the HTTP status, 0 when no answer came."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import numpy as np

BODY = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                               "data": np.linspace(0, 1, 64).tolist()}]}).encode()


def infer_status(base_url: str, model: str = "mlp") -> int:
    """A fresh connection each time, so that the kernel (SO_REUSEPORT) or a
    load balancer picks the server anew."""
    req = urllib.request.Request(f"{base_url}/v2/models/{model}/infer", BODY, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


class KeepAliveLoad:
    """``clients`` threads, each on its own keep-alive connection, sending
    one request after another with ``send(conn)`` (which raises on a failed
    call) until the block ends; every answer and every failure (with its
    reason) is kept. A connection the server closes (``connection: close``,
    as a draining replica answers) is reopened by http.client itself."""

    def __init__(self, port: int, send, clients: int = 4) -> None:
        import threading

        self.port = port
        self.send = send
        self.answers: list = []
        self.failures: list[str] = []
        self.failed_at: list[float] = []  # time.monotonic() of each failure
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self._stop.is_set():
            try:
                self.answers.append(self.send(conn))
            except Exception as exc:  # noqa: BLE001 - every failure counts, whatever it is
                self.failed_at.append(time.monotonic())
                self.failures.append(f"{type(exc).__name__}: {exc}")
                conn.close()
        conn.close()

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)
