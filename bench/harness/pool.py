"""Load-generator processes and the figures of one measured step.

The pool starts ``processes`` locust workers (``worker.py``), splits each
step's users or arrival rate evenly between them, and merges what they send
back: latency histograms are added bucket by bucket, so percentiles are those
of every request. It also judges who limited the step (``merge_replies``):
a load generator that used most of its core (gevent runs on one) while the
host had CPU to spare was the limit, not the server.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import select
import subprocess
import sys
import tempfile
import time

import msgspec

from flywheel.bench.harness.histogram import LatencyHistogram
from flywheel.bench.harness.payloads import WorkPlan
from flywheel.bench.harness.scenario import SLO
from flywheel.protocol.errors import ConfigError, UnavailableError

# A load generator busy this share of its core could not have sent more.
CLIENT_SATURATED = 0.90
HOST_SATURATED = 0.95
_START_TIMEOUT_S = 60.0


class ProtocolFigures(msgspec.Struct):
    ok: int
    errors: int
    throughput_rps: float
    p50_ms: float | None
    p99_ms: float | None


class StepResult(msgspec.Struct):
    """One load level, measured after its warm-up."""

    by: str
    level: float
    users: int
    offered_rps: float | None
    elapsed_s: float
    ok: int
    errors: int
    error_rate: float
    throughput_rps: float
    achieved: float | None
    mean_ms: float | None
    p50_ms: float | None
    p90_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    p999_ms: float | None
    max_ms: float | None
    protocols: dict[str, ProtocolFigures]
    error_counts: dict[str, int]
    client_cpu: list[float]
    host_cpu: float
    limited_by: str
    slo_ok: bool = False
    slo_failures: list[str] = []


def _ms(hist: LatencyHistogram, q: float) -> float | None:
    v = hist.percentile(q)
    return None if math.isnan(v) else round(v * 1e3, 4)


def judge(step: StepResult, slo: SLO) -> StepResult:
    """Set ``slo_ok`` / ``slo_failures`` from the SLO."""
    fails = []
    if step.ok == 0:
        fails.append("no successful requests")
    elif step.p99_ms is not None and step.p99_ms > slo.p99_ms:
        fails.append(f"p99 {step.p99_ms:.2f} ms > {slo.p99_ms:g} ms")
    if step.error_rate > slo.max_error_rate:
        fails.append(f"error rate {step.error_rate:.4f} > {slo.max_error_rate:g}")
    if step.achieved is not None and step.achieved < slo.min_achieved:
        fails.append(
            f"achieved {step.throughput_rps:.1f} of {step.offered_rps:.1f} req/s offered "
            f"({step.achieved:.0%} < {slo.min_achieved:.0%})"
        )
    return msgspec.structs.replace(step, slo_ok=not fails, slo_failures=fails)


def merge_replies(by: str, level: float, users: int, rate: float | None, replies: list[dict]) -> StepResult:
    hist = LatencyHistogram()
    protos: dict[str, dict] = {}
    errors_by_msg: dict[str, int] = {}
    for r in replies:
        hist.merge(LatencyHistogram.from_dict(r["hist"]))
        for name, p in r["protocols"].items():
            agg = protos.setdefault(name, {"ok": 0, "errors": 0, "hist": LatencyHistogram()})
            agg["ok"] += p["ok"]
            agg["errors"] += p["errors"]
            agg["hist"].merge(LatencyHistogram.from_dict(p["hist"]))
        for msg, n in r["errors"].items():
            errors_by_msg[msg] = errors_by_msg.get(msg, 0) + n
    elapsed = max(r["elapsed_s"] for r in replies)
    ok = hist.count
    errors = sum(errors_by_msg.values())
    done = ok + errors
    client_cpu = [round(r["cpu_s"] / max(r["elapsed_s"], 1e-9), 3) for r in replies]
    host_cpu = round(max(r["host_busy"] for r in replies), 3)
    # By rate, achieved compares answers with the requests the schedule
    # called for in the window (not rate x seconds: with few users the
    # window's edges cut a visible share of one period per user).
    scheduled = sum(r.get("scheduled") or 0 for r in replies)
    achieved = (round(done / scheduled, 4) if scheduled else 0.0) if rate else None
    # The client was the limit when it used its core while the server still
    # had CPU (the host was not saturated); with both, they competed for the
    # host's cores ("host"). Either way the figures are a lower bound.
    if max(client_cpu) >= CLIENT_SATURATED and host_cpu < HOST_SATURATED:
        limited_by = "client"
    elif rate and achieved is not None and achieved < 0.95:
        limited_by = "host" if host_cpu >= HOST_SATURATED else "server"
    elif host_cpu >= HOST_SATURATED:
        limited_by = "host"
    else:
        limited_by = "server" if by == "users" else "offered load"
    return StepResult(
        by=by,
        level=level,
        users=users,
        offered_rps=rate,
        elapsed_s=round(elapsed, 3),
        ok=ok,
        errors=errors,
        error_rate=round(errors / done, 6) if done else 0.0,
        throughput_rps=round(ok / elapsed, 2) if elapsed else 0.0,
        achieved=achieved,
        mean_ms=None if not ok else round(hist.mean_s * 1e3, 4),
        p50_ms=_ms(hist, 50),
        p90_ms=_ms(hist, 90),
        p95_ms=_ms(hist, 95),
        p99_ms=_ms(hist, 99),
        p999_ms=_ms(hist, 99.9),
        max_ms=None if not ok else round(hist.max_s * 1e3, 4),
        protocols={
            k: ProtocolFigures(
                ok=v["ok"], errors=v["errors"], throughput_rps=round(v["ok"] / elapsed, 2),
                p50_ms=_ms(v["hist"], 50), p99_ms=_ms(v["hist"], 99),
            )
            for k, v in sorted(protos.items())
        },
        error_counts=dict(sorted(errors_by_msg.items(), key=lambda kv: -kv[1])),
        client_cpu=client_cpu,
        host_cpu=host_cpu,
        limited_by=limited_by,
    )


def _split(total: float, parts: int) -> list[float]:
    base = [total // parts] * parts
    for i in range(int(total - sum(base))):
        base[i] += 1
    return base


class WorkerPool:
    """``processes`` locust workers for one WorkPlan; use as a context manager."""

    def __init__(self, plan: WorkPlan, processes: int = 1) -> None:
        self.plan = plan
        self.processes = processes
        self._procs: list[subprocess.Popen] = []
        self._logs: dict[int, tempfile._TemporaryFileWrapper] = {}
        self._plan_file = ""

    def __enter__(self) -> WorkerPool:
        if importlib.util.find_spec("locust") is None:
            raise ConfigError("the load generator needs locust: pip install 'flywheel-ml[bench]'")
        fd, self._plan_file = tempfile.mkstemp(prefix="fw-bench-", suffix=".msgpack")
        with os.fdopen(fd, "wb") as f:
            f.write(msgspec.msgpack.encode(self.plan))
        try:
            for _ in range(self.processes):
                log = tempfile.TemporaryFile(prefix="fw-bench-worker-")  # its stderr, for errors
                proc = subprocess.Popen(
                    [sys.executable, "-m", "flywheel.bench.harness.worker", self._plan_file],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                )
                self._procs.append(proc)
                self._logs[proc.pid] = log
            for p in self._procs:
                reply = self._read(p, _START_TIMEOUT_S)
                if not reply.get("ready"):
                    raise UnavailableError(f"load generator failed to start: {reply}")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for p in self._procs:
            try:
                if p.poll() is None:
                    p.stdin.write(b'{"cmd": "quit"}\n')
                p.stdin.close()
            except OSError:
                pass
        deadline = time.monotonic() + 10  # one deadline for all of them
        for p in self._procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()  # by our own handle (its PID), never by name
                p.wait()
            p.stdout.close()
        for log in self._logs.values():
            log.close()
        self._procs, self._logs = [], {}
        if self._plan_file:
            os.unlink(self._plan_file)
            self._plan_file = ""

    def _stderr_tail(self, proc: subprocess.Popen) -> str:
        log = self._logs.get(proc.pid)
        if log is None:
            return ""
        log.seek(0)
        tail = log.read().decode("utf-8", "replace").strip().splitlines()[-5:]
        return (": " + " | ".join(tail)) if tail else ""

    def _read(self, proc: subprocess.Popen, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                proc.kill()
                proc.wait()
                raise UnavailableError(
                    f"load generator {proc.pid} did not answer within {timeout_s:.0f}s{self._stderr_tail(proc)}"
                )
            ready, _, _ = select.select([proc.stdout], [], [], left)
            if ready:
                line = proc.stdout.readline()
                if not line:
                    code = proc.wait()
                    raise UnavailableError(f"load generator {proc.pid} exited (code {code}){self._stderr_tail(proc)}")
                return json.loads(line)

    def step(self, *, by: str, level: float, duration_s: float, warmup_s: float,
             max_requests: int, max_users: int) -> StepResult:
        """Run one load level on all workers at once and merge their figures."""
        if by == "users":
            shares = [int(u) for u in _split(level, self.processes) if u > 0]
            rates: list[float | None] = [None] * len(shares)
            users = int(level)
        else:
            users_total = max(max_users, self.processes)
            shares = [max(1, int(u)) for u in _split(users_total, self.processes)]
            rates = [level * u / sum(shares) for u in shares]
            users = sum(shares)
        procs = self._procs[: len(shares)]
        per_max = max(1, math.ceil(max_requests / len(procs)))
        for p, u, r in zip(procs, shares, rates):
            cmd = {"cmd": "step", "users": u, "rate": r, "duration_s": duration_s,
                   "warmup_s": warmup_s, "max_requests": per_max}
            p.stdin.write((json.dumps(cmd) + "\n").encode())
            p.stdin.flush()
        replies = [self._read(p, warmup_s + duration_s + 60) for p in procs]
        failed = [r["failed"] for r in replies if "failed" in r]
        if failed:
            raise UnavailableError(f"load generator failed: {failed[0]}")
        return merge_replies(by, level, users, level if by == "rate" else None, replies)
