"""The V2 gRPC service (``inference.GRPCInferenceService``): the gRPC adapter
of the data plane.

:class:`GrpcCalls` is the service itself, on bytes: a method's serialized
request and the caller's metadata in, the serialized response and trailing
metadata out, a FlywheelError for any other status (mapped in
``grpc_errors``). Each method decodes, calls the data plane
(``dataplane.py``, which decides as it does for HTTP) and encodes. Two
transports carry it: the HTTP/2 front (``grpc_front.py``: HAProxy terminates
HTTP/2 and hands each call to this process as HTTP/1.1, the fast path) and
grpc.aio (:func:`start_grpc_server`, where no HAProxy binary is found).
ModelInfer's request bytes go to the model as they came and its serialized
response comes back as it is; only the routing fields are read here
(grpc_codec.peek_fields).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc

from flywheel.protocol.errors import FlywheelError, InvalidInputError, RateLimitedError
from flywheel.serving.auth import Authenticator
from flywheel.serving._private.dataplane import MAX_PEEK_BYTES, DataPlane
from flywheel.protocol.grpc_codec import peek_fields
from flywheel.serving._private.grpc_errors import grpc_status_for
from flywheel.protocol.proto import inference_pb2 as pb
from flywheel.serving._private.tracing import TRACEPARENT, TraceParent, parse_traceparent
from flywheel.serving._private.wire import OP_INFER_GRPC, Call, Reply
from flywheel.serving.router import Decision

SERVICE = "inference.GRPCInferenceService"
VERSION_KEY = "flywheel-model-version"  # trailing metadata: the variant that answered
REQUEST_ID_KEY = "flywheel-request-id"  # request and trailing metadata: the id feedback names

Metadata = Callable[[str], "str | None"]  # the caller's metadata value for a (lower-case) key
Trailing = tuple[tuple[str, str], ...]
Method = Callable[[bytes, Metadata, "float | None"], Awaitable[tuple[bytes, Trailing]]]

_PUBLIC = frozenset(("ServerLive", "ServerReady"))  # health probes need no key
RETRY_AFTER_KEY = "retry-after"  # trailing metadata of a rate-limited call: whole seconds


def _parameter(request: bytes, name: str) -> str | None:
    """A request parameter's value as text (parses the whole message: only
    for endpoints with a sticky parameter and no sticky metadata key)."""
    try:
        params = pb.ModelInferRequest.FromString(request).parameters
    except Exception:
        return None  # the model server rejects it with the precise error
    if name not in params:
        return None
    p = params[name]
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else str(getattr(p, kind))


def _parse(message_type, request: bytes):
    try:
        return message_type.FromString(request)
    except Exception as exc:
        raise InvalidInputError(f"malformed {message_type.__name__}: {exc}") from None


# The model a method addresses, for a key's scopes (read only for scoped
# keys); the other methods are server-wide.
_MODEL_OF: dict[str, Callable[[bytes], str]] = {
    "ModelReady": lambda request: _parse(pb.ModelReadyRequest, request).name,
    "ModelMetadata": lambda request: _parse(pb.ModelMetadataRequest, request).name,
    "ModelInfer": lambda request: peek_fields(request)[0],
}


class GrpcCalls:
    """The V2 gRPC methods over the data plane, for any transport."""

    def __init__(self, plane: DataPlane, auth: Authenticator | None = None) -> None:
        self._plane = plane
        self._auth = auth
        meta = plane.server_metadata()  # fixed: serialized once
        self._server_meta = pb.ServerMetadataResponse(
            name=meta["name"], version=meta["version"], extensions=meta["extensions"]
        ).SerializeToString()
        self.methods: dict[str, Method] = {
            "ServerLive": self.server_live,
            "ServerReady": self.server_ready,
            "ModelReady": self.model_ready,
            "ServerMetadata": self.server_metadata,
            "ModelMetadata": self.model_metadata,
            "ModelInfer": self.model_infer,
        }

    async def call(self, method: str, request: bytes, metadata: Metadata, timeout_s: float | None):
        """(response bytes, trailing metadata) of ``method`` (a known one).
        The one auth check for gRPC: every method but ServerLive/ServerReady
        needs the predict role, a scoped key the model the call names; the
        key's rate is charged and its concurrency slot held for the call.
        Nothing of an unauthenticated request is parsed."""
        fn = self.methods[method]
        auth = self._auth
        if auth is None or method in _PUBLIC:
            return await fn(request, metadata, timeout_s)
        route = f"/{SERVICE}/{method}"
        key_id = auth.authenticate(metadata("authorization"), "predict", route)
        if auth.is_scoped(key_id):
            model_of = _MODEL_OF.get(method)
            auth.check_model(key_id, model_of(request) if model_of else None, route)
        auth.acquire(key_id)
        try:
            return await fn(request, metadata, timeout_s)
        finally:
            auth.release(key_id)

    async def server_live(self, request: bytes, metadata: Metadata, timeout_s):
        return pb.ServerLiveResponse(live=self._plane.server_live()).SerializeToString(), ()

    async def server_ready(self, request: bytes, metadata: Metadata, timeout_s):
        return pb.ServerReadyResponse(ready=self._plane.server_ready()).SerializeToString(), ()

    async def model_ready(self, request: bytes, metadata: Metadata, timeout_s):
        req = _parse(pb.ModelReadyRequest, request)
        return pb.ModelReadyResponse(ready=self._plane.model_ready(req.name, req.version)).SerializeToString(), ()

    async def server_metadata(self, request: bytes, metadata: Metadata, timeout_s):
        return self._server_meta, ()

    async def model_metadata(self, request: bytes, metadata: Metadata, timeout_s):
        req = _parse(pb.ModelMetadataRequest, request)
        meta = self._plane.model_metadata(req.name, req.version)
        tensor = lambda t: pb.ModelMetadataResponse.TensorMetadata(**t)  # noqa: E731
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensor(t) for t in meta["inputs"]], outputs=[tensor(t) for t in meta["outputs"]],
        ).SerializeToString(), ()

    def model_infer(self, request: bytes, metadata: Metadata, timeout_s: float | None):
        # a plain function returning the data plane's coroutine (one frame
        # less per call); a malformed message raises from it at once
        name, version, rid = peek_fields(request)
        timeout_ms = max(1, int(timeout_s * 1000)) if timeout_s is not None else 0
        call = Call(OP_INFER_GRPC, request, 0, min(timeout_ms, 0xFFFFFFFF))
        return self._plane.infer(name, version, rid or None, call, metadata, _GrpcInfer)


class _GrpcInfer:
    """The data plane's InferCodec for gRPC (``source``: the Metadata reader)."""

    @staticmethod
    def routing_fields(metadata: Metadata, call: Call, request_id: str | None, key_header: bytes | None,
                       key_parameter: str) -> tuple[str | None, str | None]:
        # the message's own id first, then metadata; the sticky key from
        # metadata, else from a parameter (parsing the message, when small)
        rid = request_id or metadata(REQUEST_ID_KEY) or None
        key = None
        if key_header is not None:
            key = metadata(key_header.decode())
            if key is None and key_parameter and len(call.payload) <= MAX_PEEK_BYTES:
                key = _parameter(call.payload, key_parameter)
        return rid, key

    @staticmethod
    def answer(metadata: Metadata, d: Decision, reply: Reply) -> tuple[bytes, Trailing]:
        rid = d.request_id
        if rid:
            return reply.payload, ((VERSION_KEY, d.model.route.version), (REQUEST_ID_KEY, rid))
        return reply.payload, ((VERSION_KEY, d.model.route.version),)

    @staticmethod
    def failed(exc: FlywheelError):
        raise exc  # the transport maps it to a gRPC status (grpc_errors)

    TRANSPORT = "grpc"

    @staticmethod
    def traceparent(metadata: Metadata) -> TraceParent | None:
        return parse_traceparent(metadata(TRACEPARENT))

    @staticmethod
    def with_trace(answer: tuple[bytes, Trailing], traceparent: str) -> tuple[bytes, Trailing]:
        # trailing metadata, beside the variant that answered
        return answer[0], answer[1] + ((TRACEPARENT, traceparent),)


