"""The internal frame protocol refuses a frame header that announces more
than MAX_FRAME bytes, on either side, before buffering any of it, and keeps
serving well-formed calls on other connections."""

from __future__ import annotations

import asyncio
import struct

import pytest

from flywheel.protocol.errors import UnavailableError
from flywheel.serving._private import wire


async def _echo(call: wire.Call) -> wire.Reply:
    return wire.Reply(0, call.payload[::-1])


def test_an_oversized_request_frame_closes_its_connection_and_nothing_else():
    async def main():
        server = await wire.start_frame_server(_echo, "127.0.0.1", 0, reuse_port=False)
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            # a header that lies: 3 GiB announced, a few bytes sent
            writer.write(struct.pack("<IIBII", wire.MAX_FRAME + 1, 7, wire.OP_INFER, 0, 0) + b"abc")
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, no reply
            writer.close()
            channel = wire.ReplicaChannel("127.0.0.1", port)
            try:
                reply = await channel.call(wire.Call(wire.OP_INFER, b"abc"))
                assert (reply.code, reply.payload) == (0, b"cba")
            finally:
                channel.close()
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())


def test_an_oversized_reply_frame_fails_the_call_instead_of_waiting_for_it():
    async def main():
        async def liar(reader, writer):
            head = await reader.readexactly(struct.calcsize("<IIBII"))
            req_id = struct.unpack("<IIBII", head)[1]
            writer.write(struct.pack("<IIBIIIIIB", wire.MAX_FRAME + 1, req_id, 0, 0, 0, 0, 0, 0, 0))
            await writer.drain()
            await asyncio.sleep(5)

        server = await asyncio.start_server(liar, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        channel = wire.ReplicaChannel("127.0.0.1", port, pool_size=1)
        try:
            with pytest.raises(UnavailableError, match="more than MAX_FRAME"):
                await asyncio.wait_for(channel.call(wire.Call(wire.OP_INFER, b"")), 5)
        finally:
            channel.close()
            server.close()

    asyncio.run(main())


def test_the_buffer_refuses_the_header_before_the_payload_arrives():
    buf = wire._Buffer(wire._REQ)
    with pytest.raises(wire.FrameTooLarge, match=f"a frame of {wire.MAX_FRAME + 1} payload bytes"):
        list(buf.feed(struct.pack("<IIBII", wire.MAX_FRAME + 1, 1, 1, 0, 0)))
    # a well-formed frame after it on a fresh buffer still parses
    ok = wire._Buffer(wire._REQ)
    assert list(ok.feed(struct.pack("<IIBII", 2, 9, 1, 0, 0) + b"hi")) == [((2, 9, 1, 0, 0), b"hi")]
