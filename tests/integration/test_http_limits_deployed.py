"""The HTTP bounds of server config reach a real ingress: a deployment with
small limits refuses an oversized request target and head, closes a slow
head, answers HEAD without a body and refuses connections beyond its cap
with 503, counted in /metrics; valid requests go on answering throughout."""

from __future__ import annotations

import asyncio
import json

import pytest

from flywheel.serving import parse_config
from flywheel.serving.app import deploy, undeploy

from _raw_http import closed_within, read_answer


pytestmark = pytest.mark.integration

BODY = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                               "data": [0.5] * 64}]}).encode()
INFER = (b"POST /v2/models/m/infer HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
         b"content-length: %d\r\n\r\n%s" % (len(BODY), BODY))


@pytest.fixture(scope="module")
def bounded(ray_session, mlp_onnx):
    cfg = parse_config({
        "name": "bounded",
        "server": {"port": 0, "grpc_port": -1, "max_url_bytes": 256, "max_header_bytes": 2048,
                   "header_timeout_s": 1.0, "keepalive_timeout_s": 30, "max_connections": 8},
        "models": [{"name": "m", "path": mlp_onnx, "num_cpus": 0.1}],
    })
    dep = deploy(cfg)
    yield int(dep.url.rsplit(":", 1)[1])
    undeploy(dep)


async def _answer(reader, head_request: bool = False) -> tuple[int, bytes, bytes]:
    head, body = await read_answer(reader, head_request)
    return int(head.split(b" ", 2)[1]), head, body


_eof = closed_within


async def _once(port: int, raw: bytes) -> tuple[int, bytes, bytes, bytes | None]:
    """Status, head, body, and what came after the answer until the server
    closed (None when it kept the connection open)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    status, head, body = await _answer(reader, raw.startswith(b"HEAD "))
    rest = await asyncio.wait_for(reader.read(), 5.0) if b"connection: close" in head.lower() else None
    writer.close()
    return status, head, body, rest


def test_size_caps_and_head_through_the_ingress(bounded):
    async def run():
        long_url = await _once(bounded, b"GET /v2/" + b"a" * 400 + b" HTTP/1.1\r\nhost: t\r\n\r\n")
        big_head = await _once(bounded, b"GET /v2/health/ready HTTP/1.1\r\nhost: t\r\nx-big: "
                               + b"v" * 4000 + b"\r\n\r\n")
        head_only = await _once(bounded, b"HEAD /v2/models/m HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        infer = await _once(bounded, INFER)
        return long_url, big_head, head_only, infer

    long_url, big_head, head_only, infer = asyncio.run(run())
    assert long_url[0] == 414 and b"longer than 256 bytes" in long_url[2] and long_url[3] == b""
    assert big_head[0] == 431 and b"larger than 2048 bytes" in big_head[2] and big_head[3] == b""
    status, head, body, rest = head_only
    assert status == 200 and rest == b""  # nothing came after the head but the close
    assert int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]) > 0  # as GET would send
    assert infer[0] == 200 and json.loads(infer[2])["outputs"][0]["shape"] == [1, 10]


def test_slow_heads_are_closed_and_connections_beyond_the_cap_get_503(bounded):
    async def run():
        slow = []
        for _ in range(3):
            r, w = await asyncio.open_connection("127.0.0.1", bounded)
            w.write(b"GET /v2/health/ready HTTP/1.1\r\nhost: t\r\nx-slow: ")
            slow.append((r, w))
        closed = await asyncio.gather(*(_eof(r) for r, _ in slow))
        # fill the cap with served keep-alive connections, then one more
        held = []
        for _ in range(8):
            r, w = await asyncio.open_connection("127.0.0.1", bounded)
            w.write(INFER)
            held.append((r, w, (await _answer(r))[0]))
        over = await _once(bounded, b"GET /v2/health/ready HTTP/1.1\r\nhost: t\r\n\r\n")
        # the held ones still answer; one freed slot takes a new client
        r0, w0, _ = held[0]
        w0.write(INFER)
        again = (await _answer(r0))[0]
        w0.close()
        await asyncio.sleep(0.2)  # the server sees the close
        fresh = await _eof_or_status(bounded)
        metrics = await _metrics(held[1][0], held[1][1])
        for _, w, _ in held[1:]:
            w.close()
        for _, w in slow:
            w.close()
        return closed, [h[2] for h in held], over, again, fresh, metrics

    async def _eof_or_status(port):
        async def attempt():
            return (await _once(port, INFER))[0]
        # the freed slot may take a moment to be seen free
        status = None
        for _ in range(50):
            status = await attempt()
            if status == 200:
                break
            await asyncio.sleep(0.1)
        return status

    async def _metrics(reader, writer):
        writer.write(b"GET /metrics HTTP/1.1\r\nhost: t\r\n\r\n")
        return (await _answer(reader))[2].decode()

    closed, held, over, again, fresh, metrics = asyncio.run(run())
    assert closed == [True, True, True]
    assert held == [200] * 8
    assert over[0] == 503 and b"connections open" in over[2] and over[3] == b""
    assert again == 200 and fresh == 200
    assert "flywheel_http_connections_refused_total" in metrics
    refused = [line for line in metrics.splitlines() if line.startswith("flywheel_http_connections_refused_total")]
    assert refused and float(refused[0].split()[-1]) >= 1
    timed_out = [line for line in metrics.splitlines()
                 if line.startswith("flywheel_http_connections_closed_total") and 'reason="head_timeout"' in line]
    assert timed_out and float(timed_out[0].split()[-1]) >= 3
