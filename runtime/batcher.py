"""Dynamic batcher: pure asyncio, one per model replica.

Dispatch policy (when a batch leaves)
-------------------------------------
Requests wait in one FIFO queue. Whenever a batch slot is free
(fewer than ``max_concurrent_batches`` batches running) and the queue is not
empty, a batch leaves at once if

1. no batch is running at all (the model is idle: waiting would only add
   latency, so an idle batcher never waits out its delay; its batch is
   taken one loop turn later, when the task that runs it starts, so that
   requests read in the same turn, e.g. from several connections at once,
   go together), or
2. the queue already holds ``max_batch_size`` rows, or a preferred batch size, or
3. the oldest queued request has waited ``max_queue_delay_us``.

Otherwise a timer wakes the batcher when the oldest request's delay runs out.
While a batch runs, new arrivals accumulate; that is where batches come from
under load ("greedy" batching, no fixed wait at low load).

A batch takes requests in arrival order while their rows fit in
``max_batch_size`` and their non-batch dimensions equal the first request's
(so concatenation cannot fail); with ``preferred_batch_sizes`` it stops at the
largest preferred size that such a prefix reaches, if any. A batcher made with
``merge=False`` (a model that must see each request apart) takes one request
per batch, rows as sent. Requests whose
deadline passed while queued are failed with DeadlineExceededError and never
run; requests whose caller went away (cancelled) are skipped.

Inputs are concatenated along axis 0 and each caller gets exactly its own rows
of every output back. An exception from the model fails only that batch's
callers; the batcher keeps serving. ``close()`` lets accepted requests
finish before it fails anything. A full queue (``max_queue_size``
requests) rejects at once with OverloadedError; nothing blocks forever.

Thread-safety: all methods must be called on the event loop that created the
batcher. The model function runs on ``executor`` threads (or inline when None).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass

import msgspec
import numpy as np

from flywheel.protocol.errors import (
    ConfigError,
    DeadlineExceededError,
    FlywheelError,
    InvalidInputError,
    OverloadedError,
    UnavailableError,
)

InferFn = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class BatchingConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How a model replica groups requests into batches.

    max_batch_size: most rows in one model call; 1 turns batching off.
    max_queue_delay_us: longest a request waits for company while another
        batch is running (an idle model never waits).
    preferred_batch_sizes: batch sizes to stop at when reachable (e.g. sizes a
        TensorRT profile was built for); each in [1, max_batch_size].
    max_queue_size: queued requests beyond which new ones are refused (503).
    max_concurrent_batches: model calls in flight at once per replica.
    inline: run the model on the event loop's own thread instead of a worker
        thread. Saves a thread hop per batch for models that take well under
        a millisecond; wrong for slower ones, since the loop cannot read new
        requests (or form the next batch) while the model runs. Unset (the
        default), the model replica decides at warm-up by timing the model
        (serving/model_server.py, ``choose_execution``) and says which it
        chose in its log and the model's metadata.
    """

    max_batch_size: int = 32
    max_queue_delay_us: int = 500
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 1024
    max_concurrent_batches: int = 1
    inline: bool | None = None

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ConfigError("batching.max_batch_size must be >= 1")
        if self.max_queue_delay_us < 0:
            raise ConfigError("batching.max_queue_delay_us must be >= 0")
        if self.max_queue_size < 1:
            raise ConfigError("batching.max_queue_size must be >= 1")
        if self.max_concurrent_batches < 1:
            raise ConfigError("batching.max_concurrent_batches must be >= 1")
        bad = [p for p in self.preferred_batch_sizes if not 1 <= p <= self.max_batch_size]
        if bad:
            raise ConfigError(
                f"batching.preferred_batch_sizes {bad} must lie in [1, max_batch_size="
                f"{self.max_batch_size}]"
            )


@dataclass(slots=True)
class BatchResult:
    """What one request gets back: its own output rows and where its time went."""

    outputs: dict[str, np.ndarray]
    queue_s: float
    compute_s: float
    batch_rows: int
    leader: bool  # first request of its batch: count the batch once by it


@dataclass(slots=True)
class _Pending:
    inputs: Mapping[str, np.ndarray]
    rows: int
    key: tuple
    future: asyncio.Future
    enqueued: float
    deadline: float | None


BatchObserver = Callable[[int, float], None]


