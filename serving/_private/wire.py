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

Authentication. A listener started with a ``secret`` (every part of a
deployment gets the same 32 random bytes from ``build_application``) proves
each connection before it reads a single frame, and is proven to in turn, so
that neither a local user on 127.0.0.1 nor a peer across nodes can send
``OP_INFER`` past the API keys, feed the drift monitor, or pose as a replica
to collect requests::

    server -> client   "FWF1" <32-byte server nonce>
    client -> server   <32-byte client nonce> HMAC-SHA256(secret, "client" sn cn)
    server -> client   HMAC-SHA256(secret, "server" sn cn) <u16 length> identity

The secret never crosses the wire, only proofs bound to both nonces (nothing
to replay). A wrong proof, a connection closed before its proof, or none
within HANDSHAKE_TIMEOUT_S is dropped without a frame read or answered,
counted and logged (rate-limited) with the peer's address. ``identity`` names
the serving process (Serve replica, pid, node), so that a client can say which
replica it lost. Trust model: whoever knows the secret is inside; it lives in
the deployment's arguments as Ray Serve stores them, i.e. with whoever
controls the Ray cluster (who can run any code on it anyway). Frames are not
encrypted: across untrusted networks, run Ray's nodes on a private network or
a TLS tunnel. The frame servers of a deployment (ModelReplica,
DriftMonitor) cannot be made without the secret; ``secret=None`` on
``start_frame_server`` / ``ReplicaChannel`` themselves is for tests of the
framing alone, and a caller without one is told when the server wants it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import logging
import math
import os
import random
import socket
import struct
import time
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

# A reply code of the frame protocol alone (never an ErrorCode, never shown
# to a caller): the server is draining and did not run the call; the client
# sends it again on a new connection, which reaches a replica still listening.
CODE_DRAINING = 255
# how many draining servers one call may meet before it is answered UNAVAILABLE
DRAINING_RESENDS = 3
_REQ = struct.Struct("<IIBII")
_RESP = struct.Struct("<IIBIIIIIB")
MAX_FRAME = 1 << 31

_HELLO = b"FWF1"  # protocol tag, then the server's nonce
NONCE = 32
_PROOF = hashlib.sha256().digest_size
_IDENTITY = struct.Struct("<H")
MAX_IDENTITY = 1024
MIN_SECRET = 16
# A peer has this long from connecting to proving itself; a loopback
# handshake takes well under a millisecond, a cross-node one a round trip.
HANDSHAKE_TIMEOUT_S = 5.0
REFUSAL_LOG_INTERVAL_S = 10.0


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


class ReplicaLost(UnavailableError):
    """The connection dropped while this call was in flight: the serving
    process died (or was cut off) with the call. ``replica`` names it (its
    handshake identity, else its address), for the log and the metrics."""

    def __init__(self, message: str, replica: str) -> None:
        super().__init__(message)
        self.replica = replica


class Unreachable(UnavailableError):
    """No connection could be opened: nothing listens at the address (no
    replica of the deployment on this node), or the network failed. No call
    was sent."""


def process_identity() -> str:
    """Who this process is, as a client names a server it lost: the Serve
    replica (deployment#id) when it runs in one, its pid, and its node."""
    pid = os.getpid()
    try:
        import ray
        from ray import serve

        ctx = serve.get_replica_context()
        return f"{ctx.deployment}#{ctx.replica_tag} pid={pid} node={ray.util.get_node_ip_address()}"
    except Exception:  # noqa: BLE001 - not in a Serve replica (in-process tests)
        return f"pid={pid} node={socket.gethostname()}"


def check_secret(secret: bytes | None, *, required: bool = False) -> None:
    """Refuse a secret too short to be one (None: authentication off, which
    a frame server never allows: ``required``)."""
    if secret is None and required:
        raise ValueError("a frame server needs the deployment's secret (build_application makes one)")
    if secret is not None and len(secret) < MIN_SECRET:
        raise ValueError(f"a frame secret needs at least {MIN_SECRET} bytes, got {len(secret)}")


