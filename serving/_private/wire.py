"""Flywheel's internal replica protocol: length-prefixed frames over TCP.

The ingress forwards each infer request's body unchanged to a model replica
and gets the encoded V2 response back, so JSON is decoded exactly once, in the
replica. Many requests share one connection (multiplexed by request id), so
concurrent requests reach the replica's batcher together.

request  = <u32 payload length><u32 request id><u8 op><u32 aux><u32 timeout ms> payload
response = <u32 payload length><u32 request id><u8 code><u32 aux> <u32 queue us>
           <u32 compute us><u32 batch rows><u32 queue depth><u8 leader> payload

Ops: OP_INFER carries a V2 HTTP body (``aux`` = its JSON header length when it
uses the binary extension, else 0) and answers with a V2 HTTP body (``aux`` =
the JSON header length when outputs are binary); OP_INFER_GRPC carries and
answers serialized ModelInferRequest / ModelInferResponse messages;
OP_METADATA answers the model's V2 metadata as JSON. ``timeout ms`` is the
caller's remaining deadline (0 = the server's default).
``code`` is 0 for success or a :class:`~flywheel.protocol.errors.ErrorCode`
(the payload is then the UTF-8 message).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from flywheel.protocol.errors import ErrorCode, PayloadTooLargeError, UnavailableError

OP_INFER = 1
OP_METADATA = 2
OP_INFER_GRPC = 3
OP_DRIFT_INGEST = 4  # replica -> drift monitor: sampled input rows
OP_DRIFT_HISTORY = 5  # ingress -> drift monitor: recent results (JSON)
OP_METRICS = 6  # ingress -> drift monitor: Prometheus text
OP_DRIFT_TRACK = 7  # replica -> drift monitor: start tracking this model config (JSON), if not yet

log = logging.getLogger(__name__)

_REQ = struct.Struct("<IIBII")
_RESP = struct.Struct("<IIBIIIIIB")
MAX_FRAME = 1 << 31


@dataclass(slots=True, frozen=True)
class Stats:
    queue_us: int = 0
    compute_us: int = 0
    batch_rows: int = 0
    queue_depth: int = 0
    leader: bool = False


NO_STATS = Stats()


@dataclass(slots=True, frozen=True)
class Reply:
    code: int  # 0 = ok, else an ErrorCode
    payload: bytes
    stats: Stats = NO_STATS
    aux: int = 0


@dataclass(slots=True, frozen=True)
class Call:
    op: int
    payload: bytes
    aux: int = 0
    timeout_ms: int = 0


FrameHandler = Callable[[Call], Awaitable[Reply]]


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


class FrameTooLarge(Exception):
    """A frame header announced more than MAX_FRAME payload bytes: the peer
    is broken or hostile, and the connection is dropped before any of it is
    buffered."""


class _Buffer:
    """Accumulates bytes and yields complete frames."""

    __slots__ = ("_buf", "_head")

    def __init__(self, head: struct.Struct) -> None:
        self._buf = bytearray()
        self._head = head

    def feed(self, data: bytes):
        self._buf += data
        size = self._head.size
        while len(self._buf) >= size:
            fields = self._head.unpack_from(self._buf)
            if fields[0] > MAX_FRAME:
                self._buf.clear()
                raise FrameTooLarge(f"a frame of {fields[0]} payload bytes, more than MAX_FRAME {MAX_FRAME}")
            end = size + fields[0]
            if len(self._buf) < end:
                return
            payload = bytes(self._buf[size:end])
            del self._buf[:end]
            yield fields, payload


class _ServerConn(asyncio.Protocol):
    def __init__(self, handler: FrameHandler) -> None:
        self._handler = handler
        self._buf = _Buffer(_REQ)
        self._transport: asyncio.Transport | None = None
        self._tasks: set[asyncio.Task] = set()

    def connection_made(self, transport) -> None:
        self._transport = transport
        _nodelay(transport)

    def connection_lost(self, exc) -> None:
        for t in self._tasks:
            t.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            for (_, req_id, op, aux, timeout_ms), payload in self._buf.feed(data):
                task = asyncio.ensure_future(self._serve(req_id, Call(op, payload, aux, timeout_ms)))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except FrameTooLarge as exc:
            log.warning("closing a frame connection: %s", exc)
            if self._transport is not None:
                self._transport.close()

    async def _serve(self, req_id: int, call: Call) -> None:
        try:
            r = await self._handler(call)
        except Exception as exc:  # noqa: BLE001 - the boundary: answer, never hang
            r = Reply(int(ErrorCode.INTERNAL), f"internal error: {exc!r}".encode())
        t = self._transport
        if t is not None and not t.is_closing():
            st = r.stats
            t.write(
                _RESP.pack(
                    len(r.payload), req_id, r.code, r.aux, st.queue_us, st.compute_us,
                    st.batch_rows, st.queue_depth, st.leader,
                )
                + r.payload
            )


async def start_frame_server(
    handler: FrameHandler, host: str, port: int, *, reuse_port: bool = True
) -> asyncio.base_events.Server:
    """Serve frames on host:port. ``reuse_port`` lets every replica of one
    deployment bind the same port, the kernel spreading connections among them."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: _ServerConn(handler), host, port, reuse_address=True, reuse_port=reuse_port
    )


