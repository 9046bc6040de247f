"""The V2 HTTP ingress: every route of the Open Inference Protocol.

Runs as a Ray Serve replica that owns its listening socket (httptools on its
own uvloop thread). It parses only the request line and headers; infer bodies
go unchanged to the model's replicas over the internal frame protocol, which
decode, validate, batch, run and encode. Metadata is fetched from each model
once and answered locally.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import msgspec

from flywheel.runtime.codec import encode_json
from flywheel.runtime.errors import ErrorCode, FlywheelError
from flywheel.serving._private.http_errors import error_for_code, error_response
from flywheel.serving._private.http_server import JSON, Request, Response, start_http_server
from flywheel.serving._private.loop_thread import LoopThread
from flywheel.serving._private.wire import NO_STATS, OP_INFER, OP_METADATA, ReplicaChannel
from flywheel.serving.config import ServerConfig
from flywheel.serving.metrics import ServingMetrics

log = logging.getLogger(__name__)

SERVER_NAME = "flywheel"
SERVER_VERSION = "0.1.0"
PROBE_INTERVAL_S = 1.0
_EMPTY: Response = (200, b"", JSON)
_OUTCOME = {int(c): c.name.lower() for c in ErrorCode}


@dataclass(frozen=True, slots=True)
class Route:
    """Where one (model, version) is served: its replicas' shared port."""

    name: str
    version: str
    port: int


@dataclass(slots=True)
class _Model:
    route: Route
    channel: ReplicaChannel
    metadata: dict | None = None
    ready: bool = False


@dataclass(slots=True)
class _Name:
    versions: dict[str, _Model] = field(default_factory=dict)
    default: str = ""


def _version_key(v: str):
    return (0, int(v), "") if v.isdigit() else (1, 0, v)


