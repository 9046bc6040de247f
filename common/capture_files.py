"""Capture files: what serving writes and training and the loops read.

Layout under a capture root (a local folder or an fsspec URI)::

    <root>/<endpoint>/<version>/captures-<first_ms>-<last_ms>-<writer>-<seq>.parquet   finished
    <root>/<endpoint>/<version>/captures-open-<writer>-<seq>.arrows.tmp             being written
    <root>/<endpoint>/labels/labels-<ms>-<writer>-<seq>.jsonl                       labels (or .parquet)

A writer appends rows to its open file as an Arrow IPC *stream* (each
flush one record batch, readable up to the last whole batch even when the
writer died), and *finishes* it by rewriting it as Parquet under a
``.parquet.tmp`` name renamed to its final name: readers see whole files or
nothing, and list only ``*.parquet``. A writer that starts *salvages* the
open files of writers gone for longer than a file may stay open (see
:func:`salvage_stale`): their whole batches become finished files, so rows
are in a finished file or counted as dropped (a torn last batch of a killed
process, and rows still queued in its memory, are lost with its counters;
the salvage logs the former).

Capture columns, one row per row of a request (a batched request of N rows
gives N rows with the same ``request_id`` and ``row`` 0..N-1):
``request_id`` string, ``row`` int32, ``ts`` float64 (epoch seconds),
``model`` string, ``version`` string, and per input / output tensor
``in.<name>`` / ``out.<name>``: the row's values flattened (a list of the
tensor's type, binary for BYTES) with ``in.<name>.shape`` /
``out.<name>.shape`` (list<int32>): the row's shape.

Label files (written by the feedback route, or dropped there by users):
JSON lines or Parquet, columns ``request_id`` (string), ``label`` (number),
``ts`` (float64 epoch seconds; the latest label of a row wins) and optional
``row`` (int; absent or -1: every row of the request). Names starting with
``.`` or ending in ``.tmp`` are ignored, so write a file under such a name
and rename it when complete. The feedback route appends each batch of labels
to its writer's current JSON-lines file (rotated every 5 minutes or 100,000
rows) on a local filesystem, so a reader may see a file grow: a torn last
line is skipped until it is whole; on an object store each batch is a file.

pyarrow (the ``train`` and ``batch`` extras) is imported only when used.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import socket
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from flywheel.protocol.errors import ConfigError, InvalidInputError

log = logging.getLogger(__name__)

LABELS_DIR = "labels"
OPEN_SUFFIX = ".arrows.tmp"
FINISHING_SUFFIX = ".parquet.tmp"
INSTALL_HINT = "pip install pyarrow (or the flywheel-ml[batch] or [train] extra, which bring it)"


def require_pyarrow():
    """The ``pyarrow`` module, or ConfigError with the install hint."""
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ConfigError(f"capture needs pyarrow, which is not installed: {INSTALL_HINT}") from None
    return pyarrow


def filesystem(root: str):
    """(fsspec filesystem, path inside it) of a capture root."""
    from fsspec.core import url_to_fs

    if "://" not in root:
        root = os.path.abspath(root)
    return url_to_fs(root)


def new_writer_id() -> str:
    """Names one writer's files: host, pid and a random part (no ``-``)."""
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:32] or "host"
    return f"{host}_{os.getpid()}_{os.urandom(3).hex()}"


class CapturedRequest(NamedTuple):
    """One captured request: its tensors with the row axis first."""

    request_id: str
    ts: float
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]


