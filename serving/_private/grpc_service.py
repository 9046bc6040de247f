"""The V2 gRPC service (``inference.GRPCInferenceService``) over the Router.

Served by grpc.aio on the ingress's own loop. ModelInfer is registered with
no (de)serializers: the request bytes go to the model replica as they came,
and its serialized response comes back as it is; only the routing fields are
read here (grpc_codec.peek_route).
"""

from __future__ import annotations

import grpc

from flywheel.runtime.errors import FlywheelError
from flywheel.serving._private.auth import Authenticator
from flywheel.serving._private.endpoint_http import MAX_PEEK_BYTES
from flywheel.serving._private.grpc_codec import peek_fields
from flywheel.serving._private.grpc_errors import grpc_status_for
from flywheel.serving._private.proto import inference_pb2 as pb
from flywheel.serving._private.wire import OP_INFER_GRPC, Call
from flywheel.serving.router import EXTENSIONS, SERVER_NAME, SERVER_VERSION, Router

SERVICE = "inference.GRPCInferenceService"
VERSION_KEY = "flywheel-model-version"  # trailing metadata: the variant that answered
REQUEST_ID_KEY = "flywheel-request-id"  # request and trailing metadata: the id feedback names


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


def _unary(fn, request_type):
    return grpc.unary_unary_rpc_method_handler(
        fn, request_deserializer=request_type.FromString, response_serializer=lambda m: m.SerializeToString()
    )


class GrpcService:
    def __init__(self, router: Router) -> None:
        self._router = router

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "ServerLive": _unary(self.server_live, pb.ServerLiveRequest),
                "ServerReady": _unary(self.server_ready, pb.ServerReadyRequest),
                "ModelReady": _unary(self.model_ready, pb.ModelReadyRequest),
                "ServerMetadata": _unary(self.server_metadata, pb.ServerMetadataRequest),
                "ModelMetadata": _unary(self.model_metadata, pb.ModelMetadataRequest),
                # raw bytes both ways: decoded once, in the replica
                "ModelInfer": grpc.unary_unary_rpc_method_handler(self.model_infer),
            },
        )

    async def server_live(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request, context):
        return pb.ServerReadyResponse(ready=self._router.all_ready())

    async def _resolve(self, name: str, version: str, context):
        try:
            return self._router.resolve(name, version)
        except FlywheelError as exc:
            await context.abort(grpc_status_for(exc.code), exc.message)

    async def model_ready(self, request, context):
        model = await self._resolve(request.name, request.version, context)
        return pb.ModelReadyResponse(ready=model.ready)

    async def server_metadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    async def model_metadata(self, request, context):
        model = await self._resolve(request.name, request.version, context)
        meta = self._router.metadata(model)
        if meta is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"model {request.name!r} is not ready")
        tensor = lambda t: pb.ModelMetadataResponse.TensorMetadata(**t)  # noqa: E731
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensor(t) for t in meta["inputs"]], outputs=[tensor(t) for t in meta["outputs"]],
        )

    async def model_infer(self, request: bytes, context) -> bytes:
        try:
            name, version, rid = peek_fields(request)
            ep = self._router.endpoint(name)
            key = None
            if ep.tracked:
                meta = dict(context.invocation_metadata() or ())
                rid = rid or meta.get(REQUEST_ID_KEY) or None
                if ep.needs_key and not version:
                    key = meta.get(ep.sticky_header.decode())
                    if key is None and ep.sticky_parameter and len(request) <= MAX_PEEK_BYTES:
                        key = _parameter(request, ep.sticky_parameter)
            model = self._router.resolve(name, version, key)
        except FlywheelError as exc:
            await context.abort(grpc_status_for(exc.code), exc.message)
        remaining = context.time_remaining()
        timeout_ms = max(1, int(remaining * 1000)) if remaining is not None else 0
        call = Call(OP_INFER_GRPC, request, 0, min(timeout_ms, 0xFFFFFFFF))
        reply = await self._router.forward(model, call)
        if reply.code:
            await context.abort(grpc_status_for(reply.code), reply.payload.decode("utf-8", "replace"))
        rid = self._router.routed(ep, model, call, reply, rid or None, bool(version))
        trailing = ((VERSION_KEY, model.route.version), (REQUEST_ID_KEY, rid)) if rid else ((VERSION_KEY, model.route.version),)
        context.set_trailing_metadata(trailing)
        return reply.payload


_PUBLIC = frozenset(("ServerLive", "ServerReady"))


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """The one auth check for gRPC: every method but ServerLive/ServerReady
    needs the predict role; per-key concurrency is held for the call."""

    def __init__(self, auth: Authenticator) -> None:
        self._auth = auth

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.rsplit("/", 1)[-1] in _PUBLIC:
            return handler
        auth = self._auth
        metadata = dict(details.invocation_metadata or ())
        try:
            key_id = auth.authenticate(metadata.get("authorization"), "predict", details.method)
        except FlywheelError as exc:
            refused = exc

            async def refuse(request, context):
                await context.abort(grpc_status_for(refused.code), refused.message)

            # raw bytes in: nothing of an unauthenticated request is parsed
            return grpc.unary_unary_rpc_method_handler(refuse, response_serializer=handler.response_serializer)
        inner = handler.unary_unary

        async def guarded(request, context):
            try:
                auth.acquire(key_id)
            except FlywheelError as exc:
                await context.abort(grpc_status_for(exc.code), exc.message)
            try:
                return await inner(request, context)
            finally:
                auth.release(key_id)

        return grpc.unary_unary_rpc_method_handler(
            guarded, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


async def start_grpc_server(
    router: Router, host: str, port: int, *, max_message_bytes: int, auth: Authenticator | None = None
) -> grpc.aio.Server:
    """Start grpc.aio on the running loop at host:port."""
    server = grpc.aio.server(
        interceptors=[AuthInterceptor(auth)] if auth is not None else None,
        options=[
            # shared by this deployment's ingress replicas (the kernel spreads
            # connections); deploy() refuses a port another process holds
            ("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", -1),
        ]
    )
    server.add_generic_rpc_handlers((GrpcService(router).handler(),))
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise OSError(f"cannot bind gRPC on {host}:{port}")
    await server.start()
    return server