def _proof(secret: bytes, role: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return hmac.new(secret, role + server_nonce + client_nonce, hashlib.sha256).digest()


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


class FrameServer:
    """A listening frame server (:func:`start_frame_server`): its port, and
    ``refused``, the connections dropped unauthenticated since it started."""

    def __init__(
        self, secret: bytes | None, identity: str, on_refused: Callable[[str], None] | None
    ) -> None:
        self.secret = secret
        self.identity = identity.encode()[:MAX_IDENTITY]
        self.refused = 0
        self.draining = False
        self.connections: set[_ServerConn] = set()
        self._on_refused = on_refused
        self._server: asyncio.base_events.Server | None = None
        self._logged_at = float("-inf")
        self._unlogged = 0

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    def refuse(self, peer, reason: str, why: str) -> None:
        """Count a connection dropped unauthenticated (``reason``: a short
        code, ``why``: its words); log the first one and then at most one
        line per REFUSAL_LOG_INTERVAL_S (a flood of probes must not flood
        the log)."""
        self.refused += 1
        if self._on_refused is not None:
            self._on_refused(reason)
        now = time.monotonic()
        if now - self._logged_at < REFUSAL_LOG_INTERVAL_S:
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more refused since the last report)" if self._unlogged else ""
        log.warning("frame server refused a connection from %s: %s%s", peer, why, more)
        self._logged_at, self._unlogged = now, 0

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def drain(self, grace_s: float) -> None:
        """Go away without failing a call: stop listening (new connections
        on a shared port reach the replicas that stay), answer every call
        that arrives from now on CODE_DRAINING unrun (the client sends it
        elsewhere), and wait up to ``grace_s`` for the calls already
        running to be answered."""
        self.draining = True
        self.close()
        deadline = time.monotonic() + grace_s
        while any(c.busy for c in self.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_closed()


class _ServerConn(asyncio.Protocol):
    def __init__(self, handler: FrameHandler, owner: FrameServer) -> None:
        self._handler = handler
        self._owner = owner
        self._buf = _Buffer(_REQ)
        self._transport: asyncio.Transport | None = None
        self._tasks: set[asyncio.Task] = set()
        # until the peer has proven itself: the nonce sent, the bytes so far
        self._nonce = b""
        self._pending: bytearray | None = None
        self._timer: asyncio.TimerHandle | None = None

    @property
    def busy(self) -> bool:
        return bool(self._tasks)

    def connection_made(self, transport) -> None:
        self._transport = transport
        self._owner.connections.add(self)
        _nodelay(transport)
        if self._owner.secret is not None:
            self._nonce = os.urandom(NONCE)
            self._pending = bytearray()
            self._timer = asyncio.get_running_loop().call_later(HANDSHAKE_TIMEOUT_S, self._too_slow)
            transport.write(_HELLO + self._nonce)

    def connection_lost(self, exc) -> None:
        self._owner.connections.discard(self)
        if self._pending is not None:
            self._drop("no_proof", "closed before proving that it knows the deployment secret")
        for t in self._tasks:
            t.cancel()

    def _too_slow(self) -> None:
        self._drop("timeout", f"no proof of the deployment secret within {HANDSHAKE_TIMEOUT_S:g}s")

    def _drop(self, reason: str, why: str) -> None:
        """Refuse the unauthenticated peer: nothing read, nothing answered."""
        if self._pending is None:
            return
        self._pending = None
        if self._timer is not None:
            self._timer.cancel()
        t = self._transport
        self._owner.refuse(t.get_extra_info("peername") if t is not None else None, reason, why)
        if t is not None:
            t.abort()

    def _authenticate(self, data: bytes) -> bytes:
        """Consume handshake bytes: what follows a valid proof (frames), or
        nothing while the proof is incomplete or when it was refused."""
        pending = self._pending
        need = 2 * NONCE - len(pending)
        pending += data[:need]
        if len(pending) < 2 * NONCE:
            return b""
        client_nonce, proof = bytes(pending[:NONCE]), bytes(pending[NONCE:])
        secret = self._owner.secret
        if not hmac.compare_digest(proof, _proof(secret, b"client", self._nonce, client_nonce)):
            self._drop("wrong_proof", "a wrong proof of the deployment secret")
            return b""
        self._pending = None
        self._timer.cancel()
        who = self._owner.identity
        self._transport.write(_proof(secret, b"server", self._nonce, client_nonce) + _IDENTITY.pack(len(who)) + who)
        return data[need:]

    def data_received(self, data: bytes) -> None:
        if self._transport.is_closing():
            return
        if self._pending is not None:
            data = self._authenticate(data)
            if not data:
                return
        try:
            for (_, req_id, op, aux, timeout_ms), payload in self._buf.feed(data):
                if self._owner.draining:
                    self._transport.write(_RESP.pack(0, req_id, CODE_DRAINING, 0, 0, 0, 0, 0, 0))
                    continue
                task = asyncio.ensure_future(self._serve(req_id, Call(op, payload, aux, timeout_ms)))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except FrameTooLarge as exc:
            log.warning("closing a frame connection: %s", exc)
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
    handler: FrameHandler,
    host: str,
    port: int,
    *,
    secret: bytes | None = None,
    identity: str = "",
    reuse_port: bool = True,
    on_refused: Callable[[str], None] | None = None,
) -> FrameServer:
    """Serve frames on host:port. ``secret``: the deployment's (see the
    module docstring; None: no authentication, in-process tests only);
    ``identity``: who this process is, told to authenticated clients;
    ``on_refused(reason)``: called for every connection refused
    unauthenticated, ``reason`` being ``wrong_proof``, ``no_proof`` (closed
    first) or ``timeout`` (to count it in the caller's metrics). ``reuse_port`` lets every replica
    of one deployment bind the same port, the kernel spreading connections
    among them. ValueError for a secret shorter than MIN_SECRET."""
    check_secret(secret)
    owner = FrameServer(secret, identity, on_refused)
    loop = asyncio.get_running_loop()
    owner._server = await loop.create_server(
        lambda: _ServerConn(handler, owner), host, port, reuse_address=True, reuse_port=reuse_port
    )
    return owner


