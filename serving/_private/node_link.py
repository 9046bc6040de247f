"""A dedicated model's replicas as an ingress replica reaches them, on one
node or on a cluster.

Every replica of a dedicated deployment serves frames on the same port of
127.0.0.1 on its node (SO_REUSEPORT, serving/replica.py). An ingress replica
on a node that has one of them sends its calls there: the fast path, no Ray
in the way. On a node with none of them the loopback port has nothing
listening (the connection is refused at once), and on a cluster of several
nodes the call goes through Serve instead, to the replica's ``frame`` method
wherever Serve placed it (on one node, nothing listening means no replica is
up: the call fails at once, UNAVAILABLE, while Serve replaces it).
Such an ingress looks at its own node again every RECHECK_S, so that a
replica added there later (autoscaling, a rescheduled replica) takes its
calls again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from flywheel.protocol.errors import UnavailableError
from flywheel.serving._private.wire import Call, ReplicaChannel, ReplicaLost, Reply, Stats, Unreachable

log = logging.getLogger(__name__)

RECHECK_S = 5.0  # how long calls go through Serve before loopback is tried again
CALL_TIMEOUT_S = 30.0  # a call through Serve that has no deadline of its own


class NodeLink:
    """``call`` / ``call_fresh`` / ``close``, as ReplicaChannel, for the
    dedicated deployment ``deployment`` of Serve application ``app``."""

    def __init__(self, local: ReplicaChannel, deployment: str, app: str) -> None:
        self.local = local
        self._deployment, self._app = deployment, app
        self._serve_until = 0.0  # monotonic: until then, calls go through Serve
        self._nodes_checked = -RECHECK_S
        self._several_nodes = False
        self._checking: asyncio.Future | None = None
        self._handle = None

    @property
    def through_serve(self) -> bool:
        """Whether calls now go through Serve (no replica on this node)."""
        return time.monotonic() < self._serve_until

    def call(self, call: Call) -> Awaitable[Reply]:
        return self._call(self.local.call, call)

    def call_fresh(self, call: Call) -> Awaitable[Reply]:
        return self._call(self.local.call_fresh, call)

    async def _call(self, over_loopback: Callable[[Call], Awaitable[Reply]], call: Call) -> Reply:
        if not self.through_serve:
            try:
                return await over_loopback(call)
            except Unreachable as exc:
                await self._no_local_replica(exc)
        return await self._through_serve(call)

    async def _no_local_replica(self, exc: Unreachable) -> None:
        """After loopback found nothing listening: go through Serve where
        other nodes may hold a replica; re-raise on a one-node cluster,
        where none is up anywhere (a replica being replaced: the caller gets
        UNAVAILABLE at once rather than waiting in Serve's queue)."""
        now = time.monotonic()
        if now >= self._nodes_checked + RECHECK_S:
            if self._checking is None:  # one GCS question for every call that finds loopback empty
                self._checking = asyncio.get_running_loop().run_in_executor(None, _several_nodes)
            try:
                self._several_nodes = await asyncio.shield(self._checking)
            finally:
                self._checking = None
            self._nodes_checked = now
        if not self._several_nodes:
            raise exc
        if self._serve_until == 0.0:
            log.info("no replica of %s on this node: its calls go through Serve (loopback tried again every %gs)",
                     self._deployment, RECHECK_S)
        self._serve_until = now + RECHECK_S

    async def _through_serve(self, call: Call) -> Reply:
        if self._handle is None:
            self._handle = await asyncio.get_running_loop().run_in_executor(None, self._get_handle)
        timeout_s = call.timeout_ms / 1000 + 5 if call.timeout_ms else CALL_TIMEOUT_S
        # Serve's router runs on a loop of its own: its response can be
        # awaited from this one
        try:
            response = self._handle.frame.remote(call.op, call.payload, call.aux, call.timeout_ms)
            code, payload, aux, stats = await asyncio.wait_for(response, timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Serve's and Ray's errors: the replica died, none is up, a timeout
            if _replica_died(exc):  # with the call: the router's poison-request rule counts it
                raise ReplicaLost(f"a replica of {self._deployment} died with the call (through Serve): {exc}",
                                  f"{self._deployment} (through Serve)") from None
            raise UnavailableError(f"{self._deployment} through Serve: {type(exc).__name__}: {exc}") from None
        return Reply(code, payload, Stats(*stats), aux)

    def _get_handle(self):
        from ray import serve

        return serve.get_deployment_handle(self._deployment, self._app)

    def close(self) -> None:
        self.local.close()


def _several_nodes() -> bool:
    """Whether the Ray cluster has more than one alive node (asked of the
    GCS; False when it cannot say: the call then fails as on one node)."""
    import ray

    try:
        return sum(1 for n in ray.nodes() if n["Alive"]) > 1
    except Exception:  # noqa: BLE001 - no GCS answer: nothing to route through either
        log.warning("could not ask the GCS for the cluster's nodes", exc_info=True)
        return False


def _replica_died(exc: BaseException) -> bool:
    """Whether a Serve call failed because its replica's process died."""
    from ray.exceptions import RayActorError

    return isinstance(exc, RayActorError)
