"""Load for the cluster benchmark.

- ``run_block``: one closed-loop block at a fixed concurrency, from h2load
  when installed, else from bench/loadgen.py; run as a module
  (``python -m flywheel.bench._cluster_load '{json}'``) so that a block can be
  driven from inside a host's network namespace at that host's own
  127.0.0.1 (the load generators only send to loopback), printing its
  summary as one JSON line.
- ``LiveLoad``: keep-alive clients on an asyncio loop in a thread that run
  until told to stop and keep the time of every answer and failure, for the
  failover and autoscaling timelines (h2load only reports at its end).
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time

import numpy as np

DIGITS_ROW = np.linspace(0, 1, 64).tolist()
# a failed request's client waits this long before its next one, so that a
# balancer answering 503 at once does not turn into thousands of failures
FAILURE_PAUSE_S = 0.05


def infer_body(row: list[float] = DIGITS_ROW) -> bytes:
    """A V2 JSON infer body of one row."""
    return json.dumps({"inputs": [{"name": "input", "shape": [1, len(row)], "datatype": "FP32",
                                   "data": row}]}).encode()


def raw_request(path: str, body: bytes, token: str) -> bytes:
    """One HTTP/1.1 keep-alive POST of ``body`` to ``path`` with a bearer token."""
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def run_block(port: int, path: str, token: str, clients: int, seconds: float, warmup_s: float = 0.0) -> dict:
    """``clients`` closed-loop keep-alive connections to 127.0.0.1:``port``
    for ``seconds``; the load summary (LoadResult.summary) and the seconds
    measured."""
    from flywheel.bench import h2load
    from flywheel.bench.loadgen import run_load

    body = infer_body()
    if h2load.available():
        url = f"http://127.0.0.1:{port}{path}"
        target = h2load.Target(url, body, ("content-type: application/json", f"authorization: Bearer {token}"))
        res = h2load.run([url], target, concurrency=clients, duration_s=seconds, warmup_s=warmup_s)
    else:
        res = run_load("127.0.0.1", port, raw_request(path, body, token), concurrency=clients, duration_s=seconds,
                       warmup_s=warmup_s)
    return {**res.summary(), "duration_s": res.duration_s}


class LiveLoad:
    """``clients`` closed-loop keep-alive clients to 127.0.0.1:``port``,
    each sending ``request`` again as soon as its answer is read (after a
    failure, ``FAILURE_PAUSE_S`` later), until ``stop()``. ``ok`` holds the
    time.monotonic() of each 200 answer, ``failed`` of each failure and
    ``reasons`` the first few failures' reasons. A connection closed by the
    server (``connection: close``, as an ingress answers when a connection
    has reached its age) is opened again before the next request."""

    def __init__(self, port: int, request: bytes, clients: int) -> None:
        self.port = port
        self.request = request
        self.clients = clients
        self.ok: list[float] = []
        self.failed: list[float] = []
        self.reasons: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="live-load", daemon=True)

    def start(self) -> LiveLoad:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def __enter__(self) -> LiveLoad:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        import uvloop

        uvloop.run(self._main())

    async def _main(self) -> None:
        await asyncio.gather(*(self._client() for _ in range(self.clients)))

    def _fail(self, why: str) -> None:
        self.failed.append(time.monotonic())
        if len(self.reasons) < 10:
            self.reasons.append(why)

    async def _client(self) -> None:
        writer = reader = None
        while not self._stop.is_set():
            try:
                if writer is None:
                    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 5)
                writer.write(self.request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                status, length, close = _parse_head(head)
                body = await asyncio.wait_for(reader.readexactly(length), 30) if length else b""
                if status == 200:
                    self.ok.append(time.monotonic())
                else:
                    self._fail(f"HTTP {status}: {body[:120]!r}")
                    await asyncio.sleep(FAILURE_PAUSE_S)
                if close:
                    writer.close()
                    writer = None
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError) as exc:
                self._fail(f"{type(exc).__name__}: {exc}")
                if writer is not None:
                    writer.close()
                writer = None
                await asyncio.sleep(FAILURE_PAUSE_S)
        if writer is not None:
            writer.close()


def _parse_head(head: bytes) -> tuple[int, int, bool]:
    """(status, content length, whether the server closes the connection)
    of a response head."""
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length, close = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            close = True
    return status, length, close


def main(argv: list[str]) -> int:
    """One block (``run_block``'s arguments as a JSON object); prints its summary."""
    args = json.loads(argv[0])
    print(json.dumps(run_block(**args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
