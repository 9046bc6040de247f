"""A draining HTTP server (a replica being replaced) lets its keep-alive
clients finish: it stops listening, ends each connection after its next
answer with `connection: close`, and closes what is left at the end of the
grace (or, when asked, the connections quiet for a while)."""

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


def _request_before_and_during_a_drain(pause_s: float, **drain) -> tuple[bytes, bytes, bytes]:
    """Two requests on one keep-alive connection, the second sent pause_s
    after the drain began: both answer heads and what the connection said
    after (b"" once the server closed it)."""
    async def run():
        server = await _server()
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(REQUEST)
        first = await _answer(reader)
        draining = asyncio.ensure_future(server.drain(30.0, **drain))
        await wait_for_async(lambda: server.draining, 5, "the server to start draining")
        await asyncio.sleep(pause_s)
        writer.write(REQUEST)
        second = await _answer(reader)
        eof = await reader.read()
        await draining
        writer.close()
        return first, second, eof

    return asyncio.run(run())


def test_a_busy_connection_gets_its_answer_with_connection_close_then_ends():
    # a long quiet time: a slow machine between the two requests must not
    # turn this connection into a quiet one
    first, second, eof = _request_before_and_during_a_drain(0.0, quiet_s=20.0)
    assert b"connection: close" not in first
    assert b"connection: close" in second
    assert eof == b""


def test_a_keep_alive_client_that_pauses_during_the_drain_is_answered_not_cut_off():
    """A busy client can pause between two requests (a loaded machine, a
    GC): closing its connection then races with the request it is about to
    send, which a client cannot safely retry (POST). By default the drain
    waits through the grace for that request and answers it with
    ``connection: close``."""
    first, second, eof = _request_before_and_during_a_drain(1.0)
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
