"""NodeLink: a dedicated model's calls over loopback where this node has a
replica listening, through Serve where it has none on a cluster of several
nodes (and back to loopback once one listens here), and UNAVAILABLE at once
on a one-node cluster. Real frame servers and sockets; Serve's handle and
the GCS's node count are stand-ins (no Ray in unit tests)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from flywheel.serving._private import node_link, wire

SECRET = bytes(range(32))


class Named:
    async def __call__(self, call: wire.Call) -> wire.Reply:
        return wire.Reply(0, b"loopback")


class ServeHandle:
    """Answers ``frame.remote(...)`` as a replica elsewhere would, counting calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.frame = self

    def remote(self, op, payload, aux, timeout_ms):
        self.calls += 1

        async def answer():
            return 0, b"through serve", 0, (0, 0, 1, 0, False)
        return answer()


def _closed_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    return s


@pytest.fixture
def cluster(monkeypatch):
    """Set how many nodes the 'GCS' reports; RECHECK_S made short."""
    state = {"several": True}
    monkeypatch.setattr(node_link, "_several_nodes", lambda: state["several"])
    monkeypatch.setattr(node_link, "RECHECK_S", 0.2)
    return state


def _link(port: int, handle: ServeHandle) -> node_link.NodeLink:
    link = node_link.NodeLink(wire.ReplicaChannel("127.0.0.1", port, secret=SECRET), "m-1", "app")
    link._handle = handle
    return link


def test_without_a_replica_here_calls_go_through_serve_then_back_to_loopback(cluster):
    async def main():
        holder = _closed_port()
        port = holder.getsockname()[1]
        handle = ServeHandle()
        link = _link(port, handle)
        try:
            replies = await asyncio.gather(*(link.call(wire.Call(wire.OP_INFER, b"")) for _ in range(8)))
            assert {r.payload for r in replies} == {b"through serve"} and handle.calls == 8
            assert link.through_serve
            holder.close()  # a replica starts listening on this node's port
            server = await wire.start_frame_server(Named(), "127.0.0.1", port, secret=SECRET)
            try:
                await asyncio.sleep(0.25)  # past RECHECK_S: loopback is tried again
                assert (await link.call(wire.Call(wire.OP_INFER, b""))).payload == b"loopback"
                assert handle.calls == 8
            finally:
                server.close()
        finally:
            link.close()
            holder.close()

    asyncio.run(main())


def test_on_one_node_nothing_listening_fails_at_once(cluster):
    cluster["several"] = False

    async def main():
        holder = _closed_port()
        handle = ServeHandle()
        link = _link(holder.getsockname()[1], handle)
        try:
            with pytest.raises(wire.Unreachable):
                await link.call(wire.Call(wire.OP_INFER, b""))
            assert handle.calls == 0 and not link.through_serve
        finally:
            link.close()
            holder.close()

    asyncio.run(main())
