"""server.max_connection_age_s: a keep-alive connection past its age is ended
after an answer with `connection: close` (its client reconnects, maybe to
another replica); a younger one, or a server without the limit, keeps it."""

from __future__ import annotations

import asyncio

import pytest

from flywheel.protocol.errors import ConfigError
from flywheel.serving import parse_config
from flywheel.serving._private.http_errors import error_response
from flywheel.serving._private.http_server import HttpLimits, start_http_server

REQUEST = b"GET /x HTTP/1.1\r\nhost: t\r\n\r\n"


def _handler(req):
    return 200, b"ok", b"text/plain"


def _two_requests(age_s: float | None, pause_s: float) -> tuple[bytes, bytes]:
    """Two requests on one connection, pause_s apart: both answer heads."""
    async def run():
        server = await start_http_server(_handler, "127.0.0.1", 0, max_body=1024, on_error=error_response,
                                         limits=HttpLimits(max_connection_age_s=age_s))
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        heads = []
        for pause in (0.0, pause_s):
            await asyncio.sleep(pause)
            writer.write(REQUEST)
            heads.append((await reader.readuntil(b"\r\n\r\n")).lower())
            await reader.readexactly(2)
        writer.close()
        server.close()
        return heads

    return tuple(asyncio.run(run()))


def test_a_connection_past_its_age_ends_after_its_next_answer():
    first, second = _two_requests(age_s=0.2, pause_s=0.5)  # 0.5 s > 0.2 s + 10 %
    assert b"connection: close" not in first
    assert b"connection: close" in second


def test_connections_do_not_age_without_the_limit_or_before_it():
    for age in (None, 60.0):
        first, second = _two_requests(age_s=age, pause_s=0.3)
        assert b"connection: close" not in first + second


def test_the_config_ages_connections_by_default_only_when_the_ingress_autoscales():
    assert parse_config({"models": []}).server.connection_age_s() is None
    assert parse_config({"server": {"autoscaling": {}}, "models": []}).server.connection_age_s() == 30.0
    assert parse_config({"server": {"max_connection_age_s": 5}, "models": []}).server.connection_age_s() == 5.0
    with pytest.raises(ConfigError, match="server.max_connection_age_s"):
        parse_config({"server": {"max_connection_age_s": 0.01}, "models": []})