def _tensor_columns(pa, arrays: list[np.ndarray]):
    """(values list column, shape list column) for one tensor across requests."""
    counts = [len(a) for a in arrays]
    total = sum(counts)
    first = arrays[0].shape[1:]
    if all(a.shape[1:] == first for a in arrays):  # the usual case: one row shape, no loop per row
        offsets = np.arange(total + 1, dtype=np.int64) * math.prod(first)
        dims = np.tile(np.asarray(first, np.int32), total)
        shape_offsets = np.arange(total + 1, dtype=np.int32) * len(first)
    else:
        shapes = [a.shape[1:] for a, n in zip(arrays, counts) for _ in range(n)]
        offsets = np.zeros(total + 1, dtype=np.int64)
        np.cumsum([math.prod(s) for s in shapes], out=offsets[1:])
        dims = np.asarray([d for s in shapes for d in s], dtype=np.int32)
        shape_offsets = np.zeros(total + 1, dtype=np.int32)
        np.cumsum([len(s) for s in shapes], out=shape_offsets[1:])
    if arrays[0].dtype == object:
        flat = pa.array([bytes(v) for a in arrays for v in a.reshape(-1)], pa.binary())
    else:
        flat = pa.array(np.concatenate([a.reshape(-1) for a in arrays]))
    values = pa.LargeListArray.from_arrays(pa.array(offsets), flat)
    shapes_col = pa.ListArray.from_arrays(pa.array(shape_offsets), pa.array(dims))
    return values, shapes_col


def rows_table(requests: list[CapturedRequest], model: str, version: str):
    """A pyarrow Table of captured rows (see the module doc for columns).
    Every request must carry the same tensor names with the same dtypes."""
    pa = require_pyarrow()
    counts = [len(next(iter(r.inputs.values()))) for r in requests]
    total = sum(counts)
    if total == len(requests):  # one row each
        rids, rows = [r.request_id for r in requests], np.zeros(total, np.int32)
        ts = np.array([r.ts for r in requests], dtype=np.float64)
    else:
        rids = [r.request_id for r, n in zip(requests, counts) for _ in range(n)]
        rows = np.concatenate([np.arange(n, dtype=np.int32) for n in counts])
        ts = np.repeat(np.array([r.ts for r in requests], dtype=np.float64), counts)
    cols: dict[str, Any] = {
        "request_id": pa.array(rids, pa.string()),
        "row": pa.array(rows),
        "ts": pa.array(ts),
        "model": pa.repeat(pa.scalar(model, pa.string()), total),
        "version": pa.repeat(pa.scalar(version, pa.string()), total),
    }
    for prefix, attr in (("in.", "inputs"), ("out.", "outputs")):
        for name in getattr(requests[0], attr):
            values, shapes = _tensor_columns(pa, [getattr(r, attr)[name] for r in requests])
            cols[prefix + name] = values
            cols[prefix + name + ".shape"] = shapes
    return pa.table(cols)


def schema_key(req: CapturedRequest) -> tuple:
    """Requests with equal keys fit one file's schema."""
    return (tuple((k, v.dtype.str, v.ndim) for k, v in req.inputs.items()),
            tuple((k, v.dtype.str, v.ndim) for k, v in req.outputs.items()))


def _finished_name(first_ts: float, last_ts: float, writer: str, seq: int) -> str:
    return f"captures-{int(first_ts * 1000):013d}-{int(last_ts * 1000):013d}-{writer}-{seq:06d}.parquet"


class OpenCaptureFile:
    """One writer's open file (an Arrow IPC stream under a ``.tmp`` name).
    Not thread-safe: one writer thread owns it."""

    def __init__(self, fs, directory: str, writer: str, seq: int, schema) -> None:
        pa = require_pyarrow()
        self.fs, self.directory, self.writer, self.seq, self.schema = fs, directory, writer, seq, schema
        self.path = posixpath.join(directory, f"captures-open-{writer}-{seq:06d}{OPEN_SUFFIX}")
        fs.makedirs(directory, exist_ok=True)
        self._file = fs.open(self.path, "wb")
        self._stream = pa.ipc.new_stream(self._file, schema)
        self.opened = time.monotonic()
        self.rows = 0
        self.first_ts = self.last_ts = 0.0

    @property
    def bytes(self) -> int:
        return self._file.tell()

    def write(self, table) -> None:
        """Append one batch and flush it to storage (a crash keeps it)."""
        self._stream.write_table(table.cast(self.schema), max_chunksize=max(1, len(table)))
        self._file.flush()
        ts = table.column("ts")
        lo, hi = float(ts[0].as_py()), float(ts[len(ts) - 1].as_py())
        self.first_ts = lo if not self.rows else min(self.first_ts, lo)
        self.last_ts = max(self.last_ts, hi)
        self.rows += len(table)

    def finish(self) -> str | None:
        """Close and publish as Parquet; the finished path (None: no rows)."""
        self._stream.close()
        self._file.close()
        return finish_open_file(self.fs, self.path, self.writer, self.seq)

    def abandon(self) -> None:
        """Drop the file (after a write error): its rows count as dropped."""
        for close in (self._stream.close, self._file.close):
            try:
                close()
            except Exception:  # noqa: BLE001 - already broken
                pass
        try:
            self.fs.rm(self.path)
        except Exception:  # noqa: BLE001
            pass


