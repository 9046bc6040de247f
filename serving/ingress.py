"""The V2 ingress: HTTP and gRPC, as one Ray Serve replica that owns its sockets.

httptools HTTP and grpc.aio run on the replica's own uvloop thread. They
parse only what routing needs; infer payloads go unchanged to the model's
replicas over the internal frame protocol, which decode, validate, batch, run
and encode. Metadata is fetched from each model and answered here.
"""

from __future__ import annotations

import asyncio
import logging

from flywheel.runtime.errors import ConfigError
from flywheel.serving._private.auth import Authenticator
from flywheel.serving._private.grpc_service import start_grpc_server
from flywheel.serving._private.http_errors import error_response
from flywheel.serving._private.http_routes import HttpRoutes
from flywheel.serving._private.http_server import start_http_server
from flywheel.serving._private.loop_thread import LoopThread
from flywheel.serving._private.wire import ReplicaChannel
from flywheel.serving.config import ServerConfig
from flywheel.serving.metrics import ServingMetrics
from flywheel.serving.router import Route, Router

log = logging.getLogger(__name__)

STALL_LIMIT_S = 10.0

__all__ = ["Ingress", "Route"]


class Ingress:
    """Serve deployment class: starts the HTTP and gRPC servers in its constructor."""

    def __init__(self, server: ServerConfig, routes: list[Route], drift_port: int = 0, keys_uri: str = "") -> None:
        self._loop = LoopThread("flywheel-ingress")
        self._loop.start()
        self._loop.call(self._start(server, routes, drift_port, keys_uri))
        log.info("V2 ingress: HTTP %s:%d, gRPC port %d", server.host, server.port, server.grpc_port)

    async def _start(self, server: ServerConfig, routes: list[Route], drift_port: int, keys_uri: str) -> None:
        self.router = Router(routes, ServingMetrics())
        self._auth = None
        if server.auth.enabled:
            if not keys_uri:
                raise ConfigError("server.auth is on but no registry URI was given for the API keys")
            self._auth = Authenticator(server.auth, keys_uri)
            await self._auth.start()
        monitor = ReplicaChannel("127.0.0.1", drift_port, pool_size=1) if drift_port else None
        await asyncio.gather(*(self.router.probe(m) for m in self.router.models()))
        self._prober = asyncio.get_running_loop().create_task(self.router.probe_forever())
        self._http = await start_http_server(
            HttpRoutes(self.router, monitor, self._auth).handle, server.host, server.port,
            max_body=server.max_body_bytes, on_error=error_response,
        )
        self._grpc = None
        if server.grpc_port >= 0:
            self._grpc = await start_grpc_server(
                self.router, server.host, server.grpc_port, max_message_bytes=server.max_body_bytes,
                auth=self._auth,
            )

    def check_health(self) -> None:
        """Serve's health probe: fail if our own loop has stopped beating."""
        stalled = self._loop.stalled_for()
        if stalled > STALL_LIMIT_S:
            raise RuntimeError(f"ingress loop stalled for {stalled:.1f}s")

    def __del__(self) -> None:
        # Ray Serve calls __del__ on graceful shutdown.
        self.close()

    def close(self) -> None:
        """Stop serving and release the ports; safe to call more than once."""
        loop, self._loop = getattr(self, "_loop", None), None
        if loop is None:
            return

        async def _stop() -> None:
            self._http.close()
            if self._grpc is not None:
                await self._grpc.stop(grace=1.0)
            self.router.close()
            if self._auth is not None:
                await self._auth.aclose()

        loop.shutdown(_stop)
