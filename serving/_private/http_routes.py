"""V2 HTTP routes (PROTOCOL.md): the HTTP adapter of the data plane.

Inference and metadata are decided in ``dataplane.py``, as for gRPC; here
a request is authenticated, its path and headers decoded, the data plane
called, and its answer (or FlywheelError, through ``http_errors``) encoded.
What only HTTP serves is here too: Prometheus metrics, drift history,
feedback and endpoint management (the last two in ``endpoint_http.py``),
approvals, which act as the caller's API key (``approval_http.py``), the
console's registry, audit and jobs API (``console_http.py``) and drift
history as series (``drift_http.py``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from flywheel.protocol.codec import encode_json
from flywheel.protocol.errors import FlywheelError
from flywheel.serving.auth import Authenticator
from flywheel.serving.capture import local_captures, render_capture_metrics
from flywheel.serving._private import approval_http, console_http, loops_http
from flywheel.serving._private.dataplane import MAX_PEEK_BYTES, DataPlane
from flywheel.serving._private.drift_http import shape_history
from flywheel.serving._private.endpoint_http import Manage, endpoint_route, feedback
from flywheel.serving._private.http_errors import error_for, error_for_code, error_response, method_not_allowed
from flywheel.serving._private.http_server import JSON, Request, Response
from flywheel.serving._private.console_ui import ConsoleFiles
from flywheel.serving._private.tracing import TraceParent, parse_traceparent
from flywheel.serving._private.live_endpoint import render_endpoint_metrics
from flywheel.serving._private.openapi import openapi_document
from flywheel.serving._private.wire import OP_DRIFT_HISTORY, OP_INFER, OP_METRICS, Call, ReplicaChannel, Reply
from flywheel.serving.router import Decision, ModelEntry

_EMPTY: Response = (200, b"", JSON)
_METRICS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
_BINARY = b"application/octet-stream"
_HEADER_LENGTH = b"inference-header-content-length"
_GET = ("GET", "HEAD")  # HEAD answered as GET; the server drops the body
_POST = ("POST",)


def role_for(path: str, method: str = "GET") -> str | None:
    """The role a route needs; None for the health checks (load balancers
    and orchestrators probe them without credentials). Decided on the same
    split path that routing uses, so that ``//v2/...`` cannot dodge it.
    Unknown routes need predict, so that nobody can map the API without a key."""
    if path in ("/v2/health/live", "/v2/health/ready"):
        return None
    parts = path.strip("/").split("/")
    if parts[0] == "console":  # the console's files hold no data; what they fetch needs a key
        return None
    if approval_http.is_approval(parts):
        return approval_http.ROLE
    if parts[:2] == ["v2", "loops"]:
        return loops_http.required_role(method, parts[2:])
    if len(parts) >= 2 and parts[0] == "v2" and parts[1] in console_http.PREFIXES:
        return console_http.required_role(method, parts[1:])
    if parts == ["metrics"] or (parts[:2] == ["v2", "models"] and parts[-1] == "drift") or parts[:2] == ["v2", "drift"]:
        return "operate"
    if parts[:2] == ["v2", "endpoints"]:  # routing management and its status
        return "operate"
    return "predict"


def model_for(path: str) -> str | None:
    """The model (endpoint) name a route addresses, for a key's scopes:
    ``/v2/models/{name}/...`` and ``/v2/endpoints/{name}/...``; None for
    the server-wide routes (``/v2/endpoints`` itself lists every endpoint,
    like /metrics, and is governed by role alone). Split as routing splits."""
    parts = path.strip("/").split("/")
    if len(parts) >= 3 and parts[0] == "v2" and parts[1] in ("models", "endpoints", "drift"):
        return parts[2]
    if parts[:1] == ["v2"]:
        return console_http.model_for(parts[1:])
    return None


class HttpRoutes:
    """``handle`` maps a parsed request to a Response (or an awaitable one)."""

    def __init__(
        self, plane: DataPlane, monitor: ReplicaChannel | None = None, auth: Authenticator | None = None,
        manage: Manage | None = None, loops: loops_http.LoopsHttp | None = None,
        console: console_http.ConsoleHttp | None = None,
    ) -> None:
        """``manage(op, name, body)``: the router controller's management
        call (None: no controller; the /v2/endpoints routes answer 404).
        ``loops``: the deployment's continuous-training loops (None: none;
        /v2/loops answers 404). ``console``: the registry, audit and jobs
        routes (None: no registry configured; they answer 404)."""
        self._plane = plane
        self._router = plane.router
        self._monitor = monitor
        self._auth = auth
        self._manage = manage
        self._loops = loops
        self._console = console
        self._server_meta = encode_json(plane.server_metadata())  # fixed: encoded once
        self._openapi = encode_json(openapi_document())
        self._console_files = ConsoleFiles()

    def handle(self, req: Request):
        """Authenticate (when on), then route. The one auth check for HTTP."""
        if self._auth is None:
            return self._route(req, None)
        need = role_for(req.path, req.method)
        if need is None:
            return self._route(req, None)
        auth = self._auth
        try:
            credentials = req.headers.get(b"authorization")
            route = f"{req.method} {req.path}"
            key_id = auth.authenticate(credentials.decode("latin-1") if credentials else None, need, route)
            if auth.is_scoped(key_id):
                auth.check_model(key_id, model_for(req.path), route)
            auth.acquire(key_id)
        except FlywheelError as exc:
            return error_for(exc)
        try:
            resp = self._route(req, key_id)
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

    def _route(self, req: Request, key_id: str | None):
        """``key_id``: the caller's API key (None: auth off, or a route that
        needs none), for the routes that act as the caller (approvals)."""
        path = req.path
        if path == "/v2/health/live":
            return self._only(_GET, req) or (
                _EMPTY if self._plane.server_live() else error_response(503, "the server is not live")
            )
        if path == "/v2/health/ready":
            return self._only(_GET, req) or (
                _EMPTY if self._plane.server_ready() else error_response(503, "not every model is ready")
            )
        if path == "/v2" or path == "/v2/":
            return self._only(_GET, req) or (200, self._server_meta, JSON)
        if path == "/metrics":
            return self._only(_GET, req) or self._metrics()
        if path == "/v2/openapi.json":
            return self._only(_GET, req) or (200, self._openapi, JSON)
        parts = path.strip("/").split("/")
        if parts[0] == "console":
            return self._console_files.serve(req, parts[1:])
        if len(parts) >= 2 and parts[0] == "v2" and parts[1] == "endpoints":
            return endpoint_route(self._manage, req, parts[2:])
        if len(parts) >= 2 and parts[0] == "v2" and parts[1] == "loops":
            if self._loops is None:
                return error_response(404, "this deployment runs no loops (a config's `loops:` section adds them)")
            return self._loops.route(req, parts[2:], self._auth, key_id)
        if len(parts) >= 2 and parts[0] == "v2" and parts[1] == "drift":
            return self._drift_series(req, parts[2:])
        if len(parts) >= 2 and parts[0] == "v2" and parts[1] in console_http.PREFIXES:
            if self._console is None:
                return error_response(404, "this server has no registry configured (the config's `registry:`)")
            return self._console.route(req, parts[1:], self._auth, key_id)
        if len(parts) < 3 or parts[0] != "v2" or parts[1] != "models":
            return error_response(404, f"no route {req.method} {path}")
        if approval_http.is_approval(parts):
            return approval_http.approve_route(self._manage, req, parts, self._auth, key_id)
        return self._model_route(req, parts[2], parts[3:])

    @staticmethod
    def _only(allowed: tuple[str, ...], req: Request) -> Response | None:
        if req.method not in allowed:
            return method_not_allowed(req.path, req.method, allowed)
        return None

    def _model_route(self, req: Request, name: str, rest: list[str]):
        version = None
        if rest[:1] == ["versions"]:
            if len(rest) < 2 or not rest[1]:
                return error_response(404, f"no route {req.method} {req.path}")
            version, rest = rest[1], rest[2:]
        action = rest[0] if rest else ""
        if len(rest) > 1 or action not in ("", "ready", "infer", "drift", "feedback"):
            return error_response(404, f"no route {req.method} {req.path}")
        if action in ("infer", "feedback"):
            if req.method != "POST":
                return method_not_allowed(req.path, req.method, _POST)
            if action == "feedback":
                if version is not None:
                    return error_response(404, f"no route {req.method} {req.path} (feedback goes to /v2/models/{name}/feedback)")
                return feedback(self._router, self._manage, name, req.body)
            return self._infer(name, version, req)
        try:
            if req.method not in _GET:
                self._plane.model(name, version)  # an unknown model is a 404 whatever the method
                return self._only(_GET, req)
            if action == "ready":
                if self._plane.model_ready(name, version):
                    return _EMPTY
                return error_response(503, f"model {name!r} is not ready")
            if action == "drift":
                return self._drift(self._plane.model(name, version))
            return 200, encode_json(self._plane.model_metadata(name, version)), JSON
        except FlywheelError as exc:
            return error_for_code(exc.code, exc.message)

    def _infer(self, name: str, version: str | None, req: Request):
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
        return self._plane.infer(name, version, None, Call(OP_INFER, req.body, header_length), req, _HttpInfer)

    def _metrics(self):
        own = (self._router.metrics.render() + render_endpoint_metrics(self._router.endpoints())
               + render_capture_metrics(local_captures(self._router)))
        if self._monitor is None and self._loops is None:
            return 200, own, _METRICS_TYPE
        return self._with_other_metrics(own)

    async def _with_other_metrics(self, own: bytes) -> Response:
        # Distinct metric families: the expositions concatenate validly.
        extra = b""
        if self._monitor is not None:
            try:
                reply = await asyncio.wait_for(self._monitor.call(Call(OP_METRICS, b"")), 2)
                extra = reply.payload if reply.code == 0 else b""
            except (FlywheelError, asyncio.TimeoutError):
                pass
        if self._loops is not None:
            extra += await self._loops.metrics()
        return 200, own + extra, _METRICS_TYPE

    def _drift(self, model: ModelEntry, shaped: bool = False):
        if self._monitor is None:
            return error_response(404, f"drift monitoring is not enabled for {model.route.name!r}")
        return self._drift_history(model, shaped)

    def _drift_series(self, req: Request, parts: list[str]):
        """``/v2/drift/{name}[?version=V]``: the history as series (drift_http.py)."""
        if len(parts) != 1 or not parts[0]:
            return error_response(404, f"no route {req.method} {req.path}")
        try:
            version = console_http.text_param(console_http.query(req, ("version",)), "version")
            model = self._plane.model(parts[0], version)  # an unknown name is a 404 whatever the method
        except console_http.FieldError as exc:
            return console_http.bad(exc.field, exc.message)
        except FlywheelError as exc:
            return error_for_code(exc.code, exc.message)
        return self._only(_GET, req) or self._drift(model, shaped=True)

    async def _drift_history(self, model: ModelEntry, shaped: bool) -> Response:
        route = model.route
        body = encode_json({"model": route.name, "version": route.version})
        try:
            reply = await asyncio.wait_for(self._monitor.call(Call(OP_DRIFT_HISTORY, body)), 5)
        except (FlywheelError, asyncio.TimeoutError) as exc:
            return error_response(503, f"drift monitor unavailable: {exc}")
        if reply.code:
            return error_for_code(reply.code, reply.payload.decode("utf-8", "replace"))
        if shaped:
            history = msgspec.json.decode(reply.payload)
            return 200, encode_json(shape_history(route.name, route.version, history)), JSON
        return 200, reply.payload, JSON


_REQUEST_ID = b"flywheel-request-id"
_TRACEPARENT = b"traceparent"


def _header(req: Request, name: bytes) -> str | None:
    value = req.headers.get(name)
    return value.decode("latin-1") if value else None


class _HttpInfer:
    """The data plane's InferCodec for V2 HTTP (``source``: the Request)."""

    @staticmethod
    def routing_fields(req: Request, call: Call, request_id: str | None, key_header: bytes | None,
                       key_parameter: str) -> tuple[str | None, str | None]:
        # headers first (``request_id`` is None: HTTP reads none before
        # routing); the body (its JSON header when binary) is parsed only
        # for what they did not give
        rid = _header(req, _REQUEST_ID)
        key = _header(req, key_header) if key_header is not None else None
        want = key_parameter if key is None else ""
        if rid is None or want:
            body_id, body_key = routing_fields(call.payload, call.aux, want)
            rid, key = rid or body_id, key or body_key
        return rid, key

    @staticmethod
    def answer(req: Request, d: Decision, reply: Reply) -> Response:
        extra = response_headers(d.model.route.version, d.request_id)
        if reply.aux:  # binary outputs follow a JSON header of this length
            return 200, reply.payload, _BINARY, extra + b"inference-header-content-length: %d\r\n" % reply.aux
        return 200, reply.payload, JSON, extra

    @staticmethod
    def failed(exc: FlywheelError) -> Response:
        return error_for_code(exc.code, exc.message)

    TRANSPORT = "http"

    @staticmethod
    def traceparent(req: Request) -> TraceParent | None:
        return parse_traceparent(req.headers.get(_TRACEPARENT))

    @staticmethod
    def with_trace(resp: Response, traceparent: str) -> Response:
        head = b"traceparent: " + traceparent.encode() + b"\r\n"
        if len(resp) == 3:
            return resp + (head,)
        return resp[:3] + (resp[3] + head,) + resp[4:]


def response_headers(version: str, request_id: str | None) -> bytes:
    """The headers naming who answered: the variant, and the request id
    that feedback names (when there is one)."""
    head = b"flywheel-model-version: " + version.encode() + b"\r\n"
    if request_id:
        head += b"flywheel-request-id: " + request_id.encode("latin-1", "replace") + b"\r\n"
    return head


class _Routing(msgspec.Struct):
    id: str | None = None
    parameters: dict[str, Any] | None = None


_ROUTING = msgspec.json.Decoder(_Routing)


def routing_fields(body: bytes, header_length: int, parameter: str) -> tuple[str | None, str | None]:
    """(request id, sticky key) from a V2 JSON request (its JSON header when
    binary). A malformed or large body yields neither: the model server
    will reject a malformed one with the precise error."""
    head = body[:header_length] if header_length else body
    if len(head) > MAX_PEEK_BYTES:
        return None, None
    try:
        fields = _ROUTING.decode(head)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None, None
    key = (fields.parameters or {}).get(parameter) if parameter else None
    return fields.id or None, None if key is None else str(key)
