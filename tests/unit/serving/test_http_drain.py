"""A draining HTTP server (a replica being replaced) lets its keep-alive
clients finish: it stops listening, ends each busy connection after its next
answer with `connection: close`, and closes the quiet ones."""

from __future__ import annotations

import asyncio
import time

from flywheel.serving._private.http_errors import error_response
from flywheel.serving._private.http_server import start_http_server

from _poll import wait_for_async

REQUEST = b"GET /x HTTP/1.1\r\nhost: t\r\n\r\n"


def _handler(req):
    return 200, b"ok", b"text/plain"


async def _server():
    return await start_http_server(_handler, "127.0.0.1", 0, max_body=1024, on_error=error_response)


async def _answer(reader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    await reader.readexactly(2)
    return head.lower()


def test_a_busy_connection_gets_its_answer_with_connection_close_then_ends():
    async def run():
        server = await _server()
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(REQUEST)
        first = await _answer(reader)
        # a long quiet time: a slow machine between the two requests must not
        # turn this connection into a quiet one
        drain = asyncio.ensure_future(server.drain(30.0, quiet_s=20.0))
        await wait_for_async(lambda: server.draining, 5, "the server to start draining")
        writer.write(REQUEST)  # sent while the server drains
        second = await _answer(reader)
        eof = await reader.read()
        await drain
        writer.close()
        return first, second, eof

    first, second, eof = asyncio.run(run())
    assert b"connection: close" not in first
    assert b"connection: close" in second
    assert eof == b""


def test_a_draining_server_accepts_no_new_connection():
    async def run():
        server = await _server()
        port = server.sockets[0].getsockname()[1]
        await server.drain(1.0)
        try:
            await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return True
        return False

    assert asyncio.run(run())


def test_a_quiet_connection_is_closed_without_waiting_for_the_grace():
    async def run():
        server = await _server()
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(REQUEST)
        await _answer(reader)
        started = time.monotonic()
        await server.drain(30.0, quiet_s=0.2)
        took = time.monotonic() - started
        eof = await reader.read()
        writer.close()
        return took, eof

    took, eof = asyncio.run(run())
    assert eof == b""
    assert took < 15.0  # its quiet time after its last answer, not the 30 s grace