class DynamicBatcher:
    """Groups concurrent requests into model calls; see the module docstring."""

    def __init__(
        self,
        infer: InferFn,
        config: BatchingConfig,
        *,
        executor: Executor | None = None,
        on_batch: BatchObserver | None = None,
        merge: bool = True,
    ) -> None:
        self._loop = asyncio.get_running_loop()  # fail fast outside a loop
        self._infer = infer
        self._cfg = config
        self._executor = executor
        self._on_batch = on_batch
        self._merge = merge
        self._queue: collections.deque[_Pending] = collections.deque()
        self._queued_rows = 0
        self._running = 0
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._preferred = frozenset(config.preferred_batch_sizes)

    @property
    def queue_depth(self) -> int:
        """Requests waiting (not yet in a running batch)."""
        return len(self._queue)

    async def submit(
        self, inputs: Mapping[str, np.ndarray], *, timeout_s: float | None = None
    ) -> BatchResult:
        """Queue one validated request and wait for its rows of the outputs.

        ``inputs`` share their first dimension (the request's rows). Raises
        OverloadedError when the queue is full, DeadlineExceededError when
        ``timeout_s`` passes before its batch starts, and whatever the model
        raised for its batch.
        """
        if self._closed:
            raise UnavailableError("the model is shutting down")
        first = next(iter(inputs.values()))
        rows = int(first.shape[0]) if first.ndim else 1
        if rows > self._cfg.max_batch_size:
            raise InvalidInputError(
                f"batch of {rows} rows exceeds the model's max_batch_size "
                f"{self._cfg.max_batch_size}"
            )
        if len(self._queue) >= self._cfg.max_queue_size:
            raise OverloadedError(
                f"queue full ({self._cfg.max_queue_size} requests waiting); retry later"
            )
        now = time.monotonic()
        # requests batch together when their non-batch dims agree
        key = (first.shape[1:],) if len(inputs) == 1 else tuple(a.shape[1:] for a in inputs.values())
        fut = self._loop.create_future()
        deadline = now + timeout_s if timeout_s is not None else None
        self._queue.append(_Pending(inputs, rows, key, fut, now, deadline))
        self._queued_rows += rows
        self._dispatch()
        return await fut

    async def close(self, timeout_s: float = 5.0) -> None:
        """Refuse new work and let what was accepted finish; after
        ``timeout_s``, fail whatever is still queued."""
        self._closed = True
        deadline = time.monotonic() + timeout_s
        while (self._queue or self._running) and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        while self._queue:
            p = self._queue.popleft()
            if not p.future.done():
                p.future.set_exception(UnavailableError("the model is shutting down"))
        self._queued_rows = 0

    # -- dispatch -----------------------------------------------------------

    def _ready(self, now: float) -> bool:
        if self._running == 0 or self._queued_rows >= self._cfg.max_batch_size:
            return True
        if self._queued_rows in self._preferred:
            return True
        return (now - self._queue[0].enqueued) * 1e6 >= self._cfg.max_queue_delay_us

    def _dispatch(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._queue and self._running < self._cfg.max_concurrent_batches:
            now = time.monotonic()
            if not self._ready(now):
                wake = self._queue[0].enqueued + self._cfg.max_queue_delay_us / 1e6
                self._timer = self._loop.call_at(
                    self._loop.time() + max(0.0, wake - now), self._dispatch
                )
                return
            # The batch is taken when its task starts, not now: requests that
            # arrive in the same turn of the loop (several connections read in
            # one poll) join it instead of waiting for the next one.
            self._running += 1
            self._loop.create_task(self._run_next())
            return

    def _take(self, now: float) -> list[_Pending]:
        batch: list[_Pending] = []
        rows = 0
        best = 0  # length of the longest prefix ending on a preferred size
        limit = self._cfg.max_batch_size
        while self._queue:
            p = self._queue[0]
            if p.future.done():  # caller gone
                self._queue.popleft()
                self._queued_rows -= p.rows
                continue
            if p.deadline is not None and now > p.deadline:
                self._queue.popleft()
                self._queued_rows -= p.rows
                p.future.set_exception(
                    DeadlineExceededError("request timed out while queued for the model")
                )
                continue
            if batch and (not self._merge or p.key != batch[0].key) or rows + p.rows > limit:
                break
            self._queue.popleft()
            self._queued_rows -= p.rows
            batch.append(p)
            rows += p.rows
            if rows in self._preferred:
                best = len(batch)
        if self._preferred and 0 < best < len(batch):
            for p in reversed(batch[best:]):  # give back past the preferred size
                self._queue.appendleft(p)
                self._queued_rows += p.rows
            del batch[best:]
        return batch

    async def _run_next(self) -> None:
        batch = self._take(time.monotonic())
        if not batch:  # every queued caller went away or timed out
            self._running -= 1
            self._dispatch()
            return
        if self._queue:  # rows left over: another batch slot may take them
            self._dispatch()
        await self._run(batch)

    async def _run(self, batch: list[_Pending]) -> None:
        # Exception boundary: whatever happens, every caller of this batch gets
        # an answer and the batcher keeps dispatching.
        started = time.monotonic()
        try:
            if len(batch) == 1:
                merged = dict(batch[0].inputs)
            else:
                merged = {
                    name: np.concatenate([p.inputs[name] for p in batch])
                    for name in batch[0].inputs
                }
            total = sum(p.rows for p in batch)
            if self._executor is None:
                outputs = self._infer(merged)
            else:
                outputs = await self._loop.run_in_executor(self._executor, self._infer, merged)
            compute = time.monotonic() - started
            if self._on_batch is not None:
                self._on_batch(total, compute)
            offset = 0
            for i, p in enumerate(batch):
                mine = {}
                for name, arr in outputs.items():
                    if arr.ndim == 0 or arr.shape[0] != total:
                        raise FlywheelError(
                            f"model output {name!r} has shape {list(arr.shape)}; "
                            f"expected {total} rows for the batch"
                        )
                    mine[name] = arr[offset : offset + p.rows]
                offset += p.rows
                if not p.future.done():
                    p.future.set_result(
                        BatchResult(mine, started - p.enqueued, compute, total, i == 0)
                    )
        except BaseException as exc:  # noqa: BLE001 - fail the batch, not the batcher
            err = exc if isinstance(exc, Exception) else FlywheelError("batch cancelled")
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(err)
        finally:
            self._running -= 1
            self._dispatch()
