"""V2 HTTP routes (PROTOCOL.md) on top of the Router."""

from __future__ import annotations

import asyncio

from flywheel.runtime.codec import encode_json
from flywheel.runtime.errors import FlywheelError
from flywheel.serving._private.auth import Authenticator
from flywheel.serving._private.http_errors import error_for_code, error_response
from flywheel.serving._private.http_server import JSON, Request, Response
from flywheel.serving._private.openapi import openapi_document
from flywheel.serving._private.wire import OP_DRIFT_HISTORY, OP_INFER, OP_METRICS, Call, ReplicaChannel
from flywheel.serving.router import EXTENSIONS, SERVER_NAME, SERVER_VERSION, ModelEntry, Router

_EMPTY: Response = (200, b"", JSON)
_METRICS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
_BINARY = b"application/octet-stream"
_HEADER_LENGTH = b"inference-header-content-length"


def role_for(path: str) -> str | None:
    """The role a route needs; None for the health checks (load balancers
    and orchestrators probe them without credentials). Decided on the same
    split path that routing uses, so that ``//v2/...`` cannot dodge it.
    Unknown routes need predict, so that nobody can map the API without a key."""
    if path in ("/v2/health/live", "/v2/health/ready"):
        return None
    parts = path.strip("/").split("/")
    if parts == ["metrics"] or (parts[:2] == ["v2", "models"] and parts[-1] == "drift"):
        return "operate"
    return "predict"


class HttpRoutes:
    """``handle`` maps a parsed request to a Response (or an awaitable one)."""

    def __init__(
        self, router: Router, monitor: ReplicaChannel | None = None, auth: Authenticator | None = None
    ) -> None:
        self._router = router
        self._monitor = monitor
        self._auth = auth
        self._server_meta = encode_json(
            {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(EXTENSIONS)}
        )
        self._openapi = encode_json(openapi_document())

    def handle(self, req: Request):
        """Authenticate (when on), then route. The one auth check for HTTP."""
        if self._auth is None:
            return self._route(req)
        need = role_for(req.path)
        if need is None:
            return self._route(req)
        try:
            credentials = req.headers.get(b"authorization")
            key_id = self._auth.authenticate(
                credentials.decode("latin-1") if credentials else None, need, f"{req.method} {req.path}"
            )
            self._auth.acquire(key_id)
        except FlywheelError as exc:
            return error_for_code(exc.code, exc.message)
        try:
            resp = self._route(req)
        except BaseException:
            self._auth.release(key_id)
            raise
        if type(resp) is tuple:
            self._auth.release(key_id)
            return resp
        # held until the answer is ready, however it ends (a done callback
        # rather than a wrapping coroutine: one frame less per request)
        task = asyncio.ensure_future(resp)
        task.add_done_callback(lambda _t: self._auth.release(key_id))
        return task

    def _route(self, req: Request):
        path = req.path
        if path == "/v2/health/live":
            return self._only("GET", req) or _EMPTY
        if path == "/v2/health/ready":
            return self._only("GET", req) or (
                _EMPTY if self._router.all_ready() else error_response(503, "not every model is ready")
            )
        if path == "/v2" or path == "/v2/":
            return self._only("GET", req) or (200, self._server_meta, JSON)
        if path == "/metrics":
            return self._only("GET", req) or self._metrics()
        if path == "/v2/openapi.json":
            return self._only("GET", req) or (200, self._openapi, JSON)
        parts = path.strip("/").split("/")
        if len(parts) < 3 or parts[0] != "v2" or parts[1] != "models":
            return error_response(404, f"no route {req.method} {path}")
        return self._model_route(req, parts[2], parts[3:])

    @staticmethod
    def _only(method: str, req: Request) -> Response | None:
        if req.method != method:
            return error_response(405, f"{req.path} takes {method}, not {req.method}")
        return None

    def _model_route(self, req: Request, name: str, rest: list[str]):
        version = None
        if rest[:1] == ["versions"]:
            if len(rest) < 2 or not rest[1]:
                return error_response(404, f"no route {req.method} {req.path}")
            version, rest = rest[1], rest[2:]
        action = rest[0] if rest else ""
        if len(rest) > 1 or action not in ("", "ready", "infer", "drift"):
            return error_response(404, f"no route {req.method} {req.path}")
        try:
            model = self._router.resolve(name, version)
        except FlywheelError as exc:
            return error_for_code(exc.code, exc.message)
        if action == "infer":
            if req.method != "POST":
                return error_response(405, f"{req.path} takes POST, not {req.method}")
            return self._infer(model, req)
        bad = self._only("GET", req)
        if bad:
            return bad
        if action == "ready":
            return _EMPTY if model.ready else error_response(503, f"model {name!r} is not ready")
        if action == "drift":
            return self._drift(model)
        meta = self._router.metadata(model)
        if meta is None:
            return error_response(503, f"model {name!r} is not ready")
        return 200, encode_json(meta), JSON

    def _infer(self, model: ModelEntry, req: Request):
        raw = req.headers.get(_HEADER_LENGTH)
        header_length = 0
        if raw is not None:
            if not raw.strip().isdigit() or int(raw) == 0:
                return error_response(400, f"Inference-Header-Content-Length {raw!r} must be a positive integer")
            header_length = int(raw)
            if header_length > len(req.body):
                return error_response(
                    400,
                    f"Inference-Header-Content-Length {header_length} exceeds the body's {len(req.body)} bytes",
                )
        return self._forward(model, Call(OP_INFER, req.body, header_length))

    def _metrics(self):
        own = self._router.metrics.render()
        if self._monitor is None:
            return 200, own, _METRICS_TYPE
        return self._with_monitor_metrics(own)

    async def _with_monitor_metrics(self, own: bytes) -> Response:
        # Distinct metric families: the two expositions concatenate validly.
        try:
            reply = await asyncio.wait_for(self._monitor.call(Call(OP_METRICS, b"")), 2)
            extra = reply.payload if reply.code == 0 else b""
        except (FlywheelError, asyncio.TimeoutError):
            extra = b""
        return 200, own + extra, _METRICS_TYPE

    def _drift(self, model: ModelEntry):
        if self._monitor is None:
            return error_response(404, f"drift monitoring is not enabled for {model.route.name!r}")
        return self._drift_history(model)

    async def _drift_history(self, model: ModelEntry) -> Response:
        route = model.route
        body = encode_json({"model": route.name, "version": route.version})
        try:
            reply = await asyncio.wait_for(self._monitor.call(Call(OP_DRIFT_HISTORY, body)), 5)
        except (FlywheelError, asyncio.TimeoutError) as exc:
            return error_response(503, f"drift monitor unavailable: {exc}")
        if reply.code:
            return error_for_code(reply.code, reply.payload.decode("utf-8", "replace"))
        return 200, reply.payload, JSON

    async def _forward(self, model: ModelEntry, call: Call) -> Response:
        reply = await self._router.forward(model, call)
        if reply.code:
            return error_for_code(reply.code, reply.payload.decode("utf-8", "replace"))
        if reply.aux:  # binary outputs follow a JSON header of this length
            return 200, reply.payload, _BINARY, b"inference-header-content-length: %d\r\n" % reply.aux
        return 200, reply.payload, JSON