def error_trailers(exc: FlywheelError) -> Trailing:
    """Trailing metadata of a failed call: ``retry-after`` when it is known."""
    if type(exc) is RateLimitedError and exc.retry_after_s is not None:
        return ((RETRY_AFTER_KEY, str(exc.retry_after_whole_s())),)
    return ()


def _grpcio_handler(calls: GrpcCalls) -> grpc.GenericRpcHandler:
    """Every method with raw bytes both ways (parsed in GrpcCalls)."""

    def bind(method: str):
        async def handle(request: bytes, context) -> bytes:
            metadata = dict(context.invocation_metadata() or ())
            try:
                body, trailing = await calls.call(method, request, metadata.get, context.time_remaining())
            except FlywheelError as exc:
                await context.abort(grpc_status_for(exc.code), exc.message, error_trailers(exc))
            if trailing:
                context.set_trailing_metadata(trailing)
            return body

        return grpc.unary_unary_rpc_method_handler(handle)

    return grpc.method_handlers_generic_handler(SERVICE, {m: bind(m) for m in calls.methods})


async def start_grpc_server(
    plane: DataPlane, host: str, port: int, *, max_message_bytes: int, auth: Authenticator | None = None,
    credentials=None, max_connection_age_s: float | None = None,
) -> grpc.aio.Server:
    """Start grpc.aio on the running loop at host:port (over TLS with
    ``credentials``: grpc.ssl_server_credentials). ``max_connection_age_s``:
    connections older than this get GOAWAY (grpc adds its own jitter), so
    clients reconnect and may land on another replica."""
    options = [
        # shared by this deployment's ingress replicas (the kernel spreads
        # connections); deploy() refuses a port another process holds
        ("grpc.so_reuseport", 1),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", -1),
    ]
    if max_connection_age_s is not None:
        options.append(("grpc.max_connection_age_ms", int(max_connection_age_s * 1000)))
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((_grpcio_handler(GrpcCalls(plane, auth)),))
    bound = (server.add_secure_port(f"{host}:{port}", credentials) if credentials is not None
             else server.add_insecure_port(f"{host}:{port}"))
    if bound == 0:
        raise OSError(f"cannot bind gRPC on {host}:{port}")
    await server.start()
    return server
