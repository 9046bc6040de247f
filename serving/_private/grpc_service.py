"""The V2 gRPC service (``inference.GRPCInferenceService``) over the Router.

:class:`GrpcCalls` is the service itself, on bytes: a method's serialized
request and the caller's metadata in, the serialized response and trailing
metadata out, a FlywheelError for any other status. Two transports carry it:
the HTTP/2 front (``grpc_front.py``: HAProxy terminates HTTP/2 and hands each
call to this process as HTTP/1.1, the fast path) and grpc.aio
(:func:`start_grpc_server`, where no HAProxy binary is found). ModelInfer's
request bytes go to the model as they came and its serialized response comes
back as it is; only the routing fields are read here (grpc_codec.peek_fields).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc

from flywheel.protocol.errors import FlywheelError, InvalidInputError, UnavailableError, error_from_code
from flywheel.serving.auth import Authenticator
from flywheel.serving._private.endpoint_http import MAX_PEEK_BYTES
from flywheel.protocol.grpc_codec import peek_fields
from flywheel.serving._private.grpc_errors import grpc_status_for
from flywheel.protocol.proto import inference_pb2 as pb
from flywheel.serving._private.wire import OP_INFER_GRPC, Call
from flywheel.serving.router import EXTENSIONS, SERVER_NAME, SERVER_VERSION, Router

SERVICE = "inference.GRPCInferenceService"
VERSION_KEY = "flywheel-model-version"  # trailing metadata: the variant that answered
REQUEST_ID_KEY = "flywheel-request-id"  # request and trailing metadata: the id feedback names

Metadata = Callable[[str], "str | None"]  # the caller's metadata value for a (lower-case) key
Trailing = tuple[tuple[str, str], ...]
Method = Callable[[bytes, Metadata, "float | None"], Awaitable[tuple[bytes, Trailing]]]

_PUBLIC = frozenset(("ServerLive", "ServerReady"))  # health probes need no key


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


class GrpcCalls:
    """The V2 gRPC methods over the Router, for any transport."""

    def __init__(self, router: Router, auth: Authenticator | None = None) -> None:
        self._router = router
        self._auth = auth
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
        needs the predict role; the key's concurrency slot is held for the
        call. Nothing of an unauthenticated request is parsed."""
        fn = self.methods[method]
        auth = self._auth
        if auth is None or method in _PUBLIC:
            return await fn(request, metadata, timeout_s)
        key_id = auth.authenticate(metadata("authorization"), "predict", f"/{SERVICE}/{method}")
        auth.acquire(key_id)
        try:
            return await fn(request, metadata, timeout_s)
        finally:
            auth.release(key_id)

    async def server_live(self, request: bytes, metadata: Metadata, timeout_s):
        return pb.ServerLiveResponse(live=True).SerializeToString(), ()

    async def server_ready(self, request: bytes, metadata: Metadata, timeout_s):
        return pb.ServerReadyResponse(ready=self._router.all_ready()).SerializeToString(), ()

    async def model_ready(self, request: bytes, metadata: Metadata, timeout_s):
        req = _parse(pb.ModelReadyRequest, request)
        model = self._router.resolve(req.name, req.version)
        return pb.ModelReadyResponse(ready=model.ready).SerializeToString(), ()

    async def server_metadata(self, request: bytes, metadata: Metadata, timeout_s):
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS
        ).SerializeToString(), ()

    async def model_metadata(self, request: bytes, metadata: Metadata, timeout_s):
        req = _parse(pb.ModelMetadataRequest, request)
        model = self._router.resolve(req.name, req.version)
        meta = self._router.metadata(model)
        if meta is None:
            raise UnavailableError(f"model {req.name!r} is not ready")
        tensor = lambda t: pb.ModelMetadataResponse.TensorMetadata(**t)  # noqa: E731
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensor(t) for t in meta["inputs"]], outputs=[tensor(t) for t in meta["outputs"]],
        ).SerializeToString(), ()

    async def model_infer(self, request: bytes, metadata: Metadata, timeout_s: float | None):
        name, version, rid = peek_fields(request)
        ep = self._router.endpoint(name)
        key = None
        if ep.tracked:
            rid = rid or metadata(REQUEST_ID_KEY) or None
            if ep.needs_key and not version:
                key = metadata(ep.sticky_header.decode())
                if key is None and ep.sticky_parameter and len(request) <= MAX_PEEK_BYTES:
                    key = _parameter(request, ep.sticky_parameter)
        model = self._router.resolve(name, version, key)
        timeout_ms = max(1, int(timeout_s * 1000)) if timeout_s is not None else 0
        call = Call(OP_INFER_GRPC, request, 0, min(timeout_ms, 0xFFFFFFFF))
        reply = await self._router.forward(model, call)
        if reply.code:
            raise error_from_code(reply.code, reply.payload.decode("utf-8", "replace"))
        rid = self._router.routed(ep, model, call, reply, rid or None, bool(version))
        if rid:
            return reply.payload, ((VERSION_KEY, model.route.version), (REQUEST_ID_KEY, rid))
        return reply.payload, ((VERSION_KEY, model.route.version),)


def _grpcio_handler(calls: GrpcCalls) -> grpc.GenericRpcHandler:
    """Every method with raw bytes both ways (parsed in GrpcCalls)."""

    def bind(method: str):
        async def handle(request: bytes, context) -> bytes:
            metadata = dict(context.invocation_metadata() or ())
            try:
                body, trailing = await calls.call(method, request, metadata.get, context.time_remaining())
            except FlywheelError as exc:
                await context.abort(grpc_status_for(exc.code), exc.message)
            if trailing:
                context.set_trailing_metadata(trailing)
            return body

        return grpc.unary_unary_rpc_method_handler(handle)

    return grpc.method_handlers_generic_handler(SERVICE, {m: bind(m) for m in calls.methods})


async def start_grpc_server(
    router: Router, host: str, port: int, *, max_message_bytes: int, auth: Authenticator | None = None
) -> grpc.aio.Server:
    """Start grpc.aio on the running loop at host:port."""
    server = grpc.aio.server(
        options=[
            # shared by this deployment's ingress replicas (the kernel spreads
            # connections); deploy() refuses a port another process holds
            ("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", -1),
        ]
    )
    server.add_generic_rpc_handlers((_grpcio_handler(GrpcCalls(router, auth)),))
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise OSError(f"cannot bind gRPC on {host}:{port}")
    await server.start()
    return server
