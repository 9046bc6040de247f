"""The drift monitor as a replica reaches it, on one node or on a cluster.

The monitor serves frames on 127.0.0.1 of its own node. A replica on that
node sends them there (the fast path); a replica on another node has no
such address to reach, so it calls the monitor's ``frame`` method through
Serve instead, which goes wherever Serve placed it. Which of the two is
decided on the first call, by asking the monitor for its node (through
Serve), and again whenever the loopback path fails (the monitor may have
been restarted elsewhere).
"""

from __future__ import annotations

import asyncio
import logging

from flywheel.protocol.errors import UnavailableError
from flywheel.serving._private.wire import Call, ReplicaChannel, Reply

log = logging.getLogger(__name__)

DEPLOYMENT = "drift"  # the monitor's Serve deployment (serving/app.py)
CALL_TIMEOUT_S = 30.0


def monitor_link(port: int, secret: bytes | None, app: str):
    """What reaches the monitor: loopback frames alone without an
    application to ask (in-process use, tests), else a MonitorLink."""
    if not app:
        return ReplicaChannel("127.0.0.1", port, pool_size=1, secret=secret)
    return MonitorLink(port, secret, app)


class MonitorLink:
    """``call(Call) -> Reply`` and ``close()``, as ReplicaChannel."""

    def __init__(self, port: int, secret: bytes | None, app: str) -> None:
        self._port, self._secret, self._app = port, secret, app
        self._local: ReplicaChannel | None = None
        self._handle = None

    async def call(self, call: Call) -> Reply:
        if self._local is None and self._handle is None:
            await self._resolve()
        if self._local is not None:
            try:
                return await self._local.call(call)
            except UnavailableError:  # unreachable, or lost with the call (ReplicaLost)
                self._local.close()  # gone from this node, maybe: ask again next time
                self._local = None
                raise
        handle = self._handle
        code, payload = await asyncio.get_running_loop().run_in_executor(
            None, lambda: handle.frame.remote(call.op, call.payload).result(timeout_s=CALL_TIMEOUT_S))
        return Reply(code, payload)

    async def _resolve(self) -> None:
        def where():
            import ray
            from ray import serve

            handle = serve.get_deployment_handle(DEPLOYMENT, self._app)
            there = handle.where.remote().result(timeout_s=CALL_TIMEOUT_S)
            return handle, there == ray.get_runtime_context().get_node_id()

        handle, same_node = await asyncio.get_running_loop().run_in_executor(None, where)
        if same_node:
            self._local = ReplicaChannel("127.0.0.1", self._port, pool_size=1, secret=self._secret)
        else:
            log.info("the drift monitor runs on another node: samples go to it through Serve")
            self._handle = handle

    def close(self) -> None:
        if self._local is not None:
            self._local.close()
            self._local = None
