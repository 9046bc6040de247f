"""Replica side of drift monitoring: sample inputs, ship them in batches.

``offer`` runs on the request path and only appends a reference to the
already-decoded array (with probability ``sample_rate``); shipping happens in
a background task on the replica's loop and is never awaited by a request.
If the monitor is unreachable, the batch is dropped and counted: predictions
matter more than samples. Rows travel as float64 whatever the input's numeric
type (integers exactly, up to 2**53), so the monitor's categorical tests
(chi2, psi) read integer inputs back as the same codes.
"""

from __future__ import annotations

import asyncio
import logging
import random

import numpy as np

from flywheel.serving._private.monitor_link import monitor_link
from flywheel.serving._private.wire import OP_DRIFT_INGEST, OP_DRIFT_TRACK, Call
from flywheel.serving.config import DriftConfig

log = logging.getLogger(__name__)


class DriftSampler:
    def __init__(self, cfg: DriftConfig, model: str, version: str, monitor_port: int, *, seed: int | None = None,
                 track: bytes = b"", secret: bytes | None = None, app: str = ""):
        """``track``: the model's config (JSON), sent once before the first
        samples so that the monitor tracks a version it was not deployed with.
        ``secret``: the deployment's, which the monitor's connections prove.
        ``app``: the Serve application of the monitor, through which it is
        reached from another node ("" = loopback only: see monitor_link)."""
        self._cfg = cfg
        self._track = track
        self._model, self._version = model, version
        self._channel = monitor_link(monitor_port, secret, app)
        self._rng = random.Random(seed)
        self._buf: list[np.ndarray] = []
        self._rows = 0
        self.dropped_rows = 0
        self.shipped_rows = 0
        self._task: asyncio.Task | None = None
        self._flushing = False

    def start(self) -> None:
        """Start the periodic flusher on the running loop."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    def offer(self, arrays: dict[str, np.ndarray]) -> None:
        """Maybe sample this request's first input (rows x features)."""
        if self._rng.random() >= self._cfg.sample_rate:
            return
        arr = next(iter(arrays.values()))
        if arr.dtype.kind not in "biuf":
            return  # only numeric inputs are monitored
        rows = arr.reshape(len(arr), -1) if arr.ndim else arr.reshape(1, 1)
        if self._rows + len(rows) > self._cfg.max_buffered_rows:
            self.dropped_rows += len(rows)
            return
        self._buf.append(rows)
        self._rows += len(rows)
        if self._rows >= self._cfg.batch_rows and not self._flushing:
            asyncio.get_running_loop().create_task(self.flush())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._cfg.flush_interval_s)
            await self.flush()

    async def flush(self) -> None:
        if not self._buf or self._flushing:
            return
        from flywheel.serving.drift_monitor import encode_samples

        self._flushing = True
        batch, self._buf, n = self._buf, [], self._rows
        self._rows = 0
        try:
            if self._track:
                reply = await asyncio.wait_for(self._channel.call(Call(OP_DRIFT_TRACK, self._track)), 30)
                if reply.code:
                    raise RuntimeError(reply.payload.decode("utf-8", "replace"))
                self._track = b""
            payload = encode_samples(self._model, self._version, np.concatenate(batch).astype(np.float64))
            reply = await asyncio.wait_for(self._channel.call(Call(OP_DRIFT_INGEST, payload)), 30)
            if reply.code:
                log.warning("drift monitor refused samples: %s", reply.payload.decode("utf-8", "replace"))
                self.dropped_rows += n
            else:
                self.shipped_rows += n
        except Exception as exc:  # noqa: BLE001 - never let monitoring hurt serving
            log.debug("drift samples dropped: %r", exc)
            self.dropped_rows += n
        finally:
            self._flushing = False

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._channel.close()
