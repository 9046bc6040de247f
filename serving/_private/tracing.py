"""W3C trace context and OpenTelemetry spans for inference requests.

Off (``server.tracing`` unset or without ``otlp_endpoint``): the data plane
holds no :class:`Tracer` and checks one attribute per request; no span
object, no timestamp and no OpenTelemetry import exists. An incoming
``traceparent`` is then neither parsed nor answered: it is harmless and
changes nothing (the frame hop to a dedicated replica carries no trace
context either way, so that the frame format stays as it is).

On: one request span (kind SERVER, named ``infer``) per inference call, whose
parent is the caller's ``traceparent`` (HTTP header; gRPC metadata) when it
parses, else a new trace; a malformed ``traceparent`` is ignored, never an
error (W3C: start a new trace). Its children:

- ``route``: the router's choice of endpoint variant;
- ``decode``: the model server's decode, validation and limit checks;
- ``queue``: waiting in the batcher for a batch to start;
- ``compute``: the backend's run of the batch this request was in;
- ``encode``: selecting and encoding the outputs.

Queue and compute happen per batch, not per request: rather than spans
inside the batch loop, the batcher's per-request ``queue_s`` / ``compute_s``
(which the reply's Stats already carry) place those two spans with explicit
start and end times. Decode and encode times come from a small mutable
record (:class:`ModelTimes`) that the data plane puts in a ContextVar and a
colocated ModelServer fills (it runs in the request's own task). A
dedicated replica, in another process, cannot fill it: there queue and
compute are placed to end when the reply arrived, ``decode`` covers the
time from sending the call to the queue's start (the hops, decode and
encode together) and ``encode`` is a zero-length mark after compute; both
carry ``flywheel.span.derived = true``.

Attributes: model name and version, batch rows, outcome (``ok`` or the
error code's name), and the transport. Never a header's value, a key, a
request id from the body, or tensor data.

Spans are exported by a BatchSpanProcessor (a background thread; the
request only enqueues) with the OTLP/HTTP exporter. The provider is this
object's own, not OpenTelemetry's global one. The answer names the trace
in a ``traceparent`` (the request span's id, W3C format).
"""

from __future__ import annotations

import contextvars
import logging
import re
import time
from typing import Any

from flywheel.runtime.extras import require_extra
from flywheel.serving.config import TracingConfig

TRACEPARENT = "traceparent"
EXPORT_EVERY_MS = 1000
_QUEUE_LOGGER = "opentelemetry.sdk._shared_internal"  # the SDK's batch processor's
_HEX = re.compile(r"[0-9a-f]+\Z")

# Filled by a colocated ModelServer while it handles the request (see the
# module docstring); None when tracing is off, and in a dedicated replica.
MODEL_TIMES: contextvars.ContextVar[ModelTimes | None] = contextvars.ContextVar("flywheel_model_times",
                                                                                 default=None)


class ModelTimes:
    """Wall-clock nanoseconds (``time.time_ns``) of one request's steps in a
    ModelServer; 0 = not reached (the request failed before)."""

    __slots__ = ("decode_start", "decode_end", "encode_start", "encode_end")

    def __init__(self) -> None:
        self.decode_start = self.decode_end = self.encode_start = self.encode_end = 0


class TraceParent:
    """A parsed W3C ``traceparent``: ids as integers, flags as bits."""

    __slots__ = ("trace_id", "span_id", "flags")

    def __init__(self, trace_id: int, span_id: int, flags: int) -> None:
        self.trace_id, self.span_id, self.flags = trace_id, span_id, flags

    @property
    def sampled(self) -> bool:
        return bool(self.flags & 1)

    def __str__(self) -> str:
        return format_traceparent(self.trace_id, self.span_id, self.flags)


def parse_traceparent(value: str | bytes | None) -> TraceParent | None:
    """The W3C trace context in ``value``, or None when it is absent or
    malformed (never raises: a bad header only means a new trace).

    Version ``00`` must be exactly ``00-<32 hex>-<16 hex>-<2 hex>``; a later
    version may add fields after a further ``-`` (read as version 00);
    version ``ff``, upper-case hex and all-zero ids are invalid."""
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    value = value.strip()
    if len(value) < 55 or value[2] != "-" or value[35] != "-" or value[52] != "-":
        return None
    version, trace, span, flags = value[:2], value[3:35], value[36:52], value[53:55]
    if not all(_HEX.match(part) for part in (version, trace, span, flags)) or version == "ff":
        return None
    if len(value) > 55 and (version == "00" or value[55] != "-"):
        return None
    trace_id, span_id = int(trace, 16), int(span, 16)
    if not trace_id or not span_id:
        return None
    return TraceParent(trace_id, span_id, int(flags, 16))


def format_traceparent(trace_id: int, span_id: int, flags: int = 1) -> str:
    """A version-00 ``traceparent`` for these ids."""
    return f"00-{trace_id:032x}-{span_id:016x}-{flags & 0xFF:02x}"


