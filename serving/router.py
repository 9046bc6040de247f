"""The model table behind every transport: routing, readiness, forwarding.

Pure asyncio and no Ray, so it is testable alone. One Router per ingress
replica, driven by the data plane (serving/_private/dataplane.py), which
both transports call. A request asks it one question, :meth:`Router.route`,
whose :class:`Decision` carries everything the rest of the request needs:
forwarding and the book-keeping after the answer look nothing up again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from flywheel.protocol.errors import ErrorCode, FlywheelError, NotFoundError, UnavailableError
from flywheel.serving._private.live_endpoint import LiveEndpoint, new_request_id, usable_request_id
from flywheel.serving._private.reply_outputs import reply_outputs, reply_request_id
from flywheel.serving._private.node_link import NodeLink
from flywheel.serving._private.wire import OP_METADATA, Call, ReplicaChannel, ReplicaLost, Reply
from flywheel.serving.metrics import ModelMetrics, ServingMetrics
from flywheel.serving.shadow import compare_outputs

SERVER_NAME = "flywheel"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ("binary_tensor_data",)
RETRY_DELAY_S = 0.05
PROBE_INTERVAL_S = 1.0
MAX_SHADOWS = 64  # shadow requests in flight per replica; more are not sent
log = logging.getLogger(__name__)
_OUTCOME = {int(c): c.name.lower() for c in ErrorCode}
# Every error counts against the variant that gave it, bad input included:
# callers are spread over the variants at random, so bad input raises every
# variant's error rate alike, while a variant that rejects what the others
# accept (a changed signature) stands out to the canary's error gate.
_HEALTHY = frozenset((0,))


@dataclass(frozen=True, slots=True)
class Route:
    """Where one (model, version) is served: its dedicated replicas' shared
    loopback port, or (``local``) in this process, by a colocated ModelServer.
    ``deployment``: the dedicated replicas' Serve deployment, called through
    Serve from a node that has none of them ("": loopback only);
    ``max_age_s``: how old a connection to them may grow (None: no limit;
    autoscaled replicas need new connections to get calls)."""

    name: str
    version: str
    port: int = 0
    local: bool = False
    deployment: str = ""
    max_age_s: float | None = None


class LocalChannel:
    """A ReplicaChannel's face over an in-process ModelServer: the call is
    awaited directly on this loop (no socket, no frame, no copy)."""

    __slots__ = ("_handle", "server")

    def __init__(self, server) -> None:
        self.server = server
        self._handle = server.handle

    def call(self, call: Call) -> Awaitable[Reply]:
        return self._handle(call)

    call_fresh = call

    def close(self) -> None:
        pass


@dataclass(slots=True)
class ModelEntry:
    route: Route
    channel: ReplicaChannel | NodeLink | LocalChannel
    stats: ModelMetrics
    metadata: dict | None = None
    ready: bool = False
    inflight: int = 0


@dataclass(slots=True)
class _Name:
    versions: dict[str, ModelEntry] = field(default_factory=dict)
    endpoint: LiveEndpoint | None = None


class Decision:
    """The answer to one request's routing question (:meth:`Router.route`).

    ``endpoint``: the name's live endpoint (its windows record the answer);
    ``model``: the variant that answers; ``variants``: every loaded version
    of the name (where a shadow copy goes, what metadata lists);
    ``explicit``: the caller named the version (no policy choice, no shadow);
    ``request_id``: the id the caller gave, then (after
    :meth:`Router.routed`) the one feedback names, None when there is none.

    One is made per request, by :meth:`Router.route` alone, which sets every
    field: without an ``__init__``, making one is a C call and five slot
    stores (half the cost of a Python constructor, on the hot path)."""

    __slots__ = ("endpoint", "explicit", "model", "request_id", "variants")

    endpoint: LiveEndpoint
    model: ModelEntry
    variants: dict[str, ModelEntry]
    explicit: bool
    request_id: str | None


# How a transport reads a request's routing fields:
# (source, call, request id so far, sticky key header or None, sticky key
# parameter or "") -> (request id, sticky key). Asked only for endpoints that
# track requests; the header and parameter are given only when a sticky key
# can change the choice (a weighted split and no version named), so an
# untracked request costs no further parsing.
RoutingFields = Callable[[Any, Call, "str | None", "bytes | None", str], "tuple[str | None, str | None]"]


def version_key(v: str):
    """Sort key: numeric versions numerically, before any others."""
    return (0, int(v), "") if v.isdigit() else (1, 0, v)


class Router:
    """Resolves (name, version) to a model's replicas and forwards calls."""

    def __init__(self, routes: list[Route], metrics: ServingMetrics, local: Mapping[tuple[str, str], Any] = {},
                 *, secret: bytes | None = None, app: str = "") -> None:
        """``local`` maps (name, version) to the ModelServer of each route
        with ``local=True``; ``secret``: the deployment's, which every
        connection to a dedicated model's replicas proves; ``app``: the
        Serve application of the dedicated deployments ("": reached over
        loopback only, as in-process tests do)."""
        self.metrics = metrics
        self.ship_ids = False  # send request ids to the controller (several ingress replicas)
        # endpoint -> capture root, for labels of models captured in their own
        # (dedicated) processes: the feedback that names them arrives here
        self.label_roots: dict[str, str] = {}
        self.label_writers: dict[str, Any] = {}
        self._rng = random.Random()
        self._shadows = 0
        self._shadow_tasks: set[asyncio.Task] = set()
        self._names: dict[str, _Name] = {}
        for r in routes:
            entry = self._names.setdefault(r.name, _Name())
            if r.local:
                channel = LocalChannel(local[(r.name, r.version)])
            else:
                channel = ReplicaChannel("127.0.0.1", r.port, secret=secret, max_age_s=r.max_age_s)
                if r.deployment and app:
                    channel = NodeLink(channel, r.deployment, app)
            entry.versions[r.version] = ModelEntry(r, channel, metrics.for_model(r.name, r.version))
        for name, entry in self._names.items():
            # Until the controller says otherwise, the highest version (by
            # number when numeric) takes every request.
            entry.endpoint = LiveEndpoint(name)
            top = max(entry.versions, key=version_key)
            entry.endpoint.configure(
                {"routable": [top], "weights": {top: 1.0},
                 "sticky": {"header": "flywheel-routing-key", "parameter": "routing_key"}},
                set(entry.versions),
            )

    def models(self) -> list[ModelEntry]:
        return [m for e in self._names.values() for m in e.versions.values()]

    def endpoint(self, name: str) -> LiveEndpoint:
        entry = self._names.get(name)
        if entry is None:
            raise NotFoundError(f"unknown model {name!r}")
        return entry.endpoint

    def endpoints(self) -> list[LiveEndpoint]:
        return [e.endpoint for e in self._names.values()]

    def route(self, name: str, version: str | None, request_id: str | None = None,
              fields: RoutingFields | None = None, source: Any = None, call: Call | None = None) -> Decision:
        """The one routing question of a request: ``name`` at ``version``, or
        without a version the variant the endpoint's policy picks.

        ``fields(source, call, ...)`` reads the request id and sticky key
        from the transport's request when the endpoint tracks requests (see
        RoutingFields); without it (metadata calls) no key is used and
        ``request_id`` stays as given. Raises NotFoundError for an unknown
        name or version (naming the versions there are), UnavailableError
        when the policy has no ready variant."""
        entry = self._names.get(name)
        if entry is None:
            raise NotFoundError(f"unknown model {name!r}")
        ep = entry.endpoint
        key = None
        if ep.tracked and fields is not None:
            if ep.needs_key and not version:
                request_id, key = fields(source, call, request_id, ep.sticky_header, ep.sticky_parameter)
            else:
                request_id, key = fields(source, call, request_id, None, "")
        explicit = bool(version)
        if not explicit:
            version = ep.choose(key)
        model = entry.versions.get(version)
        if model is None:
            raise NotFoundError(f"model {name!r} has no version {version!r}; it has {self.versions(name)}")
        d = Decision()
        d.endpoint, d.model, d.variants, d.explicit, d.request_id = ep, model, entry.versions, explicit, request_id
        return d

    def versions(self, name: str) -> list[str]:
        return sorted(self._names[name].versions, key=version_key)

    def loaded(self, name: str) -> set[str]:
        entry = self._names.get(name)
        return set(entry.versions) if entry is not None else set()

    # -- variants added and removed at run time ------------------------------
    def add_local(self, name: str, version: str, server, stats: ModelMetrics) -> ModelEntry:
        """Route to a ModelServer loaded (and started) in this process."""
        entry = self._names.get(name)
        if entry is None:
            entry = self._names[name] = _Name(endpoint=LiveEndpoint(name))
        model = ModelEntry(Route(name, version, local=True), LocalChannel(server), stats)
        model.metadata = msgspec.json.decode(server.metadata)
        model.ready = True  # loaded and warmed up before it was added
        entry.versions[version] = model
        return model

    def remove(self, name: str, version: str) -> ModelEntry | None:
        """Stop routing to (name, version); requests already sent finish."""
        entry = self._names.get(name)
        if entry is None:
            return None
        return entry.versions.pop(version, None)

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
    async def forward(self, model: ModelEntry, endpoint: LiveEndpoint, call: Call) -> Reply:
        """Send ``call`` to the model's replicas; never raises: a lost or
        unreachable replica becomes an UNAVAILABLE reply. Records metrics
        (the model's, and the variant's window in ``endpoint``, its name's).

        A call whose connection failed is sent once more, and only once:
        inference is idempotent, and a new connection on the shared port
        reaches a replica that is alive (the pooled ones may still point at
        the dead one), so a request stranded on a replica that just died is
        answered by another. A replica lost with the call in flight is named
        in a warning and counted (ModelMetrics.replica_lost); a call that
        loses a second replica is a poison request, likely to crash any
        replica it reaches, and is answered INTERNAL instead of being sent
        a third time (see README, "When a request crashes its replica")."""
        started = time.perf_counter()
        model.inflight += 1
        try:
            reply = await model.channel.call(call)
        except UnavailableError as exc:
            first = self._lost(model, exc, "sending it once more on a new connection")
            model.stats.retried()
            if call.timeout_ms:  # the retry gets what is left of the caller's deadline
                spent_ms = int((time.perf_counter() - started) * 1000)
                call = dataclasses.replace(call, timeout_ms=max(1, call.timeout_ms - spent_ms))
            reply = await self._call_once(model, call, first)
        finally:
            model.inflight -= 1
        elapsed = time.perf_counter() - started
        model.stats.observe("ok" if reply.code == 0 else _OUTCOME.get(reply.code, "internal"), elapsed, reply.stats)
        # caller errors (bad input) say nothing of the variant's health
        endpoint.window(model.route.version).observe(elapsed, reply.code in _HEALTHY)
        return reply

    async def _call_once(self, model: ModelEntry, call: Call, first: str | None) -> Reply:
        """The one retry; ``first``: the replica lost with the first try
        (None: the first try reached no replica)."""
        # A moment for the kernel to finish tearing down a replica that was
        # just killed: until its listening socket is gone, a new connection
        # on the shared port can still be queued to it (and then reset).
        await asyncio.sleep(RETRY_DELAY_S)
        try:
            return await model.channel.call_fresh(call)
        except ReplicaLost as exc:
            self._lost(model, exc, "not sending it again" if first else "answering UNAVAILABLE")
            if first is None:
                model.ready = False
                return Reply(int(exc.code), exc.message.encode())
            # INTERNAL, not UNAVAILABLE: a client told to come back later
            # would send the request that crashes replicas again. The
            # replicas' names stay in the log: pids and nodes are not the
            # caller's business.
            return Reply(int(ErrorCode.INTERNAL), (
                f"model {model.route.name!r} version {model.route.version!r}: two model replicas were lost "
                "while they had this request; it may be what crashes them, so it is not sent again"
            ).encode())
        except FlywheelError as exc:
            if exc.code == ErrorCode.UNAVAILABLE:
                model.ready = False
            return Reply(int(exc.code), exc.message.encode())

    @staticmethod
    def _lost(model: ModelEntry, exc: UnavailableError, then: str) -> str | None:
        """Name and count the replica lost with a call in flight (None when
        ``exc`` is not such a loss: no replica was reached)."""
        if not isinstance(exc, ReplicaLost):
            return None
        model.stats.replica_lost(exc.replica)
        log.warning("model %s:%s: replica %s was lost with a call in flight; %s",
                    model.route.name, model.route.version, exc.replica, then)
        return exc.replica

    # -- after an answer: feedback ids and shadow traffic -------------------
    def routed(self, d: Decision, call: Call, reply: Reply) -> str | None:
        """Book-keeping for a successful answer decided by ``d``: keep the
        request id for feedback (one is made when the caller gave none) and
        maybe mirror the request to the shadow variant. Returns the id the
        answer names (None: none)."""
        ep, model, request_id = d.endpoint, d.model, d.request_id
        if not ep.tracked:
            return request_id if usable_request_id(request_id) else None
        if not usable_request_id(request_id):
            # the id the model server gave a captured request, so that a
            # reward and a label for it name the same request; else ours
            named = reply_request_id(call.op, reply)
            request_id = named if usable_request_id(named) else new_request_id()
        ep.remember(request_id, model.route.version, self.ship_ids)
        shadow = ep.shadow
        if (shadow is not None and not d.explicit and shadow[0] != model.route.version
                and self._rng.random() < shadow[1]):
            target = d.variants.get(shadow[0])
            if target is not None and self._shadows < MAX_SHADOWS:
                self._shadows += 1
                task = asyncio.get_running_loop().create_task(self._shadow(ep, target, call, reply))
                self._shadow_tasks.add(task)
                task.add_done_callback(self._shadow_done)
        return request_id

    def _shadow_done(self, task: asyncio.Task) -> None:
        self._shadows -= 1
        self._shadow_tasks.discard(task)

    async def _shadow(self, ep: LiveEndpoint, target: ModelEntry, call: Call, primary: Reply) -> None:
        """Send the request to the shadow variant and compare the answers;
        the caller already has its answer (this task runs after it)."""
        try:
            await asyncio.sleep(0)  # let the caller's answer be written first
            reply = await self.forward(target, ep, call)
            if reply.code:
                return  # counted as the shadow variant's error by forward
            agree, diff = compare_outputs(reply_outputs(call.op, primary), reply_outputs(call.op, reply))
            ep.window(target.route.version).observe_shadow(agree, diff)
        except Exception:  # never the caller's problem
            log.debug("shadow comparison failed", exc_info=True)

    def close(self) -> None:
        for task in list(self._shadow_tasks):
            task.cancel()
        for m in self.models():
            m.channel.close()
