"""Slow clients against a real ingress: does a crowd of connections that
never finish their headers move the valid requests' latency, and are they
closed once the head deadline passes?

    python -m flywheel.bench.http_limits [--slow 2000] [--requests 2000] [--rounds 2]

Deploys one small ONNX model on a local Ray with the default server config
(``header_timeout_s`` 10 s), then measures a keep-alive client's infer
latency in blocks without (A) and with (B) the slow connections open,
interleaved A B B A per round so that drift of a noisy host falls on both
sides; prints p50/p99 per side, their ratio, and when the slow connections
were closed. A figure to read, not a pass/fail test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from flywheel.bench.common import bench_deployment, export_model

SLOW_HEAD = b"POST /v2/models/m/infer HTTP/1.1\r\nhost: bench\r\nx-"


def _request(port_body: bytes) -> bytes:
    return (b"POST /v2/models/m/infer HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(port_body), port_body))


async def _read_answer(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    return int(head.split(b" ", 2)[1])


async def _latencies(port: int, request: bytes, n: int) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            writer.write(request)
            status = await _read_answer(reader)
            out.append(time.perf_counter() - t0)
            if status != 200:
                raise RuntimeError(f"a valid request got {status}")
    finally:
        writer.close()
    return out


async def _open_slow(port: int, count: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    conns = []
    for _ in range(count):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(SLOW_HEAD)
        conns.append((r, w))
    return conns


async def _closed_after(reader: asyncio.StreamReader, opened: float, limit_s: float) -> float | None:
    """Seconds from ``opened`` to the server's EOF (None: still open at the limit)."""
    try:
        while await asyncio.wait_for(reader.read(65536), max(0.01, opened + limit_s - time.monotonic())):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return None
    return time.monotonic() - opened


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q))


async def measure(port: int, slow: int, requests: int, rounds: int, header_timeout_s: float) -> dict:
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32",
                                   "data": [0.5] * 8}]}).encode()
    request = _request(body)
    await _latencies(port, request, 200)  # warm-up
    quiet: list[float] = []
    crowded: list[float] = []
    ratios = []
    closed_after: list[float | None] = []
    for _ in range(rounds):
        a1 = await _latencies(port, request, requests)
        opened = time.monotonic()
        conns = await _open_slow(port, slow)
        b = await _latencies(port, request, 2 * requests)
        a2 = await _latencies(port, request, requests)  # the slow ones are still open here
        closed_after += await asyncio.gather(*(_closed_after(r, opened, header_timeout_s + 10) for r, _ in conns))
        for _, w in conns:
            w.close()
        a3 = await _latencies(port, request, requests)
        quiet += a1 + a3
        crowded += b + a2
        ratios.append(_pct(b + a2, 99) / _pct(a1 + a3, 99))
    done = [c for c in closed_after if c is not None]
    return {
        "slow_connections": slow, "rounds": rounds,
        "quiet_p50_ms": _pct(quiet, 50), "quiet_p99_ms": _pct(quiet, 99),
        "crowded_p50_ms": _pct(crowded, 50), "crowded_p99_ms": _pct(crowded, 99),
        "p99_ratio_median": statistics.median(ratios), "p99_ratio_range": [min(ratios), max(ratios)],
        "closed": len(done), "still_open": len(closed_after) - len(done),
        "closed_after_s_min": min(done) if done else None, "closed_after_s_max": max(done) if done else None,
        "header_timeout_s": header_timeout_s,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slow", type=int, default=2000, help="connections that never finish their headers")
    p.add_argument("--requests", type=int, default=2000, help="valid requests per quiet block")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 2 * args.slow + 1024)), hard))
    with tempfile.TemporaryDirectory() as tmp:
        onnx = export_model("mlp", {"in_features": 8, "hidden": [16], "out_features": 4}, str(Path(tmp) / "m.onnx"))
        with bench_deployment("http-limits", [{"name": "m", "path": onnx}]) as dep:
            port = int(dep.url.rsplit(":", 1)[1])
            timeout = dep.config.server.header_timeout_s
            print(f"{args.slow} slow connections against {dep.url} (header_timeout_s {timeout:g}), "
                  f"{args.rounds} round(s) of A B B A ...", flush=True)
            result = asyncio.run(measure(port, args.slow, args.requests, args.rounds, timeout))
    print(f"valid requests, quiet:   p50 {result['quiet_p50_ms']:.3f} ms  p99 {result['quiet_p99_ms']:.3f} ms")
    print(f"valid requests, crowded: p50 {result['crowded_p50_ms']:.3f} ms  p99 {result['crowded_p99_ms']:.3f} ms")
    lo, hi = result["p99_ratio_range"]
    print(f"p99 crowded/quiet: median {result['p99_ratio_median']:.2f} (range {lo:.2f}-{hi:.2f})")
    print(f"slow connections closed: {result['closed']} of {result['closed'] + result['still_open']}, "
          f"{result['closed_after_s_min']:.1f}-{result['closed_after_s_max']:.1f} s after they opened"
          if result["closed"] else "slow connections closed: none")
    print(json.dumps(result))
    return 0 if result["still_open"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