def _otel():
    # the tracing extra, imported only once tracing is on (ConfigError with
    # the install command when it is missing)
    require_extra("tracing", ("opentelemetry.trace", "opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http"),
                  "server.tracing")
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    return trace, OTLPSpanExporter, Resource, TracerProvider, BatchSpanProcessor, ParentBased, TraceIdRatioBased


class Tracer:
    """Builds and exports the spans of traced requests (one per ingress
    replica). Construct only when tracing is on: it imports OpenTelemetry
    and starts the exporter's thread. Thread-safe as OpenTelemetry's SDK is;
    used from the ingress loop."""

    def __init__(self, config: TracingConfig) -> None:
        trace, exporter, resource, provider_cls, processor, parent_based, ratio = _otel()
        # With the collector away, the SDK's span queue fills and it warns
        # once per dropped span: thousands of lines a second, each costing
        # more than the request's own spans. The exporter still logs each
        # failed export (its own logger), which says the same once a second.
        logging.getLogger(_QUEUE_LOGGER).setLevel(logging.ERROR)
        self._trace = trace
        self._provider = provider_cls(
            resource=resource.create({"service.name": config.service_name}),
            sampler=parent_based(ratio(config.sample_ratio)),
        )
        # a batch goes out each second (the SDK's default is 5 s): spans show
        # up promptly and fewer are lost with a replica that dies
        self._provider.add_span_processor(processor(exporter(endpoint=config.otlp_endpoint),
                                                    schedule_delay_millis=EXPORT_EVERY_MS))
        self._tracer = self._provider.get_tracer("flywheel.serving")
        self._server_kind = trace.SpanKind.SERVER

    def close(self) -> None:
        """Export what is queued (bounded by the exporter's timeout), then stop."""
        self._provider.shutdown()

    def _parent(self, incoming: TraceParent | None):
        if incoming is None:
            return None
        t = self._trace
        ctx = t.SpanContext(incoming.trace_id, incoming.span_id, is_remote=True,
                            trace_flags=t.TraceFlags(incoming.flags & 1))
        return t.set_span_in_context(t.NonRecordingSpan(ctx))

    def record(self, r: RequestRecord) -> str | None:
        """Emit the spans of one finished request; returns the
        ``traceparent`` that names its request span (None if not sampled)."""
        attrs: dict[str, Any] = {"flywheel.transport": r.transport, "flywheel.outcome": r.outcome}
        if r.model:
            attrs["flywheel.model"] = r.model
            attrs["flywheel.model_version"] = r.version
        if r.batch_rows:
            attrs["flywheel.batch_rows"] = r.batch_rows
        tracer = self._tracer
        root = tracer.start_span("infer", context=self._parent(r.incoming), kind=self._server_kind,
                                 start_time=r.start, attributes=attrs)
        sc = root.get_span_context()
        if not sc.trace_flags.sampled:
            root.end(end_time=r.end)
            return None
        ctx = self._trace.set_span_in_context(root)
        for name, start, end, derived in r.steps():
            child = tracer.start_span(name, context=ctx, start_time=start, attributes=(
                {"flywheel.span.derived": True} if derived else None))
            child.end(end_time=max(start, end))
        root.end(end_time=r.end)
        return format_traceparent(sc.trace_id, sc.span_id, int(sc.trace_flags))


class RequestRecord:
    """Timestamps (``time.time_ns``) of one traced request, filled by the
    data plane as it goes; turned into spans by :meth:`Tracer.record`."""

    __slots__ = ("incoming", "transport", "start", "routed", "sent", "end", "model", "version",
                 "outcome", "batch_rows", "queue_ns", "compute_ns", "times")

    def __init__(self, incoming: TraceParent | None, transport: str) -> None:
        self.incoming, self.transport = incoming, transport
        self.start = time.time_ns()
        self.routed = self.sent = self.end = 0
        self.model = self.version = ""
        self.outcome = "ok"
        self.batch_rows = self.queue_ns = self.compute_ns = 0
        self.times = ModelTimes()

    def steps(self) -> list[tuple[str, int, int, bool]]:
        """(name, start, end, derived) of each child span that happened."""
        out = [("route", self.start, self.routed or self.end, False)]
        if not self.sent:  # routing failed: nothing reached a model
            return out
        t = self.times
        if t.decode_start:  # measured in this process (a colocated model)
            out.append(("decode", t.decode_start, t.decode_end or self.end, False))
            if t.decode_end and (self.queue_ns or self.compute_ns or t.encode_start):
                q_end = t.decode_end + self.queue_ns
                out.append(("queue", t.decode_end, q_end, False))
                out.append(("compute", q_end, q_end + self.compute_ns, False))
            if t.encode_start:
                out.append(("encode", t.encode_start, t.encode_end or self.end, False))
            return out
        # a dedicated replica: only queue and compute are known exactly
        q_start = max(self.sent, self.end - self.queue_ns - self.compute_ns)
        out.append(("decode", self.sent, q_start, True))
        if self.queue_ns or self.compute_ns:
            out.append(("queue", q_start, q_start + self.queue_ns, False))
            out.append(("compute", q_start + self.queue_ns, q_start + self.queue_ns + self.compute_ns, False))
            out.append(("encode", q_start + self.queue_ns + self.compute_ns, self.end, True))
        return out
