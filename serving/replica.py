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
ingress can name the replica when it dies with calls in flight. An ingress on
a node with no replica of the deployment calls :meth:`ModelReplica.frame`
through Serve instead (serving/_private/node_link.py).

Colocated models (``placement: colocated``) skip all of this: the ingress
hosts their ModelServer itself.
"""

from __future__ import annotations

import asyncio
import logging

from flywheel.serving._private.autoscaling import IN_FLIGHT
from flywheel.serving._private.loop_thread import LoopThread
from flywheel.serving._private.wire import Call, Reply, check_secret, process_identity, start_frame_server
from flywheel.serving.config import ModelConfig, RegistryConfig, RequestLimits
from flywheel.serving.model_server import ModelServer, check_limits, make_backend, model_metadata

log = logging.getLogger(__name__)

__all__ = ["ModelReplica", "check_limits", "make_backend", "model_metadata"]

# A loop that has not beaten for this long is stuck: fail the health check
# so that Serve replaces the replica.
STALL_LIMIT_S = 10.0
# how long a replica that goes waits for the calls it runs (Serve's
# graceful_shutdown_timeout_s for these replicas leaves room for it)
DRAIN_S = 2.0


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
        self.in_flight = self.answered = 0  # counted only when the model autoscales
        self._counted = model.autoscaling is not None
        self._model_server = ModelServer(model, limits, registry, drift_port, secret=secret, drift_app=drift_app)
        self.identity = process_identity()
        self._loop = LoopThread(f"flywheel-replica-{model.name}")
        self._loop.start()
        self._loop.call(self._start(port, secret))
        log.info("replica %s of %s:%s serving on 127.0.0.1:%d", self.identity, model.name,
                 self._model_server.model.version, port)

    async def _start(self, port: int, secret: bytes | None) -> None:
        await self._model_server.start()
        handle = self._model_server.handle
        if self._counted:
            handle = self._counting(handle)
        self._handle = handle
        self._server = await start_frame_server(handle, "127.0.0.1", port, secret=secret, identity=self.identity)

    def _counting(self, handle):
        """``handle`` that keeps ``in_flight`` (for autoscaling only: it
        costs a coroutine per call)."""
        async def counted(call: Call) -> Reply:
            self.in_flight += 1
            try:
                return await handle(call)
            finally:
                self.in_flight -= 1
                self.answered += 1
        return counted

    async def frame(self, op: int, payload: bytes, aux: int = 0, timeout_ms: int = 0) -> tuple:
        """One frame call through Serve, from an ingress on a node that has
        no replica of this deployment (serving/_private/node_link.py);
        answered as over loopback: (code, payload, aux, stats fields).
        Serve's calls come from inside the Ray cluster, which holds the
        deployment's secret anyway (its arguments)."""
        reply = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
            self._handle(Call(op, payload, aux, timeout_ms)), self._loop.loop))
        s = reply.stats
        return reply.code, reply.payload, reply.aux, (s.queue_us, s.compute_us, s.batch_rows, s.queue_depth, s.leader)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metric (the model's ``autoscaling``):
        this replica's calls in flight, over loopback and through Serve."""
        return {IN_FLIGHT: float(self.in_flight)}

    def frame_stats(self) -> dict:
        """For operators and tests: this replica's identity, its frame port,
        ``refused``, the frame connections dropped unauthenticated since it
        started (each also logged, rate-limited, with its peer), and, when
        the model autoscales, the calls it holds and has answered."""
        return {"identity": self.identity, "port": self._server.port, "refused": self._server.refused,
                "in_flight": self.in_flight, "answered": self.answered}

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
            # Calls already running finish; calls sent from now on go back
            # unrun, and the ingress sends them to the replicas that stay.
            await self._server.drain(DRAIN_S)
            await self._model_server.close()

        loop.shutdown(_stop, timeout=DRAIN_S + 2.0)
