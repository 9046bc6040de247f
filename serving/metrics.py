"""Prometheus metrics of the request path, shared by a node's ingress replicas.

Replicas report per-request timings (queue, compute, batch size, queue depth)
with every reply, so everything is recorded in the ingress process that
answered. Several ingress replicas share the public port (SO_REUSEPORT) and a
scrape of ``/metrics`` reaches any one of them, so each replica keeps its
numbers in its own *slot* of one memory-mapped file per deployment and node
(in /dev/shm), and every replica renders the sum over all slots: one scrape
sees the whole node. A replica that dies leaves its counts in its slot, and
the replica that takes the slot over goes on counting from them, so counters
never go backwards. One exception: the lost calls by replica name (an open
set of label values, unfit for a fixed slot) are this process's own; their
node-wide total is slotted like the rest.

Why not prometheus_client here: its labelled histograms cost about 40 us per
request on this class of machine (a lock, a label walk and a linear bucket
scan per observation, five observations per request), a third of the request
path. Here an observation is a ``bisect`` and a few array increments, on the
ingress's own loop thread (the only writer of its slot); the text format
(0.0.4) is built only when scraped.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import tempfile
from bisect import bisect_left
from collections.abc import Iterator

import numpy as np

from flywheel.protocol.errors import ErrorCode
from flywheel.serving._private.http_server import (
    BODY_TIMEOUT as HTTP_BODY_TIMEOUT,
    COUNTS as _HTTP,
    HEAD_TIMEOUT as HTTP_HEAD_TIMEOUT,
    IDLE_TIMEOUT as HTTP_IDLE_TIMEOUT,
    OPEN as HTTP_OPEN,
    REFUSED as HTTP_REFUSED,
)
from flywheel.serving._private.wire import Stats

_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
OUTCOMES = ("ok", *(c.name.lower() for c in ErrorCode))
_OUTCOME_INDEX = {o: i for i, o in enumerate(OUTCOMES)}

# Layout of one model's block of float64 values in a slot.
_N_LAT = len(_LATENCY_BUCKETS) + 2  # buckets, +Inf, sum
_N_BATCH = len(_BATCH_BUCKETS) + 2
_OFF_OUTCOMES = 0
_OFF_LATENCY = _OFF_OUTCOMES + len(OUTCOMES)
_OFF_QUEUE = _OFF_LATENCY + _N_LAT
_OFF_COMPUTE = _OFF_QUEUE + _N_LAT
_OFF_BATCH = _OFF_COMPUTE + _N_LAT
_OFF_DEPTH = _OFF_BATCH + _N_BATCH
_OFF_RETRIES = _OFF_DEPTH + 1
_OFF_LOST = _OFF_RETRIES + 1
BLOCK = _OFF_LOST + 1
# Lost replicas named per model in this process's own metrics: replicas
# come and go (each restart is a new name), so only the latest are kept.
NAMED_LOST_REPLICAS = 32

# name, type, help, (offset, bounds) for histograms
_HISTOGRAMS = (
    ("flywheel_request_latency_seconds", "Time from request parsed to response ready, in the ingress",
     _OFF_LATENCY, _LATENCY_BUCKETS),
    ("flywheel_queue_time_seconds", "Time a request waited in the replica's batch queue",
     _OFF_QUEUE, _LATENCY_BUCKETS),
    ("flywheel_compute_time_seconds", "Model time of the batch a request ran in", _OFF_COMPUTE, _LATENCY_BUCKETS),
    ("flywheel_batch_size", "Rows per model call", _OFF_BATCH, _BATCH_BUCKETS),
)

SLOTS = 64  # ingress replicas per node and deployment, restarts included
_MAGIC = 0x31_4D_57_46  # "FWM1"
_HEADER = 4  # int64: magic, slots, floats per slot, reserved


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class ModelMetrics:
    """One (model, version)'s block in this replica's slot."""

    __slots__ = ("name", "version", "_v", "_lost")

    def __init__(self, name: str, version: str, values: np.ndarray) -> None:
        self.name, self.version = name, version
        self._v = values  # a view of BLOCK floats
        self._lost: dict[str, int] = {}  # replica -> calls lost with it, oldest first

    def observe(self, outcome: str, latency_s: float, stats: Stats) -> None:
        v = self._v
        v[_OUTCOME_INDEX.get(outcome, 1)] += 1  # 1 = the first error code
        v[_OFF_LATENCY + bisect_left(_LATENCY_BUCKETS, latency_s)] += 1  # first bound >= value: "le"
        v[_OFF_LATENCY + _N_LAT - 1] += latency_s
        if outcome == "ok":
            q, c = stats.queue_us * 1e-6, stats.compute_us * 1e-6
            v[_OFF_QUEUE + bisect_left(_LATENCY_BUCKETS, q)] += 1
            v[_OFF_QUEUE + _N_LAT - 1] += q
            v[_OFF_COMPUTE + bisect_left(_LATENCY_BUCKETS, c)] += 1
            v[_OFF_COMPUTE + _N_LAT - 1] += c
            if stats.leader:
                v[_OFF_BATCH + bisect_left(_BATCH_BUCKETS, stats.batch_rows)] += 1
                v[_OFF_BATCH + _N_BATCH - 1] += stats.batch_rows
        v[_OFF_DEPTH] = stats.queue_depth

    def retried(self) -> None:
        self._v[_OFF_RETRIES] += 1

    def replica_lost(self, replica: str) -> None:
        """A call was in flight on a connection to ``replica`` when it
        dropped (the replica crashed, maybe because of the call)."""
        self._v[_OFF_LOST] += 1
        lost = self._lost
        lost[replica] = lost.pop(replica, 0) + 1  # the latest last
        if len(lost) > NAMED_LOST_REPLICAS:
            del lost[next(iter(lost))]

    def lost_by_replica(self) -> dict[str, int]:
        """This process's lost calls by replica (the latest NAMED_LOST_REPLICAS)."""
        return dict(self._lost)

    def count(self, outcome: str) -> int:
        """This replica's own count of ``outcome`` (for tests and logs)."""
        return int(self._v[_OUTCOME_INDEX[outcome]])