class _ClientConn(asyncio.Protocol):
    def __init__(self, secret: bytes | None, address: str) -> None:
        self._secret = secret
        self._address = address
        self._buf = _Buffer(_RESP)
        self.transport: asyncio.Transport | None = None
        self.waiting: dict[int, asyncio.Future] = {}
        self.lost = False
        self.identity = ""  # the server's, once proven
        # done when the connection may carry calls (after the handshake)
        self.ready: asyncio.Future = asyncio.get_running_loop().create_future()
        # a handshake abandoned by a timed-out caller fails unheard; not an error
        self.ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._shake = bytearray()
        self._server_nonce = b""
        self._nonce = b""  # ours, sent once the server's hello came
        self._answered = False  # any reply bytes yet
        self.refused: Exception | None = None
        self.expires = math.inf  # monotonic time after which the pool replaces it
        self.retired = False  # replaced in the pool: closed once its calls are answered

    @property
    def name(self) -> str:
        """The server as logs and metrics name it."""
        return self.identity or self._address

    def connection_made(self, transport) -> None:
        self.transport = transport
        _nodelay(transport)
        if self._secret is None:
            self.ready.set_result(None)

    def connection_lost(self, exc) -> None:
        self.lost = True
        if not self.ready.done():
            self.ready.set_exception(UnavailableError(
                f"{self._address} closed the connection during the frame handshake (is its deployment "
                "secret this caller's?)"
            ))
        for fut in self.waiting.values():
            if not fut.done():
                fut.set_exception(ReplicaLost(f"connection to {self.name} was lost with the call in flight",
                                              self.name))
        self.waiting.clear()

    def _refuse_all(self, exc: Exception) -> None:
        self.lost = True
        self.refused = exc  # for calls not sent yet
        for fut in self.waiting.values():
            if not fut.done():
                fut.set_exception(exc)
        self.waiting.clear()
        self.transport.abort()

    def _fail(self, why: str) -> None:
        self.lost = True
        if not self.ready.done():
            self.ready.set_exception(UnavailableError(f"{self._address} {why}"))
        self.transport.abort()

    def _handshake(self, data: bytes) -> bytes:
        """Consume the server's handshake bytes: what follows them, or
        nothing while they are incomplete or were refused."""
        shake = self._shake
        shake += data
        if not self._nonce:
            if len(shake) < len(_HELLO) + NONCE:
                return b""
            if not shake.startswith(_HELLO):
                self._fail("does not open with a Flywheel frame handshake")
                return b""
            self._server_nonce = bytes(shake[len(_HELLO) : len(_HELLO) + NONCE])
            del shake[: len(_HELLO) + NONCE]
            self._nonce = os.urandom(NONCE)
            self.transport.write(self._nonce + _proof(self._secret, b"client", self._server_nonce, self._nonce))
        head = _PROOF + _IDENTITY.size
        if len(shake) < head:
            return b""
        (size,) = _IDENTITY.unpack_from(shake, _PROOF)
        if size > MAX_IDENTITY:
            self._fail(f"announces an identity of {size} bytes, more than {MAX_IDENTITY}")
            return b""
        if len(shake) < head + size:
            return b""
        expected = _proof(self._secret, b"server", self._server_nonce, self._nonce)
        if not hmac.compare_digest(bytes(shake[:_PROOF]), expected):
            self._fail("failed to prove that it knows the deployment secret")
            return b""
        self.identity = shake[head : head + size].decode("utf-8", "replace")
        rest = bytes(shake[head + size :])
        self._shake = bytearray()
        self.ready.set_result(None)
        return rest

    def data_received(self, data: bytes) -> None:
        if self.lost:
            return
        if not self.ready.done():
            data = self._handshake(data)
            if not data:
                return
        elif self._secret is None and not self._answered and data.startswith(_HELLO[:len(data)]):
            # a server that authenticates its callers, and this caller has
            # no secret: say so, rather than read its hello as a reply (and
            # take the dropped connection for a replica that died)
            self._refuse_all(UnavailableError(
                f"{self._address} requires the deployment secret, and this caller was not given one"))
            return
        self._answered = True
        try:
            for (_, req_id, code, aux, q, c, rows, depth, leader), payload in self._buf.feed(data):
                fut = self.waiting.pop(req_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(Reply(code, payload, Stats(q, c, rows, depth, bool(leader)), aux))
        except FrameTooLarge as exc:
            self.lost = True
            for fut in self.waiting.values():
                if not fut.done():
                    fut.set_exception(UnavailableError(f"{self.name} sent {exc}; connection dropped"))
            self.waiting.clear()
            if self.transport is not None:
                self.transport.close()


class ReplicaChannel:
    """Client side: a small pool of multiplexed connections to one deployment.

    Connections are opened lazily and replaced when lost, so a restarted or
    added replica (sharing the port) is picked up by later connections.
    ``secret``: the deployment's (None: for servers that authenticate nobody);
    each new connection proves it, and has the server prove it, before its
    first call. ValueError for a secret shorter than MIN_SECRET.
    """

    def __init__(self, host: str, port: int, pool_size: int = 2, *, secret: bytes | None = None,
                 max_age_s: float | None = None) -> None:
        """``max_age_s``: replace a pooled connection once it is about this
        old (+-10 %, so that the pool does not reconnect at once): with
        replicas added under load (autoscaling), new connections on the
        shared port are spread by the kernel over every replica listening,
        the new ones included, while old connections stay where they are."""
        check_secret(secret)
        self.host = host
        self.port = port
        self._secret = secret
        self._max_age_s = max_age_s
        self._conns: list[_ClientConn | None] = [None] * pool_size
        self._rr = itertools.cycle(range(pool_size))
        self._ids = itertools.count(1)
        self._connecting: dict[int, asyncio.Future] = {}
        self._closed = False

    async def _conn(self, slot: int) -> _ClientConn:
        conn = self._conns[slot]
        if conn is not None and not conn.lost:
            expires = conn.expires
            if expires == math.inf or expires > time.monotonic():  # no clock read without an age
                return conn
        pending = self._connecting.get(slot)
        if pending is None:
            pending = asyncio.ensure_future(self._open())
            self._connecting[slot] = pending
            pending.add_done_callback(lambda _f: self._connecting.pop(slot, None))
        conn = await asyncio.shield(pending)
        old = self._conns[slot]
        if old is not None and old is not conn:
            self._retire(old)  # aged out: its calls in flight finish on it
        self._conns[slot] = conn
        return conn

    async def _open(self) -> _ClientConn:
        loop = asyncio.get_running_loop()
        address = f"{self.host}:{self.port}"
        try:
            _, proto = await loop.create_connection(lambda: _ClientConn(self._secret, address), self.host, self.port)
        except OSError as exc:
            raise Unreachable(f"model replica at {address} unreachable: {exc}") from None
        try:
            await asyncio.wait_for(asyncio.shield(proto.ready), HANDSHAKE_TIMEOUT_S)
        except asyncio.TimeoutError:
            proto.transport.abort()
            raise UnavailableError(
                f"{address} did not complete the frame handshake within {HANDSHAKE_TIMEOUT_S:g}s"
            ) from None
        except BaseException:
            proto.transport.abort()
            raise
        if self._max_age_s:
            proto.expires = time.monotonic() + self._max_age_s * random.uniform(0.9, 1.1)
        return proto

    @staticmethod
    def _retire(conn: _ClientConn) -> None:
        conn.retired = True
        if not conn.waiting and conn.transport is not None:
            conn.transport.close()

    async def call(self, call: Call) -> Reply:
        """Send one request and wait for its reply. Raises UnavailableError
        when no replica can be reached or authenticated, ReplicaLost (one)
        when the connection drops with the call in flight. A call that a
        draining replica sends back is sent again on a new connection."""
        slot = next(self._rr)
        reply = await self._send(await self._conn(slot), call)
        if reply.code == CODE_DRAINING:
            return await self._resend(slot, call)
        return reply

    async def _resend(self, slot: int, call: Call) -> Reply:
        for _ in range(DRAINING_RESENDS):
            reply = await self._send(await self._conn(slot), call)  # the drained connection is replaced
            if reply.code != CODE_DRAINING:
                return reply
        raise UnavailableError(f"{DRAINING_RESENDS + 1} replicas at {self.host}:{self.port} were going away")

    async def call_fresh(self, call: Call) -> Reply:
        """Like ``call``, on a newly opened connection: for a retry after a
        replica died, when the pooled connections may still be to it (their
        loss not yet seen). The connection then joins the pool if a slot is
        free or lost, and is closed otherwise."""
        conn = await self._open()
        try:
            reply = await self._send(conn, call)
            if reply.code == CODE_DRAINING:
                return await self._resend(next(self._rr), call)
            return reply
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
        if conn.refused is not None:
            raise conn.refused
        if conn.lost:  # lost while this call waited for the connection
            raise UnavailableError(f"connection to {conn.name} was lost before the call was sent")
        req_id = next(self._ids) & 0xFFFFFFFF
        fut = asyncio.get_running_loop().create_future()
        conn.waiting[req_id] = fut
        conn.transport.write(
            _REQ.pack(len(call.payload), req_id, call.op, call.aux, call.timeout_ms) + call.payload
        )
        try:
            reply = await fut
        finally:
            conn.waiting.pop(req_id, None)
            if conn.retired and not conn.waiting and conn.transport is not None:
                conn.transport.close()
        if reply.code == CODE_DRAINING:  # the server is going: replace this connection
            conn.expires = -math.inf
            self._retire(conn)
        return reply

    def close(self) -> None:
        self._closed = True
        for conn in self._conns:
            if conn is not None and conn.transport is not None:
                conn.transport.close()
