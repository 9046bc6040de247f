"""Where a model replica runs its model: inline on the request loop, or on a
worker thread.

Inline saves a thread hop per batch (tens of microseconds here), which is
most of a sub-millisecond model's request path; but while the model runs,
the loop cannot read requests or form the next batch, so a slower model
belongs on a worker thread. ``batching.inline`` says which by hand; unset,
the replica times the model at warm-up, on the largest batch it will form,
and runs it inline when that takes at most INLINE_BUDGET_S.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from flywheel.runtime.batcher import BatchingConfig

# The longest a batch may hold the request loop to run inline: the time a
# few thread hops cost, so that a batch inline never delays the others more
# than the hop would have.
INLINE_BUDGET_S = 0.001
TIMING_RUNS = 5


@dataclass(frozen=True, slots=True)
class Execution:
    """The choice, and what it rests on (for the log and model metadata)."""

    inline: bool
    chosen_by: str  # "config" or "warm-up timing"
    timed_rows: int = 0  # rows of the batch timed (0: nothing timed)
    timed_s: float = 0.0  # its median time

    @property
    def where(self) -> str:
        return "inline" if self.inline else "worker_thread"

    def describe(self) -> str:
        if not self.timed_rows:
            return f"runs {'inline on the request loop' if self.inline else 'on a worker thread'} ({self.chosen_by})"
        return (f"runs {'inline on the request loop' if self.inline else 'on a worker thread'}: a batch of "
                f"{self.timed_rows} took {self.timed_s * 1000:.3f} ms at warm-up "
                f"({'within' if self.inline else 'over'} the {INLINE_BUDGET_S * 1000:g} ms inline budget; "
                "set batching.inline to choose)")

    def parameters(self) -> dict:
        """The model metadata's ``parameters`` entries (V2 style: flat)."""
        out: dict = {"execution": self.where, "execution_chosen_by": self.chosen_by}
        if self.timed_rows:
            out["warmup_batch_rows"] = self.timed_rows
            out["warmup_batch_us"] = round(self.timed_s * 1e6)
        return out


def median_time(call: Callable[[], object], runs: int = TIMING_RUNS) -> float:
    """Median wall time of ``runs`` calls (after the warm-up the caller did)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def choose_execution(backend, batching: BatchingConfig, batchable: bool) -> Execution:
    """Inline or a worker thread for ``backend`` (loaded and warmed up)."""
    if not getattr(backend, "may_run_inline", True):
        # e.g. an async user model: its call waits on another thread's loop,
        # which on the request loop would stall every request of the replica
        return Execution(False, "backend: waits on its own event loop")
    if batching.inline is not None:
        return Execution(batching.inline, "config")
    if batching.max_concurrent_batches > 1:  # parallel model calls need threads
        return Execution(False, "config: max_concurrent_batches > 1")
    one = backend.example_inputs(1)
    timed_rows, timed_s = 1, median_time(lambda: backend.infer(one))
    rows = batching.max_batch_size if batchable else 1
    if timed_s <= INLINE_BUDGET_S and rows > 1:
        batch = backend.example_inputs(rows)
        backend.infer(batch)  # a new batch size may allocate on its first call
        timed_rows, timed_s = rows, median_time(lambda: backend.infer(batch))
    return Execution(timed_s <= INLINE_BUDGET_S, "warm-up timing", timed_rows, timed_s)
