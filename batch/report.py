"""How a run ended (:class:`BatchReport`), and its progress while it runs."""

from __future__ import annotations

import sys
import time

import msgspec


class PartitionFailure(msgspec.Struct, frozen=True):
    """A partition that was not written: re-run the same job to retry it."""

    partition: str
    source: str
    error: str


class BatchReport(msgspec.Struct, frozen=True):
    """A run's outcome.

    partitions / skipped / scored: all of them, those a resumed run found
    already written, and those written by this run. failed: the rest, each
    with its error (a re-run of the same job retries exactly these).
    rows / seconds / rows_per_s: rows written by this run and its wall time.
    busy_s: actor-seconds spent scoring partitions (rows / (busy_s / actors)
        is the rate once the actors are up, without their start-up).
    peak_rss_mb: the largest peak RSS of one scoring actor.
    nodes: the Ray nodes whose actors scored.
    metrics: evaluation mode only, over every row of the output (empty while
    a partition is missing). evaluation_id: the registry's record, when
    registered. evaluation_error: why the output, though written, could not
    be evaluated or recorded (bad labels, say).
    """

    run_id: str
    model: str
    model_sha256: str
    output: str
    partitions: int
    skipped: int
    scored: int
    failed: list[PartitionFailure]
    rows: int
    seconds: float
    rows_per_s: float
    actors: int
    nodes: list[str]
    peak_rss_mb: float
    busy_s: float = 0.0
    metrics: dict[str, float] = {}
    dataset_fingerprint: str = ""
    evaluation_id: int | None = None
    evaluation_error: str = ""

    @property
    def ok(self) -> bool:
        return not self.failed and not self.evaluation_error


def _eta(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.0f}m" if seconds < 5400 else f"{seconds / 3600:.1f}h"


class Progress:
    """Partitions and rows done, rows/s and an ETA, printed at most once a
    second (and at the end) to ``stream``."""

    def __init__(self, total_parts: int, total_rows: int | None, total_bytes: int, *, stream=None,
                 every_s: float = 1.0) -> None:
        self.total_parts, self.total_rows, self.total_bytes = total_parts, total_rows, total_bytes
        self.parts = self.rows = self.bytes = 0
        self.stream = stream if stream is not None else sys.stderr
        self.every_s = every_s
        self.start = self._last = time.monotonic()

    def advance(self, rows: int, size: int) -> None:
        self.parts += 1
        self.rows += rows
        self.bytes += size
        now = time.monotonic()
        if now - self._last >= self.every_s or self.parts == self.total_parts:
            self._last = now
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.start, 1e-9)
        rate = self.rows / elapsed
        done = (self.rows / self.total_rows) if self.total_rows else (self.bytes / max(self.total_bytes, 1))
        eta = elapsed * (1 - done) / done if 0 < done < 1 else 0.0
        rows = f"{self.rows:,}/{self.total_rows:,} rows" if self.total_rows else f"{self.rows:,} rows"
        return (f"batch: {self.parts}/{self.total_parts} partitions, {rows}, {rate:,.0f} rows/s"
                + (f", ETA {_eta(eta)}" if self.parts < self.total_parts else f", done in {elapsed:.1f}s"))
