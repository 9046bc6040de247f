"""The one data plane: every inference and metadata call, whatever its transport.

HTTP (``http_routes.py``) and gRPC (``grpc_service.py``) are adapters around
this module: each decodes its request, calls one function here and encodes
what comes back, or maps the FlywheelError it gets to its own status (each in
its one table). What a call means is decided here, once for both: which
endpoint and variant answer it (one :meth:`Router.route` question per
request), that the variant exists and is servable, the forwarding with its
metrics, and the record of who answered (the request id that feedback names,
the shadow copy, the canary's windows).

Inference is the hot path. :meth:`DataPlane.infer` takes the transport's
:class:`InferCodec` (static functions, so nothing is bound per request) and
is the one coroutine that routes, forwards and answers: an adapter returns
it as its own awaitable, so a request has no more frames and awaits than
one whose transport forwarded by itself.

Tracing (``tracing.py``): with a :class:`Tracer` set, :meth:`DataPlane.infer`
hands the request to :meth:`DataPlane._traced_infer`, the same steps with
timestamps, spans and a ``traceparent`` in the answer. Without one, the only
cost is the ``tracer is None`` check.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from flywheel.protocol.errors import FlywheelError, UnavailableError, error_from_code
from flywheel.serving._private.tracing import MODEL_TIMES, RequestRecord, TraceParent, Tracer
from flywheel.serving._private.wire import Call, Reply
from flywheel.serving.router import EXTENSIONS, SERVER_NAME, SERVER_VERSION, Decision, ModelEntry, Router, version_key

# Larger requests are not parsed a second time for their routing fields (a
# request id or a sticky parameter in the body; a 3 MB JSON body costs ~2 ms
# to parse): send those as the flywheel-request-id / sticky key header or
# metadata, or use HTTP's binary extension, whose JSON header is small.
MAX_PEEK_BYTES = 64 * 1024


class InferCodec(Protocol):
    """What one transport tells the data plane about an inference request.

    Static functions (the codec is a class, never instantiated), so passing
    one costs no allocation. ``source`` is whatever the transport handed to
    :meth:`DataPlane.infer` (its request, its metadata reader)."""

    @staticmethod
    def routing_fields(source: Any, call: Call, request_id: str | None, key_header: bytes | None,
                       key_parameter: str) -> tuple[str | None, str | None]:
        """(request id, sticky key) of the request (see router.RoutingFields)."""

    @staticmethod
    def answer(source: Any, decision: Decision, reply: Reply) -> Any:
        """The transport's answer for a successful reply; ``decision.model``
        answered and ``decision.request_id`` is the id to name (or None)."""

    @staticmethod
    def failed(exc: FlywheelError) -> Any:
        """The transport's answer for an error (or it raises it)."""

    # Asked only when tracing is on:
    TRANSPORT: str  # "http" / "grpc", a span attribute

    @staticmethod
    def traceparent(source: Any) -> TraceParent | None:
        """The caller's W3C trace context (None: absent or malformed)."""

    @staticmethod
    def with_trace(answer: Any, traceparent: str) -> Any:
        """``answer`` naming the trace it was recorded in."""


