"""The soak's load: open loop, mixed HTTP JSON / HTTP binary / gRPC.

Request i leaves at its due time (bench/_soak_plan.py: request_plan) whether
or not the earlier ones have been answered, each as its own asyncio task on
a loop of its own thread, so that the faults the soak injects from the main
thread (blocking Ray calls) never delay the schedule. The soak itself never
sends a request again; flywheel.client's AsyncClient does, once and unseen,
when a pooled keep-alive connection turns out closed before any byte of the
answer came back (the request never reached a server).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import numpy as np

from flywheel.bench._soak_plan import Send, request_plan
from flywheel.bench._soak_report import Outcome, cause_of, wrong_answer
from flywheel.client import AsyncClient, AsyncGrpcClient, ClientError
from flywheel.registry.keys import parse_token


class KeyRing:
    """The tokens the load carries: ``main`` for most requests, ``churn``
    for a small share; the soak replaces ``churn`` while the load runs
    (a plain attribute: one reference swap, read at each send)."""

    def __init__(self, main: str, churn: str) -> None:
        self.main, self.churn = main, churn


def key_id(token: str) -> str:
    parsed = parse_token(token)
    if parsed is None:
        raise ValueError("not an API key token (fwk_<id>_<secret>)")
    return parsed[0]


class OpenLoopLoad:
    """``run(duration_s)`` sends the planned requests and records an
    :class:`Outcome` for each in ``outcomes`` (times since ``t0``, a
    time.monotonic() reading). ``start`` runs it on a thread of its own."""

    def __init__(self, http_url: str, grpc_target: str, keys: KeyRing, rate: float, seed: int,
                 x: np.ndarray, expected: np.ndarray, t0: float, timeout_s: float = 10.0) -> None:
        """Every request sends input ``x``; an answer other than ``expected``
        (every model and version serves the same weights) is a failure."""
        self._url, self._target, self._keys = http_url, grpc_target, keys
        self._rate, self._seed, self._t0, self._timeout = rate, seed, t0, timeout_s
        self._x, self._expected = x, expected
        self._http: dict[str, AsyncClient] = {}
        self._grpc: dict[str, AsyncGrpcClient] = {}
        self.outcomes: list[Outcome] = []
        self.slip_s: list[float] = []  # how late each request left (the loop's own lag)
        # requests awaiting their answer, by transport and by model (read by
        # the fault thread to strike while some are in flight)
        self.in_flight: Counter[str] = Counter()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, duration_s: float) -> None:
        def body() -> None:
            try:
                asyncio.run(self.run(duration_s))
            except BaseException as exc:  # reported by join(): a dead load must fail the soak, not shorten it
                self.error = exc

        self._thread = threading.Thread(target=body, name="soak-load", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout_s: float) -> None:
        """Wait for the load to end; raise what ended it, if it failed."""
        assert self._thread is not None, "start() first"
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise RuntimeError(f"the load did not end within {timeout_s:.0f} s of its schedule")
        if self.error is not None:
            raise RuntimeError(f"the load failed: {self.error!r}") from self.error

    async def run(self, duration_s: float) -> None:
        tasks: set[asyncio.Task] = set()
        start = time.monotonic()
        try:
            for s in request_plan(self._rate, self._seed):
                if s.at >= duration_s or self._stop.is_set():
                    break
                delay = start + s.at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    self.slip_s.append(-delay)
                task = asyncio.create_task(self._one(s))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(tasks)
        finally:
            for c in [*self._http.values(), *self._grpc.values()]:
                await c.close()

    async def _one(self, s: Send) -> None:
        token = self._keys.churn if s.churn else self._keys.main
        inputs = {"input": self._x}
        t = time.monotonic()
        cause = ""
        self.in_flight[s.transport] += 1
        self.in_flight[s.model] += 1
        try:
            if s.transport == "grpc":
                r = await self._client(self._grpc, token, AsyncGrpcClient, self._target).infer(s.model, inputs)
            else:
                client = self._client(self._http, token, AsyncClient, self._url)
                r = await client.infer(s.model, inputs, binary=s.transport == "http_binary")
            cause = wrong_answer(r.output(), self._expected)
        except ClientError as exc:
            cause = cause_of("gRPC" if s.transport == "grpc" else "HTTP", exc.status, exc.message)
        except Exception as exc:  # every request gets its outcome, even one the client did not foresee
            cause = cause_of("client", type(exc).__name__, str(exc))
        finally:
            self.in_flight[s.transport] -= 1
            self.in_flight[s.model] -= 1
        self.outcomes.append(Outcome(s.index, s.transport, s.model, key_id(token),
                                     t - self._t0, time.monotonic() - self._t0, cause))

    def _client(self, pool: dict, token: str, cls, address: str):
        client = pool.get(token)
        if client is None:
            client = pool[token] = cls(address, api_key=token, timeout=self._timeout)
        return client


def touch_every_replica(http_url: str, grpc_target: str, token: str, models: list[str], features: int,
                        connections: int = 16) -> list[str]:
    """Send each model one request per transport over each of
    ``connections`` fresh connections, so that the kernel's SO_REUSEPORT
    spreads them over every ingress replica and gRPC front: a replica's
    first requests load what they need (an ingress replica measured ~245 MiB
    before its first calls, ~300 MiB after them), which the warm-up must see
    before the first resource sample. Returns the failures, as causes."""
    from flywheel.client import Client, GrpcClient

    x = {"input": np.zeros((1, features), np.float32)}
    failures = []
    for _ in range(connections):
        for transport, make in (("HTTP", lambda: Client(http_url, api_key=token)),
                                ("gRPC", lambda: GrpcClient(grpc_target, api_key=token))):
            with make() as client:
                for model in models:
                    try:
                        client.infer(model, x)
                    except ClientError as exc:
                        failures.append(cause_of(transport, exc.status, exc.message))
    return failures
