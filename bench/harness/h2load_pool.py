"""The h2load load generator: the same steps as WorkerPool, from nghttp2's C
client (``client: h2load``).

Why: locust spends tens of microseconds of Python per request, so on a small
machine it caps what a fast server can show; h2load costs a few. Each
protocol of the mix is one h2load process (``threads`` threads) POSTing the
first payload variant: closed loop (``-m 1`` per connection) by users, or by
rate each connection paced at its share (``--rps``). Users and rate are
split between protocols by weight. An answer is good when its status is 2xx
and, for gRPC (always HTTP 200), when it carries a message: a probe learns a
good answer's size first. The step's figures are merged by ``merge_replies``
exactly as locust's are; a process's CPU share is its own CPU time (from
``wait4``) over its run, per thread.

By rate, h2load paces each connection with its own timer, and connections
opened together tick together: arrivals come in bursts of up to one request
per connection, so at low rates its p99 is higher than locust's evenly
spread schedule would show.

Commands and output parsing are bench/h2load.py's (shared with the latency
benchmark).
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import tempfile
import time

from flywheel.bench import h2load
from flywheel.bench.harness.histogram import LatencyHistogram
from flywheel.bench.harness.payloads import WorkPlan
from flywheel.bench.harness.pool import StepResult, merge_replies
from flywheel.bench.harness.worker import host_busy_times
from flywheel.protocol.errors import ConfigError, UnavailableError

GRPC_FRAME = 5  # gRPC's length prefix: a compressed flag and 4 bytes of length


def targets(plan: WorkPlan) -> dict[str, h2load.Target]:
    """One h2load target per protocol of the plan's mix (first variant)."""
    body = plan.variants[0]
    auth = (f"authorization: {plan.authorization}",) if plan.authorization else ()
    url = plan.http + plan.infer_path
    every = {
        "http_json": h2load.Target(url, body.json, ("content-type: application/json", *auth)),
        "http_binary": h2load.Target(url, body.binary, (
            "content-type: application/octet-stream",
            f"inference-header-content-length: {body.binary_header_length}", *auth)),
        "grpc": h2load.Target(
            f"http://{plan.grpc}{plan.grpc_method}",
            b"\x00" + len(body.grpc).to_bytes(4, "big") + body.grpc,
            ("content-type: application/grpc", "te: trailers", *auth), grpc=True),
    }
    return {p: every[p] for p in plan.weights}


def split_by_weight(total: int, weights: dict[str, float]) -> dict[str, int]:
    """``total`` whole units shared in proportion to ``weights`` (largest
    remainders first; a protocol may get none when total is small)."""
    s = sum(weights.values())
    exact = {k: total * w / s for k, w in weights.items()}
    out = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: out[k] - exact[k])[: total - sum(out.values())]:
        out[k] += 1
    return out