class DataPlane:
    """Inference and metadata over one Router, for every transport.

    Runs on the ingress's loop thread, like the Router it drives."""

    def __init__(self, router: Router, tracer: Tracer | None = None) -> None:
        """``tracer``: spans of inference calls (None: tracing off)."""
        self.router = router  # also for what only HTTP serves: metrics, feedback, drift
        self.tracer = tracer
        # inference calls routed and not yet answered, over every transport
        # (what the ingress reports for autoscaling); read from other threads
        self.in_flight = 0

    # -- the server ----------------------------------------------------------
    def server_live(self) -> bool:
        """Whether this server answers at all (it does while it runs)."""
        return True

    def server_ready(self) -> bool:
        """Whether every model this replica routes to is ready."""
        return self.router.all_ready()

    @staticmethod
    def server_metadata() -> dict:
        """V2 server metadata: name, version, protocol extensions."""
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(EXTENSIONS)}

    # -- one model -----------------------------------------------------------
    def model(self, name: str, version: str | None) -> ModelEntry:
        """The model a metadata call for ``name`` (at ``version``) is about:
        without a version, the variant the endpoint's policy picks for a
        request without a sticky key. NotFoundError / UnavailableError."""
        return self.router.route(name, version).model

    def model_ready(self, name: str, version: str | None) -> bool:
        """Whether that model is ready (errors as for :meth:`model`)."""
        return self.router.route(name, version).model.ready

    def model_metadata(self, name: str, version: str | None) -> dict:
        """V2 model metadata, listing every loaded version of ``name``;
        UnavailableError until the model has told its metadata."""
        d = self.router.route(name, version)
        known = d.model.metadata
        if known is None:
            raise UnavailableError(f"model {name!r} is not ready")
        meta = dict(known)
        meta["versions"] = sorted(d.variants, key=version_key)
        return meta

    # -- inference -----------------------------------------------------------
    async def infer(self, name: str, version: str | None, request_id: str | None, call: Call,
                    source: Any, codec: type[InferCodec]) -> Any:
        """Route ``call`` (an infer payload, forwarded unchanged) to ``name``
        (at ``version``, else the policy's choice), forward it and record
        who answered.

        ``request_id``: the id the transport already read (None: none yet;
        the codec's routing_fields may find one). Returns
        ``codec.answer(...)``, or ``codec.failed(err)`` when routing fails
        or the model answers with an error (its own code and message)."""
        if self.tracer is not None:
            return await self._traced_infer(name, version, request_id, call, source, codec)
        router = self.router
        try:
            d = router.route(name, version, request_id, codec.routing_fields, source, call)
        except FlywheelError as exc:
            return codec.failed(exc)
        self.in_flight += 1
        try:
            reply = await router.forward(d.model, d.endpoint, call)
        finally:
            self.in_flight -= 1
        if reply.code:
            return codec.failed(error_from_code(reply.code, reply.payload.decode("utf-8", "replace")))
        if d.request_id is not None or d.endpoint.tracked:  # else there is nothing to record
            d.request_id = router.routed(d, call, reply)
        return codec.answer(source, d, reply)

    async def _traced_infer(self, name: str, version: str | None, request_id: str | None, call: Call,
                            source: Any, codec: type[InferCodec]) -> Any:
        """:meth:`infer`'s steps, in the same order, with their timestamps
        recorded and turned into spans (see tracing.py)."""
        router = self.router
        rec = RequestRecord(codec.traceparent(source), codec.TRANSPORT)
        try:
            d = router.route(name, version, request_id, codec.routing_fields, source, call)
        except FlywheelError as exc:
            rec.routed = rec.end = time.time_ns()
            rec.outcome = exc.code.name.lower()
            return self._answer_traced(rec, codec, lambda: codec.failed(exc))
        rec.routed = rec.sent = time.time_ns()
        rec.model, rec.version = d.model.route.name, d.model.route.version
        self.in_flight += 1
        token = MODEL_TIMES.set(rec.times)  # a colocated ModelServer fills it
        try:
            reply = await router.forward(d.model, d.endpoint, call)
        finally:
            MODEL_TIMES.reset(token)
            self.in_flight -= 1
        rec.end = time.time_ns()
        st = reply.stats
        rec.queue_ns, rec.compute_ns, rec.batch_rows = st.queue_us * 1000, st.compute_us * 1000, st.batch_rows
        if reply.code:
            exc = error_from_code(reply.code, reply.payload.decode("utf-8", "replace"))
            rec.outcome = exc.code.name.lower()
            return self._answer_traced(rec, codec, lambda: codec.failed(exc))
        if d.request_id is not None or d.endpoint.tracked:
            d.request_id = router.routed(d, call, reply)
        return self._answer_traced(rec, codec, lambda: codec.answer(source, d, reply))

    def _answer_traced(self, rec: RequestRecord, codec: type[InferCodec], answer) -> Any:
        # spans first: a codec whose failed() raises still gets its trace
        traceparent = self.tracer.record(rec)
        result = answer()
        return result if traceparent is None else codec.with_trace(result, traceparent)
