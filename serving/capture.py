"""Inference capture: a sampled share of requests and answers, written to
Parquet off the request path, and the labels that arrive for them.

A model server with ``capture:`` (serving/config.py CaptureConfig) owns one
:class:`CaptureWriter`. On the request path it costs one random draw
(:meth:`CaptureWriter.sampled`); a sampled request's arrays are copied and
appended to a queue (:meth:`CaptureWriter.offer`), which is bounded in rows:
a request that would pass ``max_queue_rows`` is dropped and counted, never
waited for. A background thread moves queued rows to the open file every
``flush_interval_s`` and finishes files by rows, bytes or age
(common/capture_files.py has the layout). :meth:`CaptureWriter.close`
drains the queue and finishes the open file, so a writer that is stopped
loses nothing; one that is killed leaves its open file for the next
writer of that version to salvage when it starts.

Labels (:class:`LabelWriter`) come from the feedback route and are
written as a finished file before the route answers: several feedback
calls that arrive while one file is being written share the next one.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import posixpath
import random
import threading
import time
from typing import Any

import numpy as np

from flywheel.common.capture_files import (
    CapturedRequest, OpenCaptureFile, append_label_rows, filesystem, new_writer_id, require_pyarrow, rows_table,
    salvage_stale, schema_key,
)
from flywheel.serving.config import CaptureConfig

log = logging.getLogger(__name__)

DROP_REASONS = ("queue_full", "write_error")


class CaptureWriter:
    """Captures of one model version. ``sampled`` and ``offer`` run on the
    serving loop's thread (one thread); everything else on the writer's own
    thread. Counters (ints, read by metrics at any time): ``rows_written``
    (rows in finished files), ``files_finished``, ``dropped`` (by reason),
    ``salvaged_rows`` (rows of dead writers' open files finished at start).

    Raises ConfigError (with the install hint) without pyarrow."""

    def __init__(self, cfg: CaptureConfig, model: str, version: str, *, seed: int | None = None,
                 writer_id: str | None = None, stale_after_s: float | None = None) -> None:
        """``stale_after_s``: an open file of another writer untouched this
        long is salvaged (at start, then every ``stale_after_s / 2``: a
        writer that died moments before this one started is found later);
        default ``max_file_age_s`` + 10 flush intervals + 60 s."""
        require_pyarrow()
        self.cfg, self.model, self.version = cfg, model, version
        self.writer_id = writer_id or new_writer_id()
        self._fs, base = filesystem(cfg.path)
        self._dir = posixpath.join(base, model, version)
        self._stale_after_s = (cfg.max_file_age_s + 10 * cfg.flush_interval_s + 60
                               if stale_after_s is None else stale_after_s)
        self._rng = random.Random(seed)
        self._p = cfg.sample
        self._queue: collections.deque[CapturedRequest] = collections.deque()
        self._offered = 0  # rows queued, ever (written by the serving thread only)
        self._taken = 0  # rows taken off the queue, ever (the writer thread only)
        self._wake_rows = max(1, cfg.max_queue_rows // 2)
        self._wake = threading.Event()
        self._stopping = False
        self._file: OpenCaptureFile | None = None
        self._file_key: tuple | None = None
        self._seq = 0
        self.rows_written = 0
        self.files_finished = 0
        self.salvaged_rows = 0
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self._thread = threading.Thread(target=self._run, name=f"flywheel-capture-{model}", daemon=True)
        self.labels = LabelWriter(cfg.path, model, self.writer_id)

    def start(self) -> None:
        self._thread.start()

    # -- the request path (serving thread) -----------------------------------
    def sampled(self) -> bool:
        """Whether to capture the next request (one draw)."""
        return self._rng.random() < self._p

    def offer(self, request_id: str, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray],
              rows: int = 0) -> None:
        """Queue one request's ``rows`` rows (arrays with the row axis first,
        not shared with anyone: the caller copies; 0 = count them), or count
        them as dropped when the queue is full. Never blocks, never raises
        for a full queue."""
        n = rows or len(next(iter(inputs.values())))
        if self._offered - self._taken + n > self.cfg.max_queue_rows:
            self.dropped["queue_full"] += n
            return
        self._offered += n
        self._queue.append(CapturedRequest(request_id, time.time(), inputs, outputs))
        if self._offered - self._taken >= self._wake_rows:
            self._wake.set()

    @property
    def queued_rows(self) -> int:
        return self._offered - self._taken

    # -- the writer thread ----------------------------------------------------
    def _salvage(self) -> None:
        try:
            self.salvaged_rows += salvage_stale(self._fs, self._dir, self._stale_after_s, self.writer_id)
        except Exception:  # noqa: BLE001 - capture never stops serving
            log.warning("capture salvage in %s failed", self._dir, exc_info=True)

    def _run(self) -> None:
        self._salvage()
        next_salvage = time.monotonic() + self._stale_after_s / 2
        while True:
            if time.monotonic() >= next_salvage:
                self._salvage()
                next_salvage = time.monotonic() + self._stale_after_s / 2
            self._wake.wait(self.cfg.flush_interval_s)
            self._wake.clear()
            stopping = self._stopping
            self._drain()
            f = self._file
            if f is not None and (stopping or time.monotonic() - f.opened >= self.cfg.max_file_age_s):
                self._finish()
            if stopping:
                return

    def _drain(self) -> None:
        queue, batch = self._queue, []
        while queue:
            batch.append(queue.popleft())
        if not batch:
            return
        self._taken += sum(len(next(iter(r.inputs.values()))) for r in batch)
        first = batch[0]
        if all(r.inputs.keys() == first.inputs.keys() and r.outputs.keys() == first.outputs.keys() for r in batch):
            key = schema_key(first)
            if _one_dtype(batch):
                self._write(batch, key)
                return
        group: list[CapturedRequest] = []  # tensors changed: one file per schema
        key = None
        for req in batch:
            k = schema_key(req)
            if group and k != key:
                self._write(group, key)
                group = []
            group.append(req)
            key = k
        self._write(group, key)

    def _write(self, group: list[CapturedRequest], key: tuple) -> None:
        rows = sum(len(next(iter(r.inputs.values()))) for r in group)
        try:
            table = rows_table(group, self.model, self.version)
        except Exception:  # noqa: BLE001
            log.warning("capture of %s:%s: rows could not be converted", self.model, self.version, exc_info=True)
            self.dropped["write_error"] += rows
            return
        if self._file is not None and key != self._file_key:
            self._finish()  # a new schema starts a new file
        while len(table):
            try:
                if self._file is None:
                    self._seq += 1
                    self._file = OpenCaptureFile(self._fs, self._dir, self.writer_id, self._seq, table.schema)
                    self._file_key = key
                f = self._file
                part = table.slice(0, self.cfg.max_file_rows - f.rows)
                f.write(part)
            except Exception:  # noqa: BLE001 - storage trouble: count, keep serving
                log.warning("capture write to %s failed", self._dir, exc_info=True)
                self._abandon(extra=len(table))
                return
            table = table.slice(len(part))
            if f.rows >= self.cfg.max_file_rows or f.bytes >= self.cfg.max_file_bytes:
                self._finish()

    def _finish(self) -> None:
        f, self._file = self._file, None
        try:
            if f.finish() is not None:
                self.rows_written += f.rows
                self.files_finished += 1
        except Exception:  # noqa: BLE001
            log.warning("capture file %s could not be finished", f.path, exc_info=True)
            self.dropped["write_error"] += f.rows

    def _abandon(self, extra: int) -> None:
        f, self._file = self._file, None
        lost = extra
        if f is not None:
            lost += f.rows
            f.abandon()
        self.dropped["write_error"] += lost

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is queued, finish the open file, stop the thread
        (blocking: call it off the serving loop). Safe to call twice."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("capture writer of %s:%s did not stop within %.0f s", self.model, self.version, timeout_s)


def _one_dtype(batch: list[CapturedRequest]) -> bool:
    """Whether each tensor has one dtype and rank across ``batch`` (a set
    per tensor, not a key per request: this runs for every captured row)."""
    for attr in ("inputs", "outputs"):
        for name in getattr(batch[0], attr):
            if len({(a.dtype, a.ndim) for a in (getattr(r, attr)[name] for r in batch)}) != 1:
                return False
    return True


class LabelWriter:
    """Labels of one endpoint, written under ``<root>/<endpoint>/labels/``.

    :meth:`write` runs on an event loop; the rows are appended to this
    writer's current labels file in a worker thread (one file takes every
    batch for ``rotate_s`` or ``rotate_rows``; on an object store each batch
    is a finished file) and the call returns once they are flushed to
    storage, or raises what the storage raised."""

    def __init__(self, root: str, endpoint: str, writer_id: str, *, rotate_s: float = 300.0,
                 rotate_rows: int = 100_000) -> None:
        self.root, self.endpoint, self.writer_id = root, endpoint, writer_id
        self._pending: list[tuple[list[dict], asyncio.Future]] = []
        self._busy = False
        self._seq = 0
        self._started = 0.0  # when the current file was begun (0: none yet)
        self._rows = 0
        self._rotate_s, self._rotate_rows = rotate_s, rotate_rows
        self.files = 0

    async def write(self, rows: list[dict]) -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._pending.append((rows, done))
        if not self._busy:
            self._busy = True
            loop.create_task(self._drain())
        await done

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                rows = [r for rs, _ in batch for r in rs]
                now = time.time()
                if not self._started or now - self._started >= self._rotate_s or self._rows >= self._rotate_rows:
                    self._seq, self._started, self._rows = self._seq + 1, now, 0
                    self.files += 1
                try:
                    _, appended = await loop.run_in_executor(
                        None, append_label_rows, self.root, self.endpoint, rows, self.writer_id, self._seq,
                        self._started,
                    )
                    self._rows += len(rows)
                    if not appended:  # a file per batch: the next batch starts another
                        self._started = 0.0
                except Exception as exc:  # noqa: BLE001 - every waiter learns it
                    self._started = 0.0  # a torn append must not run into the next batch's lines
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for _, fut in batch:
                    if not fut.done():
                        fut.set_result(None)
        finally:
            self._busy = False


def label_rows(request_id: str, label: float | list[float], ts: float | None = None) -> list[dict]:
    """Label-file rows for one feedback label: a list labels rows 0..n-1 of
    the request, a single number every row of it (row -1)."""
    ts = time.time() if ts is None else ts
    if isinstance(label, list):
        return [{"request_id": request_id, "row": i, "label": v, "ts": ts} for i, v in enumerate(label)]
    return [{"request_id": request_id, "row": -1, "label": label, "ts": ts}]


def endpoint_labels(router: Any, name: str) -> LabelWriter | None:
    """Where this process writes endpoint ``name``'s labels: a colocated
    model's capture writer's, else a writer of its own for the capture root
    the deployment gives the endpoint (a dedicated model captures in its own
    process, while feedback reaches the ingress); None: it captures nothing."""
    writers = local_captures(router, name)
    if writers:
        return writers[0].labels
    root = router.label_roots.get(name)
    if not root:
        return None
    writer = router.label_writers.get(name)
    if writer is None:
        writer = router.label_writers[name] = LabelWriter(root, name, new_writer_id())
    return writer


def local_captures(router: Any, name: str | None = None) -> list[CaptureWriter]:
    """The capture writers of the model servers this process hosts
    (colocated models), of endpoint ``name`` or of all."""
    found = []
    for m in router.models():
        server = getattr(m.channel, "server", None)
        writer = getattr(server, "capture", None)
        if writer is not None and (name is None or m.route.name == name):
            found.append(writer)
    return found


def _lab(w: CaptureWriter) -> str:
    esc = lambda v: v.replace("\\", "\\\\").replace('"', '\\"')  # noqa: E731
    return f'model="{esc(w.model)}",version="{esc(w.version)}"'


def render_capture_metrics(writers: list[CaptureWriter]) -> bytes:
    """Prometheus text of the writers' counters (this process's own)."""
    if not writers:
        return b""
    out = ["# HELP flywheel_capture_rows_total Captured rows in finished capture files",
           "# TYPE flywheel_capture_rows_total counter"]
    out += [f"flywheel_capture_rows_total{{{_lab(w)}}} {w.rows_written}" for w in writers]
    out += ["# HELP flywheel_capture_dropped_rows_total Sampled rows not captured: queue_full (the writer's "
            "queue was at capture.max_queue_rows) or write_error (storage failed)",
            "# TYPE flywheel_capture_dropped_rows_total counter"]
    out += [f'flywheel_capture_dropped_rows_total{{{_lab(w)},reason="{r}"}} {w.dropped[r]}'
            for w in writers for r in DROP_REASONS]
    out += ["# HELP flywheel_capture_files_total Capture files finished",
            "# TYPE flywheel_capture_files_total counter"]
    out += [f"flywheel_capture_files_total{{{_lab(w)}}} {w.files_finished}" for w in writers]
    out += ["# HELP flywheel_capture_salvaged_rows_total Rows of dead writers' open files finished at start",
            "# TYPE flywheel_capture_salvaged_rows_total counter"]
    out += [f"flywheel_capture_salvaged_rows_total{{{_lab(w)}}} {w.salvaged_rows}" for w in writers]
    out += ["# HELP flywheel_capture_queued_rows Sampled rows waiting for the capture writer",
            "# TYPE flywheel_capture_queued_rows gauge"]
    out += [f"flywheel_capture_queued_rows{{{_lab(w)}}} {w.queued_rows}" for w in writers]
    return ("\n".join(out) + "\n").encode()