def run_process(cmd: list[str], timeout_s: float) -> tuple[str, float, float]:
    """Run one h2load command; its output, wall seconds and CPU seconds
    (its own user + system time, from ``wait4``: Popen's own wait would
    discard them, so the child is reaped here)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    chunks = []
    with proc.stdout:
        while True:
            left = t0 + timeout_s - time.perf_counter()
            ready = select.select([proc.stdout], [], [], max(0.0, left))[0] if left > 0 else []
            if not ready:
                proc.kill()  # our own child, by its handle
                os.wait4(proc.pid, 0)
                proc.returncode = -9
                raise UnavailableError(f"h2load did not finish within {timeout_s:.0f}s")
            data = proc.stdout.read1(65536)
            if not data:
                break
            chunks.append(data)
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    out = b"".join(chunks).decode("utf-8", "replace")
    if proc.returncode != 0:
        raise UnavailableError(f"h2load exited with {proc.returncode}: {out.strip()[-500:]}")
    return out, wall, usage.ru_utime + usage.ru_stime


class H2loadPool:
    """Steps driven by h2load, for one WorkPlan; use as a context manager.
    ``threads``: h2load threads per protocol (each one core at most)."""

    def __init__(self, plan: WorkPlan, threads: int = 1) -> None:
        if not h2load.available():
            raise ConfigError(f"client: h2load is not installed: {h2load.INSTALL_HINT}")
        self.plan = plan
        self.threads = threads
        self.targets = targets(plan)
        self._work = ""
        self._bodies: dict[str, str] = {}
        self._runs = 0  # h2load appends to a --log-file: each run writes its own

    def __enter__(self) -> H2loadPool:
        self._work = tempfile.mkdtemp(prefix="fw-bench-h2load-")
        for proto, target in self.targets.items():
            self._bodies[proto] = os.path.join(self._work, proto)
            with open(self._bodies[proto], "wb") as f:
                f.write(target.body)
        if "grpc" in self.targets:
            self._learn_grpc_answer_size()
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self._work, ignore_errors=True)

    def _learn_grpc_answer_size(self) -> None:
        target = self.targets["grpc"]
        log = os.path.join(self._work, "probe.log")
        cmd = h2load.command(target.url, target, self._bodies["grpc"], 1, 1, log)
        cmd[cmd.index("-D"):cmd.index("-D") + 2] = ["-n", "1"]  # one request, not a timed run
        out, _, _ = run_process(cmd, 60)
        data = h2load.parse_data_bytes(out)
        ok, bad = h2load.read_log(log) if os.path.exists(log) else ([], [])
        if len(ok) != 1 or data <= GRPC_FRAME:
            raise UnavailableError(f"gRPC probe of {target.url} got no message (statuses {bad}): {out[-300:]}")
        self.targets["grpc"] = h2load.Target(target.url, target.body, target.headers, True, data - GRPC_FRAME)

    def step(self, *, by: str, level: float, duration_s: float, warmup_s: float,
             max_requests: int, max_users: int) -> StepResult:
        """One load level, every protocol at once (``max_requests`` is not
        honoured: h2load steps end by time, whole seconds)."""
        del max_requests  # the scenario refuses a request bound for h2load
        if by == "users":
            conns = split_by_weight(int(level), self.plan.weights)
        else:
            total = max(max_users, len(self.plan.weights))
            conns = {k: max(1, n) for k, n in split_by_weight(total, self.plan.weights).items()}
        weight_sum = sum(self.plan.weights.values())
        rates = {k: level * w / weight_sum for k, w in self.plan.weights.items()} if by == "rate" else {}
        jobs = {k: n for k, n in conns.items() if n > 0}
        if warmup_s > 0:  # not recorded; opens the server's lazy paths too
            self._run(jobs, rates, warmup_s, "warm")
        seconds = max(1, round(duration_s))
        host0 = host_busy_times()
        replies = self._run(jobs, rates, seconds, "run")
        host1 = host_busy_times()
        busy = (host1[0] - host0[0]) / max(host1[1] - host0[1], 1e-9)
        for r in replies:
            r["host_busy"] = busy
        return merge_replies(by, level, int(level) if by == "users" else sum(jobs.values()),
                             level if by == "rate" else None, replies)

    def _run(self, jobs: dict[str, int], rates: dict[str, float], seconds: float, tag: str) -> list[dict]:
        procs = {}
        self._runs += 1
        for proto, n in jobs.items():
            target = self.targets[proto]
            log = os.path.join(self._work, f"{tag}-{self._runs}-{proto}.log")
            rps = rates[proto] / n if rates else None
            cmd = h2load.command(target.url, target, self._bodies[proto], n, seconds, log, rps=rps,
                                 threads=self.threads)
            procs[proto] = (cmd, log, n, rps)
        # one thread per process only to wait on it: the h2load processes run at once
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(procs)) as ex:
            results = {p: ex.submit(run_process, c[0], seconds + 60) for p, c in procs.items()}
            outputs = {p: f.result() for p, f in results.items()}
        return [self._reply(proto, *procs[proto][1:], *outputs[proto], seconds) for proto in procs]

    def _reply(self, proto: str, log: str, conns: int, rps: float | None, out: str, wall: float,
               cpu: float, seconds: float) -> dict:
        ok, bad = h2load.read_log(log) if os.path.exists(log) else ([], [])
        errors: dict[str, int] = {}
        for status in bad:
            msg = f"{proto}: HTTP {status}" if status else f"{proto}: no answer (connection failed)"
            errors[msg] = errors.get(msg, 0) + 1
        target = self.targets[proto]
        short = h2load.grpc_without_message(target, len(ok), h2load.parse_data_bytes(out))
        if short:
            errors[f"{proto}: gRPC answer without a message (error trailers)"] = short
            del ok[:short]
        slow = [v for v in ok if v > self.plan.timeout_s]
        if slow:
            errors[f"{proto}: slower than timeout_s {self.plan.timeout_s:g}"] = len(slow)
            ok = [v for v in ok if v <= self.plan.timeout_s]
        hist = LatencyHistogram()
        for v in ok:
            hist.record(v)
        threads = max(1, min(self.threads, conns))
        return {
            "elapsed_s": seconds,
            # merge_replies divides by elapsed_s: this makes the share h2load's
            # CPU over its own run (connect and exit included), per thread
            "cpu_s": cpu / max(wall, 1e-9) / threads * seconds,
            "scheduled": round(rps * conns * seconds) if rps else None,
            "hist": hist.to_dict(),
            "protocols": {proto: {"ok": hist.count, "errors": sum(errors.values()), "hist": hist.to_dict()}},
            "errors": errors,
        }