def metrics_path(key: str) -> str:
    """Where the deployment identified by ``key`` keeps its slots on this node."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return os.path.join(base, f"flywheel-metrics-{os.getuid()}-{digest}")


def _start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot (0 if unknown): with
    the pid, it tells a live owner from a new process that reused its pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def _alive(pid: int, started: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return started == 0 or _start_time(pid) in (0, started)


class ServingMetrics:
    """Request metrics by model and version, summed over a node's replicas.

    ``models`` fixes the layout (every replica of a deployment serves the
    same list); ``key`` names the deployment (the replicas sharing a port
    share a key). Without a key the numbers stay in this process.
    ``dedicated`` names the models whose queue depth every replica reports
    for the same model replicas (rendered as the largest report, not the sum).
    """

    def __init__(self, models: list[tuple[str, str]], key: str = "",
                 dedicated: frozenset[tuple[str, str]] = frozenset()) -> None:
        self._models = list(dict.fromkeys(models))
        self._dedicated = dedicated
        self._http_off = max(1, len(self._models)) * BLOCK
        floats = self._http_off + _HTTP
        # the layout is part of the name: other code on the node (an upgrade
        # rolling through) gets its own file rather than a clash
        self._path = metrics_path(f"{key}|{self._models}|{_MAGIC}|{SLOTS}|{BLOCK}|{_HTTP}") if key else ""
        self._mm: mmap.mmap | None = None
        self._closed = False
        if self._path:
            self._sweep()
            self._owners, self._data, self._slot = self._attach(floats)
        else:
            self._owners = np.array([[os.getpid(), 0]], np.int64)
            self._data = np.zeros((1, floats))
            self._slot = 0
        mine = self._data[self._slot]
        # this replica's HTTP server counts its connections here, after the
        # model blocks of its slot, in http_server's layout (REFUSED, ...)
        self.http_counts = mine[self._http_off : self._http_off + _HTTP]
        self._by_key = {
            (name, version): ModelMetrics(name, version, mine[i * BLOCK : (i + 1) * BLOCK])
            for i, (name, version) in enumerate(self._models)
        }

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        for _ in range(100):
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            st, now = os.fstat(fd), None
            with contextlib.suppress(OSError):
                now = os.stat(self._path)
            if st.st_nlink and now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                break
            # the last replica removed the file while we waited: open the new one
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        else:
            raise RuntimeError(f"cannot lock {self._path}")
        try:
            yield fd
        finally:
            # explicitly: the mmap holds a dup of fd, which would keep the
            # lock of the shared open file description otherwise
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _sweep(self) -> None:
        """Remove other deployments' files on this node whose replicas are
        all gone (killed ones never remove theirs), so that redeploys on new
        ports do not pile files up in /dev/shm."""
        base, mine = os.path.split(self._path)
        prefix = mine.rsplit("-", 1)[0] + "-"
        for name in os.listdir(base):
            if not name.startswith(prefix) or name == mine:
                continue
            path = os.path.join(base, name)
            with contextlib.suppress(OSError):
                fd = os.open(path, os.O_RDWR)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # busy: someone is attaching; skip
                    head = np.frombuffer(os.pread(fd, 8 * (_HEADER + 2 * SLOTS), 0), np.int64)
                    if len(head) == _HEADER + 2 * SLOTS and head[0] == _MAGIC:
                        owners = head[_HEADER:].reshape(SLOTS, 2)
                        if not any(self._live(owners, i) for i in range(SLOTS)):
                            os.unlink(path)
                finally:
                    os.close(fd)

    def _live(self, owners: np.ndarray, i: int) -> bool:
        return _alive(int(owners[i, 0]), int(owners[i, 1]))

    def _attach(self, floats: int):
        size = 8 * (_HEADER + 2 * SLOTS + SLOTS * floats)
        with self._locked() as fd:
            have = os.fstat(fd).st_size
            if have == 0:  # new: only its creator sizes it (the name fixes the layout)
                os.ftruncate(fd, size)
                os.posix_fallocate(fd, 0, size)  # a full /dev/shm fails here, not with SIGBUS later
            elif have != size:  # never resized under others' maps
                raise RuntimeError(f"{self._path} has {have} bytes, not the {size} of this layout")
            self._mm = mmap.mmap(fd, size)
            header = np.frombuffer(self._mm, np.int64, _HEADER)
            if header[0] not in (0, _MAGIC):
                raise RuntimeError(f"{self._path} is not a Flywheel metrics file")
            header[:3] = (_MAGIC, SLOTS, floats)
            owners = np.frombuffer(self._mm, np.int64, 2 * SLOTS, 8 * _HEADER).reshape(SLOTS, 2)
            data = np.frombuffer(self._mm, np.float64, SLOTS * floats, 8 * (_HEADER + 2 * SLOTS))
            data = data.reshape(SLOTS, floats)
            free = [i for i in range(SLOTS) if not self._live(owners, i)]
            if not free:
                raise RuntimeError(f"all {SLOTS} metrics slots of {self._path} are held by live processes")
            slot = free[0]
            owners[slot] = (os.getpid(), _start_time(os.getpid()))
            data[slot, _OFF_DEPTH : self._http_off : BLOCK] = 0  # gauges of a departed replica
            data[slot, self._http_off + HTTP_OPEN] = 0
            return owners, data, slot

    @property
    def path(self) -> str:
        """The shared file ("" when the numbers stay in this process)."""
        return self._path

    def for_model(self, name: str, version: str) -> ModelMetrics:
        return self._by_key[(name, version)]

    def observe(self, name: str, version: str, outcome: str, latency_s: float, stats: Stats) -> None:
        self.for_model(name, version).observe(outcome, latency_s, stats)

    def render(self) -> bytes:
        data = self._data
        total = data.sum(axis=0)
        live = [i for i in range(len(self._owners))
                if (i == self._slot and not self._closed) or self._live(self._owners, i)]
        depth_sum = data[live].sum(axis=0) if live else total * 0
        depth_max = data[live].max(axis=0) if live else total * 0
        out: list[str] = []
        blocks = [(f'model="{_escape(n)}"', f'version="{_escape(v)}"', i * BLOCK) for i, (n, v) in enumerate(self._models)]
        # counters are announced by their sample name, as prometheus_client does
        out += ["# HELP flywheel_requests_total Inference requests by outcome (ok or an error code name)",
                "# TYPE flywheel_requests_total counter"]
        for model, version, base in blocks:
            for j, outcome in enumerate(OUTCOMES):
                n = int(total[base + j])
                if n or outcome == "ok":
                    out.append(f'flywheel_requests_total{{{model},outcome="{outcome}",{version}}} {n}')
        for name, help_text, off, bounds in _HISTOGRAMS:
            out += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
            for model, version, base in blocks:
                labels = f"{model},{version}"
                running = 0
                for k, bound in enumerate((*bounds, "+Inf")):
                    running += int(total[base + off + k])
                    le = bound if bound == "+Inf" else repr(float(bound))
                    out.append(f'{name}_bucket{{{labels},le="{le}"}} {running}')
                out.append(f"{name}_count{{{labels}}} {running}")
                out.append(f"{name}_sum{{{labels}}} {float(total[base + off + len(bounds) + 1])!r}")
        out += ["# HELP flywheel_queue_depth Requests queued in the replicas, as last reported",
                "# TYPE flywheel_queue_depth gauge"]
        for (name, version), (m, v, b) in zip(self._models, blocks):
            depth = depth_max if (name, version) in self._dedicated else depth_sum
            out.append(f"flywheel_queue_depth{{{m},{v}}} {int(depth[b + _OFF_DEPTH])}")
        out += ["# HELP flywheel_replica_retries_total Requests sent again after their replica connection failed",
                "# TYPE flywheel_replica_retries_total counter"]
        out += [f"flywheel_replica_retries_total{{{m},{v}}} {int(total[b + _OFF_RETRIES])}" for m, v, b in blocks]
        out += ["# HELP flywheel_replica_lost_calls_total Calls in flight on a model replica connection that "
                "dropped (the replica died, maybe of the call)",
                "# TYPE flywheel_replica_lost_calls_total counter"]
        out += [f"flywheel_replica_lost_calls_total{{{m},{v}}} {int(total[b + _OFF_LOST])}" for m, v, b in blocks]
        out += ["# HELP flywheel_replica_lost_calls_by_replica_total The same by replica (Serve replica, pid, "
                f"node), as this ingress replica saw them (its latest {NAMED_LOST_REPLICAS} per model)",
                "# TYPE flywheel_replica_lost_calls_by_replica_total counter"]
        for (name, version), (m, v, _) in zip(self._models, blocks):
            for replica, n in self._by_key[(name, version)].lost_by_replica().items():
                out.append(f'flywheel_replica_lost_calls_by_replica_total{{{m},replica="{_escape(replica)}",{v}}} {n}')
        h = self._http_off
        out += ["# HELP flywheel_http_connections_refused_total HTTP connections answered 503 at "
                "server.max_connections", "# TYPE flywheel_http_connections_refused_total counter",
                f"flywheel_http_connections_refused_total {int(total[h + HTTP_REFUSED])}",
                "# HELP flywheel_http_connections_closed_total HTTP connections the server closed: a request "
                "head not complete within server.header_timeout_s, a body slower than the minimum rate after "
                "it, or idle past server.keepalive_timeout_s",
                "# TYPE flywheel_http_connections_closed_total counter",
                f'flywheel_http_connections_closed_total{{reason="head_timeout"}} {int(total[h + HTTP_HEAD_TIMEOUT])}',
                f'flywheel_http_connections_closed_total{{reason="body_timeout"}} {int(total[h + HTTP_BODY_TIMEOUT])}',
                f'flywheel_http_connections_closed_total{{reason="idle_timeout"}} {int(total[h + HTTP_IDLE_TIMEOUT])}',
                "# HELP flywheel_http_connections_open HTTP connections open now",
                "# TYPE flywheel_http_connections_open gauge",
                f"flywheel_http_connections_open {int(depth_sum[h + HTTP_OPEN])}"]
        out += ["# HELP flywheel_ingress_replicas Ingress replicas counted in these metrics (alive now)",
                "# TYPE flywheel_ingress_replicas gauge", f"flywheel_ingress_replicas {len(live) or 1}"]
        return ("\n".join(out) + "\n").encode()

    def close(self) -> None:
        """Give the slot back (its counts stay for the next owner); the last
        replica out removes the file. Rendering still works afterwards."""
        if self._mm is None or self._closed:
            return
        self._closed = True
        with self._locked():
            self._owners[self._slot] = (0, 0)
            self._data[self._slot, _OFF_DEPTH : self._http_off : BLOCK] = 0
            self._data[self._slot, self._http_off + HTTP_OPEN] = 0
            if not any(self._live(self._owners, i) for i in range(SLOTS)):
                with contextlib.suppress(OSError):
                    os.unlink(self._path)
        # the map stays open while views of it exist (numpy holds them);
        # it goes with the last of them