def _read_stream(fs, path: str):
    """(table of the whole batches, complete?) of an open-file stream."""
    pa = require_pyarrow()
    batches, complete = [], True
    with fs.open(path, "rb") as f:
        try:
            reader = pa.ipc.open_stream(f)
        except (pa.ArrowInvalid, OSError):
            return None, False
        try:
            for batch in reader:
                batches.append(batch)
        except (pa.ArrowInvalid, OSError):
            complete = False
        return pa.Table.from_batches(batches, reader.schema), complete


def finish_open_file(fs, path: str, writer: str, seq: int) -> str | None:
    """Rewrite writer ``writer``'s open file ``seq`` (at ``path``) as a
    finished Parquet file (``.parquet.tmp``, then renamed) and remove it; the
    finished path, None when it held no rows."""
    import pyarrow.parquet as pq

    directory = posixpath.dirname(path)
    done = fs.glob(posixpath.join(directory, f"captures-*-{writer}-{seq:06d}.parquet"))
    if done:  # finished before a crash took the open file's removal
        fs.rm(path)
        return done[0]
    table, complete = _read_stream(fs, path)
    if not complete:
        log.warning("capture file %s ended in a torn batch (its writer died while writing): rows after "
                    "its %d whole rows are lost", path, 0 if table is None else len(table))
    if table is None or len(table) == 0:
        fs.rm(path)
        return None
    ts = table.column("ts").to_numpy()
    final = posixpath.join(directory, _finished_name(float(ts.min()), float(ts.max()), writer, seq))
    with fs.open(final + ".tmp", "wb") as f:
        pq.write_table(table, f)
    fs.mv(final + ".tmp", final)
    fs.rm(path)
    return final


def salvage_stale(fs, directory: str, stale_after_s: float, own_writer: str) -> int:
    """Finish the open files in ``directory`` untouched for ``stale_after_s``
    (their writer is gone: a live one finishes a file within its
    ``max_file_age_s``). Each is first renamed to a ``.claimed.tmp`` name of
    this writer, so that two writers starting together do not both take it
    (a claimer that dies in the middle leaves that file behind). Rows
    recovered."""
    import pyarrow.parquet as pq

    recovered = 0
    try:
        paths = fs.glob(posixpath.join(directory, f"captures-open-*{OPEN_SUFFIX}"))
    except FileNotFoundError:
        return 0
    now = time.time()
    for path in paths:
        name = posixpath.basename(path)[len("captures-open-"):-len(OPEN_SUFFIX)]
        writer, _, seq = name.rpartition("-")
        if writer == own_writer or not seq.isdigit():
            continue
        claimed = path[:-len(OPEN_SUFFIX)] + f".{own_writer}.claimed.tmp"
        try:
            if now - fs.modified(path).timestamp() < stale_after_s:
                continue
            fs.mv(path, claimed)
        except FileNotFoundError:  # another writer took it first
            continue
        try:
            for leftover in fs.glob(posixpath.join(directory, f"captures-*-{writer}-{seq}{FINISHING_SUFFIX}")):
                fs.rm(leftover)
            final = finish_open_file(fs, claimed, writer, int(seq))
            if final is not None:
                with fs.open(final, "rb") as f:
                    recovered += pq.ParquetFile(f).metadata.num_rows
                log.info("salvaged %s into %s", path, final)
        except Exception:  # noqa: BLE001 - a damaged file must not stop serving
            log.warning("could not salvage capture file %s", path, exc_info=True)
    return recovered


# -- labels ----------------------------------------------------------------

