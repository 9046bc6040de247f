"""The internal frame protocol: every connection proves the deployment secret
before a frame is read (and the server proves it back); a frame header that
announces more than MAX_FRAME bytes is refused on either side before any of
it is buffered; a frame cut short by EOF closes its connection. Well-formed
calls on other connections keep being served throughout."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import socket
import struct

import pytest

from flywheel.protocol.errors import UnavailableError
from flywheel.serving._private import wire

from _poll import wait_for_async

SECRET = bytes(range(32))
HEAD = struct.Struct("<IIBII")


class Echo:
    """A handler that answers each payload reversed and counts what it handled."""

    def __init__(self) -> None:
        self.handled = 0

    async def __call__(self, call: wire.Call) -> wire.Reply:
        self.handled += 1
        return wire.Reply(0, call.payload[::-1])


def _client_proof(secret: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return hmac.new(secret, b"client" + server_nonce + client_nonce, hashlib.sha256).digest()


async def _serve(handler, **kwargs) -> wire.FrameServer:
    return await wire.start_frame_server(handler, "127.0.0.1", 0, reuse_port=False, **kwargs)


async def _echo_works(port: int, secret: bytes | None = SECRET) -> None:
    channel = wire.ReplicaChannel("127.0.0.1", port, pool_size=1, secret=secret)
    try:
        reply = await asyncio.wait_for(channel.call(wire.Call(wire.OP_INFER, b"abc")), 10)
        assert (reply.code, reply.payload) == (0, b"cba")
    finally:
        channel.close()


async def _hello(reader: asyncio.StreamReader) -> bytes:
    hello = await asyncio.wait_for(reader.readexactly(4 + wire.NONCE), 5)
    assert hello[:4] == b"FWF1"
    return hello[4:]


async def _fails_against_port(port: int, match: str, secret: bytes | None = SECRET,
                              error: type = UnavailableError) -> Exception:
    """A call to ``port`` must raise ``error`` matching ``match``; returns it."""
    channel = wire.ReplicaChannel("127.0.0.1", port, pool_size=1, secret=secret)
    try:
        with pytest.raises(error, match=match) as failed:
            await asyncio.wait_for(channel.call(wire.Call(wire.OP_INFER, b"abc")), 10)
        return failed.value
    finally:
        channel.close()


async def _fails_against(serve, secret: bytes | None, error: type, match: str):
    """Call a raw asyncio server ``serve`` playing a replica: the call must
    raise ``error``; returns it and the server's port."""
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        return await _fails_against_port(port, match, secret, error), port
    finally:
        server.close()


