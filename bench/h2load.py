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
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

from flywheel.bench.loadgen import LoadResult, _check_loopback


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
        data_bytes += _data_bytes(out)
        if not os.path.exists(log):
            raise RuntimeError(f"h2load failed: {out.strip()[-500:]}")
        with open(log) as f:
            for line in f:
                _start, status, micros = line.split("\t")
                if 200 <= int(status) < 300:
                    result.latencies_s.append(int(micros) / 1e6)
                else:
                    result.errors += 1
                    if len(result.error_samples) < 5:
                        result.error_samples.append(f"HTTP {status}")
    if target.grpc and target.good_bytes and result.latencies_s:
        # every good answer carries good_bytes (+5 bytes of gRPC framing)
        short = len(result.latencies_s) - data_bytes // (target.good_bytes + 5)
        if short > 0:
            result.errors += short
            result.error_samples.append(f"{short} gRPC answers without a message (error trailers)")
            del result.latencies_s[: short]
    return result


def _launch(urls, target: Target, body: str, concurrency: int, seconds: float, work: str, tag: str, wait=True):
    procs = []
    for i, (url, c) in enumerate(zip(urls, _split(concurrency, len(urls)))):
        log = os.path.join(work, f"{tag}-{i}.log")
        cmd = ["h2load", "-c", str(c), "-m", "1", "-t", "1", "-D", str(max(1, round(seconds))), "-d", body,
               "--log-file", log]
        if not target.grpc:
            cmd.append("--h1")
        for h in target.headers:
            cmd += ["-H", h]
        cmd.append(url)
        procs.append((subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), log))
    if not wait:
        return procs
    for proc, _ in procs:
        proc.communicate(timeout=seconds + 60)
    return procs


def _data_bytes(out: str) -> int:
    # "traffic: 1.92KB (1970) total, 225B (225) headers (...), 1.57KB (1610) data"
    for line in out.splitlines():
        if line.startswith("traffic:"):
            return int(line.rsplit("(", 1)[1].split(")", 1)[0])
    return 0
