"""Closed-loop load from nghttp2's ``h2load`` (C), for the latency benchmark.

Why a C load generator: on a 2-core machine the client shares the CPU with
the server, and our Python client (bench/loadgen.py) spends ~30-60 us of CPU
per HTTP request and ~300 us per gRPC call, which caps what a fast server can
show. h2load speaks HTTP/1.1 (``--h1``) and h2c, which is all gRPC needs: a
POST of the 5-byte-prefixed message with ``content-type: application/grpc``.

Each of ``concurrency`` connections keeps one request in flight (``-m 1``).
Per-request latencies come from h2load's ``--log-file``; warm-up requests are
not recorded. Several URLs (replicas on their own ports) split the
connections between concurrent h2load processes. Failures: non-2xx statuses,
and for gRPC (always HTTP 200) answers shorter than a good answer, which is
what a trailers-only error reply is.

Install: ``apt-get install nghttp2-client`` (``make bench`` does, as root).
The harness (``flywheel bench``, bench/harness/h2load_pool.py) builds its
commands and reads their output with the functions here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

from flywheel.bench.loadgen import LoadResult, _check_loopback


INSTALL_HINT = "apt-get install nghttp2-client (or make bench-deps)"


def available() -> bool:
    return shutil.which("h2load") is not None


@dataclass(frozen=True)
class Target:
    url: str  # http://127.0.0.1:PORT/path
    body: bytes
    headers: tuple[str, ...] = ()
    grpc: bool = False
    good_bytes: int = 0  # size of a good answer's body, to tell gRPC errors apart


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run(urls: list[str], target: Target, *, concurrency: int, duration_s: float, warmup_s: float = 1.0) -> LoadResult:
    """Drive ``concurrency`` closed-loop connections spread over ``urls``
    (h2load takes whole seconds: durations are rounded, at least 1 s)."""
    for url in urls:
        _check_loopback(url.split("//", 1)[1].rsplit(":", 1)[0].strip("[]"))
    urls = urls[: max(1, min(len(urls), concurrency))]
    work = tempfile.mkdtemp(prefix="fw-h2load-")
    body = os.path.join(work, "body")
    with open(body, "wb") as f:
        f.write(target.body)
    try:
        if warmup_s > 0:  # not recorded; also opens the server's lazy paths
            _launch(urls, target, body, concurrency, warmup_s, work, "warm")
        for _attempt in range(3):
            result = _measure(urls, target, body, concurrency, duration_s, work)
            # h2load 1.52 now and then starts no request at all with one
            # connection; such a run is repeated, never reported
            if result.latencies_s or result.errors:
                return result
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _measure(urls, target: Target, body: str, concurrency: int, duration_s: float, work: str) -> LoadResult:
    procs = _launch(urls, target, body, concurrency, duration_s, work, "run", wait=False)
    result = LoadResult(concurrency, max(1, round(duration_s)))
    data_bytes = 0
    for proc, log in procs:
        out, _ = proc.communicate(timeout=duration_s + 60)
        data_bytes += parse_data_bytes(out)
        if not os.path.exists(log):
            raise RuntimeError(f"h2load failed: {out.strip()[-500:]}")
        ok, bad = read_log(log)
        result.latencies_s += ok
        result.errors += len(bad)
        result.error_samples += [f"HTTP {status}" for status in bad[: max(0, 5 - len(result.error_samples))]]
    if result.latencies_s:
        short = grpc_without_message(target, len(result.latencies_s), data_bytes)
        if short > 0:
            result.errors += short
            result.error_samples.append(f"{short} gRPC answers without a message (error trailers)")
            del result.latencies_s[: short]
    return result


def command(url: str, target: Target, body: str, clients: int, seconds: float, log: str, *,
            rps: float | None = None, threads: int = 1) -> list[str]:
    """The h2load command line: ``clients`` connections with one request in
    flight each for ``seconds`` (whole seconds, at least 1), the request
    ``body`` (a file) POSTed to ``url`` over HTTP/1.1, or h2c for gRPC;
    ``rps``: each connection's fixed request rate (open loop, up to the one
    in flight), else closed loop. Per-request lines go to ``log`` (h2load
    appends: give each run a fresh file)."""
    cmd = ["h2load", "-c", str(clients), "-m", "1", "-t", str(max(1, min(threads, clients))),
           "-D", str(max(1, round(seconds))), "-d", body, "--log-file", log]
    if rps is not None:
        cmd.append(f"--rps={rps:.6g}")
    if not target.grpc:
        cmd.append("--h1")
    for h in target.headers:
        cmd += ["-H", h]
    cmd.append(url)
    return cmd


def read_log(path: str) -> tuple[list[float], list[int]]:
    """h2load's ``--log-file``: latencies (s) of 2xx answers, and the
    statuses of the others (0: no answer: the connection failed)."""
    ok: list[float] = []
    bad: list[int] = []
    with open(path) as f:
        for line in f:
            _start, status, micros = line.split("\t")
            if 200 <= int(status) < 300:
                ok.append(int(micros) / 1e6)
            else:
                bad.append(int(status))
    return ok, bad


def grpc_without_message(target: Target, answered: int, data: int) -> int:
    """gRPC answers (all HTTP 200) that carried no message: a trailers-only
    error reply. Every good answer carries ``good_bytes`` + 5 framing bytes
    of data, so the answers the ``data`` bytes cannot cover were errors."""
    if not target.grpc or not target.good_bytes or not answered:
        return 0
    return max(0, answered - data // (target.good_bytes + 5))


def _launch(urls, target: Target, body: str, concurrency: int, seconds: float, work: str, tag: str, wait=True):
    procs = []
    for i, (url, c) in enumerate(zip(urls, _split(concurrency, len(urls)))):
        log = os.path.join(work, f"{tag}-{i}.log")
        if os.path.exists(log):  # a repeated run's: h2load would append to it
            os.remove(log)
        cmd = command(url, target, body, c, seconds, log)
        procs.append((subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), log))
    if not wait:
        return procs
    for proc, _ in procs:
        proc.communicate(timeout=seconds + 60)
    return procs


def parse_data_bytes(out: str) -> int:
    """The answers' body bytes from h2load's summary (its ``traffic:`` line)."""
    # "traffic: 1.92KB (1970) total, 225B (225) headers (...), 1.57KB (1610) data"
    for line in out.splitlines():
        if line.startswith("traffic:"):
            return int(line.rsplit("(", 1)[1].split(")", 1)[0])
    return 0