async def _closed_after(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> None:
    """Send ``data``; the server must close the connection having answered nothing."""
    writer.write(data)
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()


def _run(scenario, **kwargs):
    """``await scenario(server, echo)`` against a new echo frame server."""

    async def main():
        echo = Echo()
        server = await _serve(echo, **kwargs)
        try:
            return await scenario(server, echo)
        finally:
            server.close()
            await server.wait_closed()

    return asyncio.run(main())


async def _authenticated(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw connection that has proven the secret (and read the server's proof)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    nonce = await _hello(reader)
    mine = b"n" * wire.NONCE
    writer.write(mine + _client_proof(SECRET, nonce, mine))
    await asyncio.wait_for(reader.readexactly(32 + 2), 5)  # the server's proof, no identity
    return reader, writer


def test_a_client_with_the_secret_is_served_and_learns_the_servers_identity():
    async def scenario(server, echo):
        channel = wire.ReplicaChannel("127.0.0.1", server.port, pool_size=1, secret=SECRET)
        try:
            reply = await asyncio.wait_for(channel.call(wire.Call(wire.OP_INFER, b"abc")), 10)
            assert (reply.code, reply.payload) == (0, b"cba")
            conn = await channel._conn(0)
            assert conn.identity == "replica-a pid=1"
            assert server.refused == 0
        finally:
            channel.close()

    _run(scenario, secret=SECRET, identity="replica-a pid=1")


def test_frames_sent_without_a_proof_are_never_handled_or_answered():
    refusals = []

    async def scenario(server, echo):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        await _hello(reader)
        # a well-formed OP_INFER frame, longer than a proof, instead of the proof
        await _closed_after(reader, writer, HEAD.pack(64, 1, wire.OP_INFER, 0, 0) + b"x" * 64)
        assert echo.handled == 0
        assert server.refused == 1
        assert refusals == ["wrong_proof"]
        await _echo_works(server.port)
        assert echo.handled == 1

    _run(scenario, secret=SECRET, on_refused=refusals.append)


def test_a_proof_made_with_another_secret_is_refused_and_logged_with_the_peer(caplog):
    async def scenario(server, echo):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        nonce = await _hello(reader)
        mine = b"n" * wire.NONCE
        local = writer.get_extra_info("sockname")
        wrong = _client_proof(b"another secret of 32 bytes......", nonce, mine)
        await _closed_after(reader, writer, mine + wrong + HEAD.pack(3, 1, wire.OP_INFER, 0, 0) + b"abc")
        return echo.handled, server.refused, local

    with caplog.at_level(logging.WARNING, logger=wire.__name__):
        handled, refused, local = _run(scenario, secret=SECRET)
    assert handled == 0
    assert refused == 1
    (record,) = [r for r in caplog.records if "refused a connection" in r.getMessage()]
    assert str(local[1]) in record.getMessage()  # the peer's address: its port
    assert "wrong proof" in record.getMessage()


def test_a_replayed_proof_is_refused_because_each_connection_gets_a_new_nonce():
    async def scenario(server, echo):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        nonce = await _hello(reader)
        mine = b"n" * wire.NONCE
        proof = mine + _client_proof(SECRET, nonce, mine)
        writer.write(proof)
        await writer.drain()
        await asyncio.wait_for(reader.readexactly(32 + 2), 5)  # the server's proof, no identity
        writer.close()
        # the same bytes on a new connection: an eavesdropper's replay
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        await _hello(reader)
        await _closed_after(reader, writer, proof + HEAD.pack(3, 1, wire.OP_INFER, 0, 0) + b"abc")
        assert echo.handled == 0
        assert server.refused == 1

    _run(scenario, secret=SECRET)


def test_a_peer_that_never_proves_itself_is_dropped_after_the_handshake_timeout(monkeypatch):
    monkeypatch.setattr(wire, "HANDSHAKE_TIMEOUT_S", 0.2)

    async def scenario(server, echo):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        await _hello(reader)
        await _closed_after(reader, writer, b"\x00" * 10)  # part of a proof, then silence
        assert server.refused == 1
        assert echo.handled == 0

    _run(scenario, secret=SECRET)


def test_a_peer_that_closes_before_its_proof_is_counted_and_the_server_keeps_serving():
    async def scenario(server, echo):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            raw.sendall(b"\x01" * 5)
        await wait_for_async(lambda: server.refused == 1, 10, "the early close counted")
        await _echo_works(server.port)

    _run(scenario, secret=SECRET)




def test_refusals_are_logged_at_most_once_per_interval_and_the_next_line_says_how_many(caplog):
    server = wire.FrameServer(SECRET, "", None)
    with caplog.at_level(logging.WARNING, logger=wire.__name__):
        for _ in range(5):
            server.refuse(("127.0.0.1", 4000), "wrong_proof", "a wrong proof of the deployment secret")
        assert server.refused == 5
        assert len(caplog.records) == 1
        server._logged_at -= wire.REFUSAL_LOG_INTERVAL_S  # the interval has passed
        server.refuse(("127.0.0.1", 4001), "wrong_proof", "a wrong proof of the deployment secret")
    assert len(caplog.records) == 2
    assert "(4 more refused since the last report)" in caplog.records[1].getMessage()


def test_a_client_refuses_a_server_that_cannot_prove_the_secret():
    async def main():
        impostor = await _serve(Echo(), secret=b"not the deployment's secret....!")
        try:
            # the impostor drops our proof; we never send it a frame
            await _fails_against_port(impostor.port, "closed the connection during the frame handshake")
        finally:
            impostor.close()
            await impostor.wait_closed()

        async def fake(reader, writer):  # says hello, then answers any proof with garbage
            writer.write(b"FWF1" + b"s" * wire.NONCE)
            await reader.readexactly(2 * wire.NONCE)
            writer.write(b"p" * 32 + struct.pack("<H", 0))
            await writer.drain()
            await reader.read()

        await _fails_against(fake, SECRET, UnavailableError, "failed to prove that it knows the deployment secret")

    asyncio.run(main())


def test_a_secret_too_short_to_be_one_is_refused_on_both_sides():
    with pytest.raises(ValueError, match="at least 16 bytes, got 3"):
        wire.ReplicaChannel("127.0.0.1", 1, secret=b"abc")
    with pytest.raises(ValueError, match="at least 16 bytes, got 0"):
        asyncio.run(_serve(Echo(), secret=b""))


def test_a_connection_lost_with_a_call_in_flight_names_the_replica_that_had_it():
    async def main():
        async def dies_mid_call(reader, writer):  # a replica that crashes on the first frame
            server_nonce = b"s" * wire.NONCE
            writer.write(b"FWF1" + server_nonce)
            shake = await reader.readexactly(2 * wire.NONCE)
            client_nonce = shake[: wire.NONCE]
            assert shake[wire.NONCE :] == _client_proof(SECRET, server_nonce, client_nonce)
            who = b"mlp-1#abc pid=42"
            proof = hmac.new(SECRET, b"server" + server_nonce + client_nonce, hashlib.sha256).digest()
            writer.write(proof + struct.pack("<H", len(who)) + who)
            await reader.readexactly(HEAD.size)
            writer.transport.abort()

        lost, _ = await _fails_against(dies_mid_call, SECRET, wire.ReplicaLost, "connection to mlp-1#abc pid=42 was")
        assert lost.replica == "mlp-1#abc pid=42"

    asyncio.run(main())


def test_without_a_secret_a_lost_replica_is_named_by_its_address():
    async def main():
        async def dies(reader, writer):
            await reader.readexactly(HEAD.size)
            writer.transport.abort()

        lost, port = await _fails_against(dies, None, wire.ReplicaLost, "was lost with the call in flight")
        assert lost.replica == f"127.0.0.1:{port}"

    asyncio.run(main())


def test_a_frame_cut_short_by_eof_closes_its_connection_without_a_call():
    async def scenario(server, echo):
        reader, writer = await _authenticated(server.port)
        # 100 bytes announced, 10 sent, then the end of the stream
        writer.write(HEAD.pack(100, 1, wire.OP_INFER, 0, 0) + b"x" * 10)
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, not waiting forever
        writer.close()
        assert echo.handled == 0
        await _echo_works(server.port)

    _run(scenario, secret=SECRET)


def test_an_oversized_request_frame_closes_its_connection_and_nothing_else():
    async def scenario(server, echo):
        reader, writer = await _authenticated(server.port)
        # a header that lies: 2 GiB and more announced, a few bytes sent
        await _closed_after(reader, writer, HEAD.pack(wire.MAX_FRAME + 1, 7, wire.OP_INFER, 0, 0) + b"abc")
        assert echo.handled == 0
        await _echo_works(server.port)

    _run(scenario, secret=SECRET)


def test_an_oversized_reply_frame_fails_the_call_instead_of_waiting_for_it():
    async def main():
        async def liar(reader, writer):
            head = await reader.readexactly(HEAD.size)
            req_id = HEAD.unpack(head)[1]
            writer.write(struct.pack("<IIBIIIIIB", wire.MAX_FRAME + 1, req_id, 0, 0, 0, 0, 0, 0, 0))
            await writer.drain()
            await asyncio.sleep(5)

        await _fails_against(liar, None, UnavailableError, "more than MAX_FRAME")

    asyncio.run(main())


def test_the_buffer_refuses_the_header_before_the_payload_arrives():
    buf = wire._Buffer(wire._REQ)
    with pytest.raises(wire.FrameTooLarge, match=f"a frame of {wire.MAX_FRAME + 1} payload bytes"):
        list(buf.feed(HEAD.pack(wire.MAX_FRAME + 1, 1, 1, 0, 0)))
    # a well-formed frame after it on a fresh buffer still parses
    ok = wire._Buffer(wire._REQ)
    assert list(ok.feed(HEAD.pack(2, 9, 1, 0, 0) + b"hi")) == [((2, 9, 1, 0, 0), b"hi")]


def test_a_client_with_a_secret_gives_up_on_a_server_that_never_says_hello(monkeypatch):
    monkeypatch.setattr(wire, "HANDSHAKE_TIMEOUT_S", 0.2)

    async def main():
        echo = Echo()
        server = await _serve(echo)  # no secret: it waits for frames, says nothing first
        try:
            await _fails_against_port(server.port, "did not complete the frame handshake within 0.2s")
            assert echo.handled == 0
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())


def test_a_caller_without_a_secret_is_told_the_server_needs_one_not_that_a_replica_died():
    async def scenario(server, echo):
        channel = wire.ReplicaChannel("127.0.0.1", server.port, pool_size=1, secret=None)
        try:
            with pytest.raises(UnavailableError, match="requires the deployment secret") as err:
                await asyncio.wait_for(channel.call(wire.Call(wire.OP_INFER, b"abc")), 10)
            assert not isinstance(err.value, wire.ReplicaLost)  # nothing to count as a poison request
            assert echo.handled == 0
        finally:
            channel.close()

    _run(scenario, secret=SECRET)


def test_model_replicas_and_the_drift_monitor_cannot_be_made_without_the_secret():
    from flywheel.serving.config import ModelConfig, ServerConfig
    from flywheel.serving.drift_monitor import DriftMonitor
    from flywheel.serving.replica import ModelReplica

    model = ModelConfig(name="m", path="unused.onnx")
    with pytest.raises(ValueError, match="needs the deployment's secret"):
        ModelReplica(model, 1, ServerConfig().request_limits(), secret=None)
    with pytest.raises(ValueError, match="needs the deployment's secret"):
        DriftMonitor(1, [], secret=None)
