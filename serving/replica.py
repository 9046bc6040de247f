"""A dedicated model replica: one (model, version) in its own Serve deployment.

Ray Serve places, health-checks, restarts and rolls these replicas; the request
path does not go through Serve. Each replica runs the internal frame server
(``_private/wire.py``) on its own uvloop thread in front of a
:class:`~flywheel.serving.model_server.ModelServer`. All replicas of a
deployment bind the same loopback port with SO_REUSEPORT, so the kernel spreads
the ingress's connections among them and a restarted replica simply joins in.
The port is bound last, after the model is loaded and warmed up: a replica
that accepts connections is ready. Every connection must prove the
deployment's secret before its first frame is read (see ``_private/wire.py``),
and is told this replica's identity (Serve replica, pid, node), so that the
ingress can name the replica when it dies with calls in flight.

Colocated models (``placement: colocated``) skip all of this: the ingress
hosts their ModelServer itself.
"""

from __future__ import annotations

import logging

from flywheel.serving._private.loop_thread import LoopThread
from flywheel.serving._private.wire import check_secret, process_identity, start_frame_server
from flywheel.serving.config import ModelConfig, RegistryConfig, RequestLimits
from flywheel.serving.model_server import ModelServer, check_limits, make_backend, model_metadata

log = logging.getLogger(__name__)

__all__ = ["ModelReplica", "check_limits", "make_backend", "model_metadata"]

# A loop that has not beaten for this long is stuck: fail the health check
# so that Serve replaces the replica.
STALL_LIMIT_S = 10.0


class ModelReplica:
    """Serve deployment class for one model version (see module docstring)."""

    def __init__(
        self,
        model: ModelConfig,
        port: int,
        limits: RequestLimits,
        registry: RegistryConfig | None = None,
        drift_port: int = 0,
        *,
        secret: bytes,
        drift_app: str = "",
    ):
        """``secret``: the deployment's (build_application makes it); every
        frame connection, the ingress's and the drift monitor's, proves it.
        ``drift_app``: the drift monitor's Serve application (see ModelServer)."""
        check_secret(secret, required=True)
        self._model_server = ModelServer(model, limits, registry, drift_port, secret=secret, drift_app=drift_app)
        self.identity = process_identity()
        self._loop = LoopThread(f"flywheel-replica-{model.name}")
        self._loop.start()
        self._loop.call(self._start(port, secret))
        log.info("replica %s of %s:%s serving on 127.0.0.1:%d", self.identity, model.name,
                 self._model_server.model.version, port)

    async def _start(self, port: int, secret: bytes | None) -> None:
        await self._model_server.start()
        self._server = await start_frame_server(
            self._model_server.handle, "127.0.0.1", port, secret=secret, identity=self.identity
        )

    def frame_stats(self) -> dict:
        """For operators and tests: this replica's identity, its frame port,
        and ``refused``, the frame connections dropped unauthenticated since
        it started (each also logged, rate-limited, with its peer)."""
        return {"identity": self.identity, "port": self._server.port, "refused": self._server.refused}

    def check_health(self) -> None:
        """Serve's health probe: fail if our own loop has stopped beating."""
        stalled = self._loop.stalled_for()
        if stalled > STALL_LIMIT_S:
            raise RuntimeError(f"request loop stalled for {stalled:.1f}s")

    def __del__(self) -> None:
        # Ray Serve calls __del__ on graceful shutdown.
        self.close()

    def close(self) -> None:
        """Stop serving and release the port; safe to call more than once."""
        loop, self._loop = getattr(self, "_loop", None), None
        if loop is None:
            return

        async def _stop() -> None:
            # Stop accepting connections, let accepted requests finish.
            self._server.close()
            await self._model_server.close()

        loop.shutdown(_stop)