class Router:
    """Resolves V2 paths to handlers. Pure asyncio, no Ray: testable alone."""

    def __init__(self, server: ServerConfig, routes: list[Route], metrics: ServingMetrics) -> None:
        self._server = server
        self._metrics = metrics
        self._names: dict[str, _Name] = {}
        for r in routes:
            entry = self._names.setdefault(r.name, _Name())
            entry.versions[r.version] = _Model(r, ReplicaChannel("127.0.0.1", r.port))
        for entry in self._names.values():
            # The default version is the highest: numerically when numeric.
            entry.default = max(entry.versions, key=_version_key)
        self._server_meta = encode_json(
            {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": []}
        )

    # -- readiness ----------------------------------------------------------
    def models(self) -> list[_Model]:
        return [m for e in self._names.values() for m in e.versions.values()]

    async def probe(self, model: _Model) -> None:
        """Fetch metadata once; afterwards just check the replicas answer."""
        try:
            code, payload, _ = await asyncio.wait_for(model.channel.call(OP_METADATA, b""), 5)
        except (FlywheelError, asyncio.TimeoutError):
            model.ready = False
            return
        if code == 0:
            model.metadata = msgspec.json.decode(payload)
            model.ready = True

    async def probe_forever(self) -> None:
        while True:
            await asyncio.gather(*(self.probe(m) for m in self.models()))
            await asyncio.sleep(PROBE_INTERVAL_S)

    def all_ready(self) -> bool:
        return all(m.ready for m in self.models())

    # -- routes -------------------------------------------------------------
    def handle(self, req: Request):
        path = req.path
        if path == "/v2/health/live":
            return self._only("GET", req) or _EMPTY
        if path == "/v2/health/ready":
            return self._only("GET", req) or (
                _EMPTY if self.all_ready() else error_response(503, "not every model is ready")
            )
        if path == "/v2" or path == "/v2/":
            return self._only("GET", req) or (200, self._server_meta, JSON)
        if path == "/metrics":
            return self._only("GET", req) or (
                200, self._metrics.render(), b"text/plain; version=0.0.4; charset=utf-8"
            )
        parts = path.strip("/").split("/")
        if len(parts) < 3 or parts[0] != "v2" or parts[1] != "models":
            return error_response(404, f"no route {req.method} {path}")
        return self._model_route(req, parts[2], parts[3:])

    def _only(self, method: str, req: Request) -> Response | None:
        if req.method != method:
            return error_response(405, f"{req.path} takes {method}, not {req.method}")
        return None

    def _model_route(self, req: Request, name: str, rest: list[str]):
        version = None
        if rest[:1] == ["versions"]:
            if len(rest) < 2 or not rest[1]:
                return error_response(404, f"no route {req.method} {req.path}")
            version, rest = rest[1], rest[2:]
        entry = self._names.get(name)
        if entry is None:
            return error_response(404, f"unknown model {name!r}")
        model = entry.versions.get(version or entry.default)
        if model is None:
            return error_response(
                404, f"model {name!r} has no version {version!r}; it has {sorted(entry.versions)}"
            )
        action = rest[0] if rest else ""
        if len(rest) > 1 or action not in ("", "ready", "infer"):
            return error_response(404, f"no route {req.method} {req.path}")
        if action == "infer":
            if req.method != "POST":
                return error_response(405, f"{req.path} takes POST, not {req.method}")
            return self._infer(model, req.body)
        bad = self._only("GET", req)
        if bad:
            return bad
        if action == "ready":
            return _EMPTY if model.ready else error_response(503, f"model {name!r} is not ready")
        if model.metadata is None:
            return error_response(503, f"model {name!r} is not ready")
        meta = dict(model.metadata)
        meta["versions"] = sorted(entry.versions, key=_version_key)
        return 200, encode_json(meta), JSON

    async def _infer(self, model: _Model, body: bytes) -> Response:
        started = time.perf_counter()
        route = model.route
        try:
            code, payload, stats = await model.channel.call(OP_INFER, body)
        except FlywheelError as exc:
            code, payload, stats = int(exc.code), exc.message.encode(), NO_STATS
            if exc.code == ErrorCode.UNAVAILABLE:
                model.ready = False
        self._metrics.observe(
            route.name, route.version, "ok" if code == 0 else _OUTCOME.get(code, "internal"),
            time.perf_counter() - started, stats,
        )
        if code == 0:
            return 200, payload, JSON
        return error_for_code(code, payload.decode("utf-8", "replace"))


class Ingress:
    """Serve deployment class: starts the HTTP server in its constructor."""

    def __init__(self, server: ServerConfig, routes: list[Route]) -> None:
        self._loop = LoopThread("flywheel-ingress")
        self._loop.start()
        self._loop.call(self._start(server, routes))
        log.info("V2 HTTP ingress on http://%s:%d", server.host, server.port)

    async def _start(self, server: ServerConfig, routes: list[Route]) -> None:
        self.metrics = ServingMetrics()
        self.router = Router(server, routes, self.metrics)
        await asyncio.gather(*(self.router.probe(m) for m in self.router.models()))
        self._prober = asyncio.get_running_loop().create_task(self.router.probe_forever())
        self._http = await start_http_server(
            self.router.handle, server.host, server.port,
            max_body=server.max_body_bytes, on_error=error_response,
        )

    def check_health(self) -> None:
        stalled = self._loop.stalled_for()
        if stalled > 10.0:
            raise RuntimeError(f"ingress loop stalled for {stalled:.1f}s")

    def __del__(self) -> None:
        # Ray Serve calls __del__ on graceful shutdown.
        self.close()

    def close(self) -> None:
        """Stop serving and release the port; safe to call more than once."""
        loop = getattr(self, "_loop", None)
        if loop is None:
            return
        self._loop = None

        async def _stop() -> None:
            self._http.close()
            for m in self.router.models():
                m.channel.close()

        try:
            loop.call(_stop(), timeout=5)
        except Exception:  # noqa: BLE001
            pass
        loop.stop()
