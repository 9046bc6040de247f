"""Closed-loop HTTP load generator on uvloop, for benchmarks only.

Each of ``concurrency`` connections sends one pre-built request, reads the
whole response (Content-Length framing), records the latency and sends the
next, for a fixed duration after a warm-up. Only loopback addresses are
accepted: benchmarks never send traffic anywhere else.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np
import uvloop


@dataclass
class LoadResult:
    concurrency: int
    duration_s: float
    latencies_s: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return len(self.latencies_s) / self.duration_s if self.duration_s else 0.0

    def percentile_ms(self, q: float) -> float:
        if not self.latencies_s:
            return float("nan")
        return float(np.percentile(np.asarray(self.latencies_s), q) * 1e3)

    def summary(self) -> dict:
        return {
            "concurrency": self.concurrency,
            "requests": len(self.latencies_s),
            "errors": self.errors,
            "throughput_rps": round(self.throughput, 1),
            "p50_ms": round(self.percentile_ms(50), 3),
            "p90_ms": round(self.percentile_ms(90), 3),
            "p99_ms": round(self.percentile_ms(99), 3),
            "error_samples": self.error_samples[:3],
        }


def _check_loopback(host: str) -> None:
    from flywheel.serving.config import is_loopback

    if not is_loopback(host):
        raise ValueError(f"benchmarks only send traffic to loopback, not {host!r}")


def build_request(path: str, body: bytes, host: str = "127.0.0.1") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _worker(host, port, request, stop_at, record_from, result: LoadResult):
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while True:
            start = time.perf_counter()
            if start >= stop_at:
                return
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length) if length else b""
            end = time.perf_counter()
            if start >= record_from:
                if head.startswith(b"HTTP/1.1 200"):
                    result.latencies_s.append(end - start)
                else:
                    result.errors += 1
                    if len(result.error_samples) < 5:
                        result.error_samples.append((head.split(b"\r\n")[0] + b" " + body[:200]).decode(errors="replace"))
    finally:
        writer.close()


async def _run(host, port, request, concurrency, duration_s, warmup_s) -> LoadResult:
    now = time.perf_counter()
    result = LoadResult(concurrency, duration_s)
    record_from = now + warmup_s
    stop_at = record_from + duration_s
    await asyncio.gather(
        *(_worker(host, port, request, stop_at, record_from, result) for _ in range(concurrency))
    )
    return result


def run_load(
    host: str, port: int, request: bytes, *, concurrency: int, duration_s: float, warmup_s: float = 1.0
) -> LoadResult:
    """Drive ``concurrency`` closed-loop connections for ``duration_s`` seconds."""
    _check_loopback(host)
    return uvloop.run(_run(host, port, request, concurrency, duration_s, warmup_s))


async def _grpc_run(target, method, payload, concurrency, duration_s, warmup_s) -> LoadResult:
    import grpc

    result = LoadResult(concurrency, duration_s)
    record_from = time.perf_counter() + warmup_s
    stop_at = record_from + duration_s
    async with grpc.aio.insecure_channel(
        target, options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    ) as channel:
        call = channel.unary_unary(method)

        async def worker():
            while (start := time.perf_counter()) < stop_at:
                try:
                    await call(payload, timeout=30)
                    ok, err = True, ""
                except grpc.aio.AioRpcError as exc:
                    ok, err = False, f"{exc.code().name}: {exc.details()}"
                if start >= record_from:
                    if ok:
                        result.latencies_s.append(time.perf_counter() - start)
                    else:
                        result.errors += 1
                        if len(result.error_samples) < 5:
                            result.error_samples.append(err)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return result


def run_grpc_load(
    target: str, method: str, payload: bytes, *, concurrency: int, duration_s: float, warmup_s: float = 1.0
) -> LoadResult:
    """Closed-loop unary gRPC calls of pre-serialized ``payload`` to ``method``."""
    _check_loopback(target.rsplit(":", 1)[0].strip("[]"))
    return uvloop.run(_grpc_run(target, method, payload, concurrency, duration_s, warmup_s))