def write_label_file(root: str, endpoint: str, rows: list[dict], writer: str, seq: int) -> str:
    """Write label rows (``request_id``, ``row``, ``label``, ``ts``) as one
    finished JSON-lines file (temporary name, then renamed); its path."""
    fs, base = filesystem(root)
    directory = posixpath.join(base, endpoint, LABELS_DIR)
    fs.makedirs(directory, exist_ok=True)
    final = posixpath.join(directory, f"labels-{int(time.time() * 1000):013d}-{writer}-{seq:06d}.jsonl")
    body = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows).encode()
    with fs.open(final + ".tmp", "wb") as f:
        f.write(body)
    fs.mv(final + ".tmp", final)
    return final


def _appendable(fs) -> bool:
    """Storage that appends in place (a local or mounted filesystem); object
    stores rewrite whole objects, so there each batch is a file of its own."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def append_label_rows(root: str, endpoint: str, rows: list[dict], writer: str, seq: int,
                      started: float) -> tuple[str, bool]:
    """Append label rows to writer ``writer``'s labels file ``seq`` (begun at
    ``started``, epoch seconds) and flush them: one file takes many batches,
    visible to readers as it grows (a torn last line is skipped). Where the
    storage cannot append, the rows become a finished file of their own.
    Returns (the file, whether it was appended to)."""
    fs, base = filesystem(root)
    if not _appendable(fs):
        return write_label_file(root, endpoint, rows, writer, seq), False
    directory = posixpath.join(base, endpoint, LABELS_DIR)
    fs.makedirs(directory, exist_ok=True)
    path = posixpath.join(directory, f"labels-{int(started * 1000):013d}-{writer}-{seq:06d}.jsonl")
    body = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows).encode()
    with fs.open(path, "ab") as f:
        f.write(body)
        f.flush()
    return path, True


def _json_lines(data: bytes, path: str) -> list[dict]:
    records = []
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:  # the end of a file being appended to: the rest comes later
                continue
            log.warning("label file %s: line %d is not JSON; skipped", path, i + 1)
    return records


def _visible(path: str) -> bool:
    name = posixpath.basename(path)
    return not name.startswith(".") and not name.endswith(".tmp")


def read_labels(root: str, endpoint: str) -> dict[tuple[str, int], float]:
    """(request_id, row) -> label, the latest by ``ts``; row -1 = every row."""
    fs, base = filesystem(root)
    directory = posixpath.join(base, endpoint, LABELS_DIR)
    if not fs.exists(directory):
        return {}
    found: dict[tuple[str, int], tuple[float, float]] = {}
    for path in sorted(fs.ls(directory, detail=False)):
        if not _visible(path):
            continue
        if path.endswith(".jsonl"):
            with fs.open(path, "rb") as f:
                records = _json_lines(f.read(), path)
        elif path.endswith(".parquet"):
            import pyarrow.parquet as pq

            with fs.open(path, "rb") as f:
                records = pq.read_table(f).to_pylist()
        else:
            continue
        for r in records:
            try:
                key = (str(r["request_id"]), int(r.get("row", -1) if r.get("row") is not None else -1))
                label, ts = float(r["label"]), float(r.get("ts") or 0.0)
            except (KeyError, TypeError, ValueError):
                log.warning("label file %s: a row without request_id / numeric label is skipped: %r", path, r)
                continue
            if key not in found or ts >= found[key][0]:
                found[key] = (ts, label)
    return {k: v for k, (_, v) in found.items()}


# -- reading captures --------------------------------------------------------

@dataclass(frozen=True)
class Captured:
    """Captured rows of one endpoint, in file order.

    ``inputs`` / ``outputs``: name -> array [rows, *row shape] (an object
    array of per-row arrays where row shapes differ). ``labels``: int64 when
    every label is integral, else float64; with ``labelled=False``, float64
    with NaN for the rows without one."""

    request_id: np.ndarray
    row: np.ndarray
    ts: np.ndarray
    version: np.ndarray
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.request_id)


def _range_of(name: str) -> tuple[float, float] | None:
    parts = name.split("-")
    try:
        return int(parts[1]) / 1000, int(parts[2]) / 1000
    except (IndexError, ValueError):
        return None


def _tensor(values, shapes) -> np.ndarray:
    flat = values.flatten().to_numpy(zero_copy_only=False)
    dims = shapes.to_pylist()
    n = len(dims)
    if n and all(d == dims[0] for d in dims):
        return flat.reshape(n, *dims[0])
    offsets = values.offsets.to_numpy() - values.offsets[0].as_py()
    return np.array([flat[offsets[i]:offsets[i + 1]].reshape(dims[i]) for i in range(n)] + [None], object)[:-1]


def read_captured(path: str, endpoint: str, *, since: float = 0.0, until: float | None = None,
                  labelled: bool = True) -> Captured:
    """The captured rows of ``endpoint`` under the capture root ``path`` with
    ``since <= ts < until``, joined with their labels on (request_id, row)
    (a label with row -1 labels every row of its request); with
    ``labelled`` only the rows that have a label. Finished files only.
    Raises ConfigError without pyarrow."""
    pa = require_pyarrow()
    import pyarrow.parquet as pq

    fs, base = filesystem(path)
    top = posixpath.join(base, endpoint)
    tables = []
    files = fs.glob(posixpath.join(top, "*", "captures-*.parquet")) if fs.exists(top) else []
    for f in sorted(files, key=posixpath.basename):
        span = _range_of(posixpath.basename(f))
        if span is not None and (span[1] < since or (until is not None and span[0] >= until)):
            continue
        with fs.open(f, "rb") as fh:
            tables.append(pq.read_table(fh))
    empty = np.zeros(0)
    if not tables:
        return Captured(empty.astype(object), empty.astype(np.int32), empty, empty.astype(object))
    table = pa.concat_tables(tables, promote_options="permissive")
    ts = table.column("ts").to_numpy()
    keep = ts >= since if until is None else (ts >= since) & (ts < until)
    table = table.filter(pa.array(keep))
    rids = np.asarray(table.column("request_id").to_pylist(), dtype=object)
    rows = table.column("row").to_numpy()
    found = read_labels(path, endpoint)
    labels = np.array([found.get((r, int(i)), found.get((r, -1), np.nan)) for r, i in zip(rids, rows)],
                      dtype=np.float64)
    if labelled:
        mask = ~np.isnan(labels)
        table, rids, rows, labels = table.filter(pa.array(mask)), rids[mask], rows[mask], labels[mask]
        if np.all(labels == np.round(labels)):
            labels = labels.astype(np.int64)
    tensors: dict[str, dict[str, np.ndarray]] = {"in.": {}, "out.": {}}
    for name in table.column_names:
        for prefix in tensors:
            if name.startswith(prefix) and not name.endswith(".shape"):
                col = table.column(name).combine_chunks()
                tensors[prefix][name[len(prefix):]] = _tensor(col, table.column(name + ".shape").combine_chunks())
    return Captured(
        rids, rows, table.column("ts").to_numpy(), np.asarray(table.column("version").to_pylist(), dtype=object),
        tensors["in."], tensors["out."], labels,
    )


def labelled_accuracy(path: str, endpoint: str, since: float, until: float | None = None,
                      output: str | None = None) -> tuple[int, float | None]:
    """(labelled rows, share whose prediction equals the label) of the
    captures with ``since <= ts < until``: the prediction is the argmax of
    output ``output`` (default: the only or first output) over its row
    values, or the value itself for an output of one value per row. (0,
    None) without labelled rows. InvalidInputError for an unknown output."""
    cap = read_captured(path, endpoint, since=since, until=until, labelled=True)
    if len(cap) == 0:
        return 0, None
    if output is None:
        output = next(iter(cap.outputs))
    if output not in cap.outputs:
        raise InvalidInputError(f"output {output!r} was not captured; captured outputs: {sorted(cap.outputs)}")
    scores = np.asarray(cap.outputs[output]).reshape(len(cap), -1)
    pred = scores[:, 0] if scores.shape[1] == 1 else scores.argmax(axis=1)
    return len(cap), float(np.mean(pred.astype(np.float64) == cap.labels.astype(np.float64)))
