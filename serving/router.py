"""The model table behind every transport: resolution, readiness, forwarding.

Pure asyncio and no Ray, so it is testable alone. One Router per ingress
replica; HTTP routes and the gRPC service both call into it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from flywheel.runtime.errors import ErrorCode, FlywheelError, NotFoundError, UnavailableError
from flywheel.serving._private.wire import OP_METADATA, Call, Reply, ReplicaChannel
from flywheel.serving.metrics import ModelMetrics, ServingMetrics

SERVER_NAME = "flywheel"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ("binary_tensor_data",)
RETRY_DELAY_S = 0.05
PROBE_INTERVAL_S = 1.0
_OUTCOME = {int(c): c.name.lower() for c in ErrorCode}


@dataclass(frozen=True, slots=True)
class Route:
    """Where one (model, version) is served: its dedicated replicas' shared
    loopback port, or (``local``) in this process, by a colocated ModelServer."""

    name: str
    version: str
    port: int = 0
    local: bool = False


class LocalChannel:
    """A ReplicaChannel's face over an in-process ModelServer: the call is
    awaited directly on this loop (no socket, no frame, no copy)."""

    __slots__ = ("_handle",)

    def __init__(self, server) -> None:
        self._handle = server.handle

    def call(self, call: Call) -> Awaitable[Reply]:
        return self._handle(call)

    call_fresh = call

    def close(self) -> None:
        pass


@dataclass(slots=True)
class ModelEntry:
    route: Route
    channel: ReplicaChannel | LocalChannel
    stats: ModelMetrics
    metadata: dict | None = None
    ready: bool = False


@dataclass(slots=True)
class _Name:
    versions: dict[str, ModelEntry] = field(default_factory=dict)
    default: str = ""


def version_key(v: str):
    """Sort key: numeric versions numerically, before any others."""
    return (0, int(v), "") if v.isdigit() else (1, 0, v)


class Router:
    """Resolves (name, version) to a model's replicas and forwards calls."""

    def __init__(self, routes: list[Route], metrics: ServingMetrics, local: Mapping[tuple[str, str], Any] = {}) -> None:
        """``local`` maps (name, version) to the ModelServer of each route
        with ``local=True``."""
        self.metrics = metrics
        self._names: dict[str, _Name] = {}
        for r in routes:
            entry = self._names.setdefault(r.name, _Name())
            if r.local:
                channel = LocalChannel(local[(r.name, r.version)])
            else:
                channel = ReplicaChannel("127.0.0.1", r.port)
            entry.versions[r.version] = ModelEntry(r, channel, metrics.for_model(r.name, r.version))
        for entry in self._names.values():
            # The default version is the highest: numerically when numeric.
            entry.default = max(entry.versions, key=version_key)

    def models(self) -> list[ModelEntry]:
        return [m for e in self._names.values() for m in e.versions.values()]

    def resolve(self, name: str, version: str | None) -> ModelEntry:
        """The entry for ``name`` at ``version`` (None or "" = the default);
        NotFoundError naming what exists otherwise."""
        entry = self._names.get(name)
        if entry is None:
            raise NotFoundError(f"unknown model {name!r}")
        model = entry.versions.get(version or entry.default)
        if model is None:
            raise NotFoundError(f"model {name!r} has no version {version!r}; it has {self.versions(name)}")
        return model

    def versions(self, name: str) -> list[str]:
        return sorted(self._names[name].versions, key=version_key)

    def metadata(self, model: ModelEntry) -> dict | None:
        """V2 model metadata (with every version of the name), None until known."""
        if model.metadata is None:
            return None
        meta = dict(model.metadata)
        meta["versions"] = self.versions(model.route.name)
        return meta

    # -- readiness ----------------------------------------------------------
    async def probe(self, model: ModelEntry) -> None:
        """Fetch metadata; afterwards it doubles as the liveness check."""
        try:
            reply = await asyncio.wait_for(model.channel.call(Call(OP_METADATA, b"")), 5)
        except (FlywheelError, asyncio.TimeoutError):
            model.ready = False
            return
        if reply.code == 0:
            model.metadata = msgspec.json.decode(reply.payload)
            model.ready = True

    async def probe_forever(self) -> None:
        while True:
            await asyncio.gather(*(self.probe(m) for m in self.models()))
            await asyncio.sleep(PROBE_INTERVAL_S)

    def all_ready(self) -> bool:
        return all(m.ready for m in self.models())

    # -- forwarding ---------------------------------------------------------
    async def forward(self, model: ModelEntry, call: Call) -> Reply:
        """Send ``call`` to the model's replicas; never raises: a lost or
        unreachable replica becomes an UNAVAILABLE reply. Records metrics.

        A call whose connection failed is sent once more: inference is
        idempotent, and a new connection on the shared port reaches a replica
        that is alive (the pooled ones may still point at the dead one), so a
        request stranded on a replica that just died is answered by another."""
        started = time.perf_counter()
        try:
            reply = await model.channel.call(call)
        except UnavailableError:
            model.stats.retried()
            if call.timeout_ms:  # the retry gets what is left of the caller's deadline
                spent_ms = int((time.perf_counter() - started) * 1000)
                call = dataclasses.replace(call, timeout_ms=max(1, call.timeout_ms - spent_ms))
            reply = await self._call_once(model, call)
        model.stats.observe(
            "ok" if reply.code == 0 else _OUTCOME.get(reply.code, "internal"),
            time.perf_counter() - started, reply.stats,
        )
        return reply

    async def _call_once(self, model: ModelEntry, call: Call) -> Reply:
        # A moment for the kernel to finish tearing down a replica that was
        # just killed: until its listening socket is gone, a new connection
        # on the shared port can still be queued to it (and then reset).
        await asyncio.sleep(RETRY_DELAY_S)
        try:
            return await model.channel.call_fresh(call)
        except FlywheelError as exc:
            if exc.code == ErrorCode.UNAVAILABLE:
                model.ready = False
            return Reply(int(exc.code), exc.message.encode())

    def close(self) -> None:
        for m in self.models():
            m.channel.close()
