"""ReplicaChannel's connection age, and replicas that go away. A replica
that starts listening on the shared port after the pool connected gets calls
only once connections age out; a call in flight on a connection that ages
out is still answered; a draining replica finishes the calls it runs and
sends new ones back unrun, to be answered by the replica that stays; and a
port nothing listens on raises Unreachable (what sends a dedicated model's
calls through Serve on a node without a replica)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from flywheel.serving._private import wire

SECRET = bytes(range(32))


class Named:
    """Answers every call with its name, after ``delay_s``."""

    def __init__(self, name: bytes, delay_s: float = 0.0) -> None:
        self.name, self.delay_s = name, delay_s

    async def __call__(self, call: wire.Call) -> wire.Reply:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return wire.Reply(0, self.name)


async def _who_answers(max_age_s: float | None) -> set[bytes]:
    """Replica a listens first and the pool connects to it; b joins on the
    same port; which of them answer the calls that follow."""
    a = await wire.start_frame_server(Named(b"a"), "127.0.0.1", 0, secret=SECRET)
    channel = wire.ReplicaChannel("127.0.0.1", a.port, pool_size=4, secret=SECRET, max_age_s=max_age_s)
    b = None
    try:
        for _ in range(8):
            assert (await channel.call(wire.Call(wire.OP_INFER, b""))).payload == b"a"
        b = await wire.start_frame_server(Named(b"b"), "127.0.0.1", a.port, secret=SECRET)
        seen = set()
        for _ in range(60):
            seen.add((await channel.call(wire.Call(wire.OP_INFER, b""))).payload)
            await asyncio.sleep(0.01)
        return seen
    finally:
        channel.close()
        a.close()
        if b is not None:
            b.close()


def test_a_replica_added_later_gets_calls_once_connections_age_out():
    assert asyncio.run(_who_answers(max_age_s=0.05)) == {b"a", b"b"}


def test_without_an_age_the_pool_stays_on_the_first_replica():
    assert asyncio.run(_who_answers(max_age_s=None)) == {b"a"}


def test_a_call_in_flight_on_an_aged_connection_is_answered():
    async def main():
        server = await wire.start_frame_server(Named(b"slow", delay_s=0.3), "127.0.0.1", 0, secret=SECRET,
                                               reuse_port=False)
        channel = wire.ReplicaChannel("127.0.0.1", server.port, pool_size=1, secret=SECRET, max_age_s=0.05)
        try:
            slow = asyncio.ensure_future(channel.call(wire.Call(wire.OP_INFER, b"")))
            await asyncio.sleep(0.1)  # its connection is past its age now
            old = channel._conns[0]
            again = asyncio.ensure_future(channel.call(wire.Call(wire.OP_INFER, b"")))  # replaces it
            await asyncio.sleep(0.05)
            assert channel._conns[0] is not old and not old.transport.is_closing()  # it still has a call
            assert (await slow).payload == b"slow"
            assert (await again).payload == b"slow"
            assert old.transport.is_closing()  # closed once its last call was answered
        finally:
            channel.close()
            server.close()

    asyncio.run(main())


def test_nothing_listening_is_unreachable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused

        async def main():
            channel = wire.ReplicaChannel("127.0.0.1", port, secret=SECRET)
            try:
                await channel.call(wire.Call(wire.OP_INFER, b""))
            finally:
                channel.close()

        with pytest.raises(wire.Unreachable, match="unreachable"):
            asyncio.run(main())


def test_a_draining_replica_finishes_its_calls_and_sends_new_ones_to_the_replica_that_stays():
    async def main():
        a = await wire.start_frame_server(Named(b"a", delay_s=0.3), "127.0.0.1", 0, secret=SECRET)
        channel = wire.ReplicaChannel("127.0.0.1", a.port, pool_size=1, secret=SECRET)
        b = None
        try:
            assert (await channel.call(wire.Call(wire.OP_INFER, b""))).payload == b"a"  # the pool is on a
            b = await wire.start_frame_server(Named(b"b"), "127.0.0.1", a.port, secret=SECRET)
            running = asyncio.ensure_future(channel.call(wire.Call(wire.OP_INFER, b"")))
            await asyncio.sleep(0.05)  # a runs it
            drained = asyncio.ensure_future(a.drain(grace_s=5))
            await asyncio.sleep(0.01)
            # sent on the pooled connection to a, which sends it back unrun: b answers it
            assert (await channel.call(wire.Call(wire.OP_INFER, b""))).payload == b"b"
            assert not drained.done()  # a still runs the first call
            assert (await running).payload == b"a"
            await asyncio.wait_for(drained, 2)
            assert (await channel.call(wire.Call(wire.OP_INFER, b""))).payload == b"b"
        finally:
            channel.close()
            a.close()
            if b is not None:
                b.close()

    asyncio.run(main())
