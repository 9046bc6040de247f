"""A uvloop event loop on its own daemon thread, owned by a Serve replica.

Ray Serve runs the replica's methods on its own loop; our servers run here so
that their request path never waits on Serve's. A heartbeat task lets the
replica's ``check_health`` notice a stuck loop (Serve's own probes never touch
this loop).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import uvloop

HEARTBEAT_S = 0.5


class LoopThread:
    """Start with :meth:`start`; run coroutines on it with :meth:`call`."""

    def __init__(self, name: str) -> None:
        self._loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._started = threading.Event()
        self.last_beat = time.monotonic()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def start(self) -> None:
        self._thread.start()
        self._started.wait()

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.create_task(self._heartbeat())
        self._loop.call_soon(self._started.set)
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    async def _heartbeat(self) -> None:
        while True:
            self.last_beat = time.monotonic()
            await asyncio.sleep(HEARTBEAT_S)

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float | None = 60.0) -> Any:
        """Run ``coro`` on the loop and wait for its result from this thread."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stalled_for(self) -> float:
        """Seconds since the loop last beat (about 0 when healthy)."""
        return max(0.0, time.monotonic() - self.last_beat - HEARTBEAT_S)

    def shutdown(self, cleanup: Callable[[], Coroutine[Any, Any, Any]] | None = None, timeout: float = 5.0) -> None:
        """Run ``cleanup()`` on the loop (best effort, bounded by ``timeout``),
        then stop the loop. What every loop-owning replica does on close."""
        if cleanup is not None:
            try:
                self.call(cleanup(), timeout)
            except Exception:  # noqa: BLE001 - shutting down regardless
                pass
        self.stop(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop (cancelling its tasks) and join the thread."""
        if not self._thread.is_alive():
            return

        async def _cancel_all() -> None:
            me = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.call(_cancel_all(), timeout)
        except Exception:  # noqa: BLE001 - stopping anyway
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