class _ClientConn(asyncio.Protocol):
    def __init__(self) -> None:
        self._buf = _Buffer(_RESP)
        self.transport: asyncio.Transport | None = None
        self.waiting: dict[int, asyncio.Future] = {}
        self.lost = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        _nodelay(transport)

    def connection_lost(self, exc) -> None:
        self.lost = True
        for fut in self.waiting.values():
            if not fut.done():
                fut.set_exception(UnavailableError("connection to the model replica was lost"))
        self.waiting.clear()

    def data_received(self, data: bytes) -> None:
        try:
            for (_, req_id, code, aux, q, c, rows, depth, leader), payload in self._buf.feed(data):
                fut = self.waiting.pop(req_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(Reply(code, payload, Stats(q, c, rows, depth, bool(leader)), aux))
        except FrameTooLarge as exc:
            self.lost = True
            for fut in self.waiting.values():
                if not fut.done():
                    fut.set_exception(UnavailableError(f"the model replica sent {exc}; connection dropped"))
            self.waiting.clear()
            if self.transport is not None:
                self.transport.close()


class ReplicaChannel:
    """Client side: a small pool of multiplexed connections to one deployment.

    Connections are opened lazily and replaced when lost, so a restarted or
    added replica (sharing the port) is picked up by later connections.
    """

    def __init__(self, host: str, port: int, pool_size: int = 2) -> None:
        self.host = host
        self.port = port
        self._conns: list[_ClientConn | None] = [None] * pool_size
        self._rr = itertools.cycle(range(pool_size))
        self._ids = itertools.count(1)
        self._connecting: dict[int, asyncio.Future] = {}
        self._closed = False

    async def _conn(self, slot: int) -> _ClientConn:
        conn = self._conns[slot]
        if conn is not None and not conn.lost:
            return conn
        pending = self._connecting.get(slot)
        if pending is None:
            pending = asyncio.ensure_future(self._open())
            self._connecting[slot] = pending
            pending.add_done_callback(lambda _f: self._connecting.pop(slot, None))
        conn = await asyncio.shield(pending)
        self._conns[slot] = conn
        return conn

    async def _open(self) -> _ClientConn:
        loop = asyncio.get_running_loop()
        try:
            _, proto = await loop.create_connection(_ClientConn, self.host, self.port)
        except OSError as exc:
            raise UnavailableError(f"model replica at {self.host}:{self.port} unreachable: {exc}") from None
        return proto

    async def call(self, call: Call) -> Reply:
        """Send one request and wait for its reply. Raises UnavailableError
        when no replica can be reached or the connection drops."""
        return await self._send(await self._conn(next(self._rr)), call)

    async def call_fresh(self, call: Call) -> Reply:
        """Like ``call``, on a newly opened connection: for a retry after a
        replica died, when the pooled connections may still be to it (their
        loss not yet seen). The connection then joins the pool if a slot is
        free or lost, and is closed otherwise."""
        conn = await self._open()
        try:
            return await self._send(conn, call)
        finally:
            free = [
                slot for slot, pooled in enumerate(self._conns)
                if (pooled is None or pooled.lost) and slot not in self._connecting
            ]
            if free and not self._closed and not conn.lost:
                self._conns[free[0]] = conn
            else:
                conn.transport.close()

    async def _send(self, conn: _ClientConn, call: Call) -> Reply:
        if len(call.payload) > MAX_FRAME:  # the replica would drop the connection
            raise PayloadTooLargeError(f"{len(call.payload)} bytes is more than one frame takes ({MAX_FRAME})")
        req_id = next(self._ids) & 0xFFFFFFFF
        fut = asyncio.get_running_loop().create_future()
        conn.waiting[req_id] = fut
        conn.transport.write(
            _REQ.pack(len(call.payload), req_id, call.op, call.aux, call.timeout_ms) + call.payload
        )
        try:
            return await fut
        finally:
            conn.waiting.pop(req_id, None)

    def close(self) -> None:
        self._closed = True
        for conn in self._conns:
            if conn is not None and conn.transport is not None:
                conn.transport.close()
