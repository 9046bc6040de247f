"""A small HTTP/1.1 server on asyncio + httptools, for the request path.

Why not Starlette/uvicorn behind Serve's proxy: each layer costs milliseconds
per request on this class of machine (see shared/design/RAY-NOTES.md); this
server parses with httptools (C), keeps connections alive, answers pipelined
requests in order, and refuses an oversized body from its Content-Length before
reading it. It knows nothing about V2: routing is the handler's job.

It is bounded against clients that are slow or greedy on purpose (HttpLimits):
request-target and header sizes (414 / 431, then the connection closes), a
deadline for a whole request head and an idle keep-alive timeout (both
enforced by one sweep per server, so the request path sets a timestamp
instead of arming a timer), a cap on open connections (503 beyond it), and a
bound on the requests of one connection in progress at once (reading stops
until its answers go out). A HEAD request's answer goes out without its body
(the handler answers it as it would GET).
"""

from __future__ import annotations

import asyncio
import collections
import random
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus

import httptools

JSON = b"application/json"
TEXT = b"text/plain; charset=utf-8"


@dataclass(slots=True)
class Request:
    method: str
    path: str
    headers: dict[bytes, bytes] = field(default_factory=dict)  # lower-case names
    body: bytes = b""
    query: str = ""  # after the "?", undecoded: only the routes that take parameters parse it
    peer: str = ""  # the client's "host:port" ("" over a Unix socket), for the access log


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """What one client may hold of a server (see ServerConfig for the
    public defaults). ``None`` for a timeout turns it off: the local gRPC
    front's own connections are pooled and trusted (a 0700 socket folder)."""

    max_url_bytes: int = 8 * 1024
    max_header_bytes: int = 32 * 1024
    header_timeout_s: float | None = 10.0
    keepalive_timeout_s: float | None = 60.0
    max_connections: int = 10_000
    max_pipelined: int = 64
    # a request body must keep coming at this average rate (bytes/s) once
    # header_timeout_s has passed since its head: slow-body clients are
    # closed like slow-head ones, large uploads at any real speed are not
    min_body_rate: int = 1024
    # a keep-alive connection older than this (each its own, within +-10 %,
    # so that they do not all go at once) is ended after an answer with
    # ``connection: close``: its client reconnects, and the kernel may hand
    # the new connection to another replica (None: connections never age)
    max_connection_age_s: float | None = None

    def sweep_interval_s(self) -> float | None:
        """How often the timeouts are checked: a quarter of the shorter one
        (so a connection outlives its deadline by at most a quarter), at
        least every second and at most every 20 ms."""
        timeouts = [t for t in (self.header_timeout_s, self.keepalive_timeout_s) if t is not None]
        return min(1.0, max(0.02, min(timeouts) / 4)) if timeouts else None


# Indexes of HttpServer.counts; serving/metrics.py lays its slots out by them.
REFUSED, HEAD_TIMEOUT, IDLE_TIMEOUT, OPEN, BODY_TIMEOUT = range(5)
COUNTS = 5


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a refused request."""


# status, body, content type[, extra header lines[, trailer lines]], the
# lines each ending in CRLF. A response with trailers goes out chunked (one
# chunk, then the trailers): how gRPC's status travels over HTTP/1.1 from the
# HTTP/2 front (serving/_private/grpc_front.py).
Response = tuple  # (int, bytes, bytes), (int, bytes, bytes, bytes) or (..., bytes, bytes)
Handler = Callable[[Request], object]  # returns a Response or an awaitable of one

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


def _head(status: int, content_type: bytes, framing: bytes, close: bool, extra: bytes = b"") -> bytes:
    """The status line and headers; ``framing`` is the content-length or
    transfer-encoding line."""
    conn = b"connection: close\r\n" if close else b""
    return b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\n%s\r\n%s%s\r\n" % (
        status, _REASONS.get(status, b""), content_type, framing, extra, conn,
    )


def _chunked(body: bytes, trailers: bytes) -> bytes:
    chunk = b"%x\r\n%s\r\n" % (len(body), body) if body else b""
    return b"%s0\r\n%s\r\n" % (chunk, trailers)


class HttpServer:
    """A listening server and its open connections, for a graceful stop."""

    def __init__(self, limits: HttpLimits | None = None, counts=None) -> None:
        self.limits = limits or HttpLimits()
        self.server: asyncio.base_events.Server | None = None
        self.connections: set[_Connection] = set()
        self.draining = False
        # connections refused at the cap, closed for a slow request head, for
        # idling, open now, closed for a slow body: five numbers, in a slot of
        # the node's shared metrics when the caller passes one (serving/metrics.py)
        self.counts = counts if counts is not None else [0] * COUNTS
        self._sweeper: asyncio.Task | None = None

    @property
    def refused_connections(self) -> int:
        return int(self.counts[REFUSED])

    @property
    def timed_out_heads(self) -> int:
        return int(self.counts[HEAD_TIMEOUT])

    @property
    def timed_out_idle(self) -> int:
        return int(self.counts[IDLE_TIMEOUT])

    @property
    def timed_out_bodies(self) -> int:
        return int(self.counts[BODY_TIMEOUT])

    def start_sweeping(self) -> None:
        interval = self.limits.sweep_interval_s()
        if interval is not None and self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever(interval))

    async def _sweep_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.sweep(time.monotonic())

    def sweep(self, now: float) -> None:
        """Close every connection past its head deadline or idle timeout."""
        head_s, idle_s = self.limits.header_timeout_s, self.limits.keepalive_timeout_s
        rate = self.limits.min_body_rate
        for conn in list(self.connections):
            if head_s is not None and conn.head_since is not None and now - conn.head_since > head_s:
                self.counts[HEAD_TIMEOUT] += 1
                conn.close()
            elif (head_s is not None and conn.body_since is not None
                  and now - conn.body_since > head_s + conn.body_received / rate):
                self.counts[BODY_TIMEOUT] += 1
                conn.close()
            elif idle_s is not None and conn.idle_since is not None and now - conn.idle_since > idle_s:
                self.counts[IDLE_TIMEOUT] += 1
                conn.close()

    @property
    def sockets(self):
        return self.server.sockets if self.server is not None else ()

    def close(self) -> None:
        """Stop listening; open connections go on (see drain)."""
        if self.server is not None:
            self.server.close()

    def stop_sweeping(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    async def drain(self, grace_s: float, quiet_s: float | None = None) -> None:
        """Stop listening, then let each open connection finish: its next
        answer carries ``connection: close`` (a keep-alive client then
        reconnects, to whichever server still listens on the port); what is
        left after ``grace_s`` is closed. ``quiet_s``: also close a
        connection idle that long. Off by default: closing an idle
        keep-alive connection races with the request its client may be
        sending (RFC 9112 9.3.1), and a POST is not retried, so a busy
        client that pauses (a loaded host) would see an error where waiting
        costs at most the grace. (A connection the kernel queued for this
        listener but not yet handed over is reset when the listener closes,
        unless sysctl net.ipv4.tcp_migrate_req=1 moves it to a sibling
        listener.)"""
        self.close()
        self.draining = True
        deadline = time.monotonic() + grace_s
        while self.connections and time.monotonic() < deadline:
            now = time.monotonic()
            for conn in list(self.connections):
                if quiet_s is not None and conn.idle_since is not None and now - conn.idle_since >= quiet_s:
                    conn.close()
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.close()
        self.stop_sweeping()


class _Connection(asyncio.Protocol):
    __slots__ = (
        "_handler", "_max_body", "_on_error", "_parser", "_transport", "_url", "_headers",
        "_body", "_body_len", "_too_large", "_pending", "_closing", "_owner", "_in_message", "idle_since",
        "head_since", "_header_bytes", "_limits", "_held", "_paused", "_in_head", "_head_bytes",
        "body_since", "_write_paused", "_expires", "_peer",
    )

    def __init__(self, handler: Handler, max_body: int, on_error: Callable[[int, str], Response],
                 owner: HttpServer):
        self._handler = handler
        self._max_body = max_body
        self._on_error = on_error
        self._owner = owner
        self._limits = owner.limits
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._peer = ""
        self._pending: collections.deque[asyncio.Future] = collections.deque()
        # requests parsed while max_pipelined were in progress: dispatched as
        # answers go out (reading is paused meanwhile, so few can wait here)
        self._held: collections.deque[tuple[Request, bool]] = collections.deque()
        self._paused = False  # reading, while requests are held
        self._write_paused = False  # the transport's buffer is full: the client is not reading
        self._in_head = False
        self._head_bytes = 0  # of an unfinished head, from the chunks after its first
        # when the current request's head completed, while its body is coming
        self.body_since: float | None = None
        self._closing = False
        self._in_message = False
        # when the connection last had nothing to do (None while it has)
        self.idle_since: float | None = time.monotonic()
        # when the request head now being read began (None between heads):
        # a new connection owes its first head from the moment it opens
        self.head_since: float | None = time.monotonic()
        age = self._limits.max_connection_age_s
        self._expires = None if age is None else self.head_since + age * random.uniform(0.9, 1.1)
        self._reset()

    @property
    def body_received(self) -> int:
        return self._body_len

    def _reset(self) -> None:
        self._url = b""
        self._header_bytes = 0
        self._headers: dict[bytes, bytes] = {}
        self._body: list[bytes] = []
        self._body_len = 0
        self._too_large = False

    # -- asyncio.Protocol ---------------------------------------------------
    def connection_made(self, transport) -> None:
        self._transport = transport
        owner = self._owner
        if len(owner.connections) >= self._limits.max_connections:
            # answered without reading: the client learns why, and the
            # connections already open keep their share of the replica
            owner.counts[REFUSED] += 1
            self._closing = True
            self.head_since = None
            transport.write(_head(503, JSON, b"content-length: %d" % len(_FULL), True) + _FULL)
            _linger_close(transport)
            return
        owner.connections.add(self)
        owner.counts[OPEN] = len(owner.connections)
        peer = transport.get_extra_info("peername")  # once per connection, not per request
        if isinstance(peer, tuple) and len(peer) >= 2:
            self._peer = f"{peer[0]}:{peer[1]}"
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def connection_lost(self, exc) -> None:
        self._closing = True
        owner = self._owner
        if self in owner.connections:
            owner.connections.discard(self)
            owner.counts[OPEN] = len(owner.connections)
        for fut in self._pending:
            fut.cancel()
        self._pending.clear()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        mid_head = self._in_head
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrades are not supported")
            return
        except httptools.HttpParserError as exc:
            if not self._closing:  # a callback that refused the request has answered it
                self._fail(400, f"malformed HTTP request: {exc}")
            return
        if self._in_head and mid_head:
            # The parser holds a header's bytes until its line ends, so the
            # caps in on_url / on_header cannot see one endless header: count
            # the chunks that began inside the head and ended inside it (all
            # of their bytes are head; the chunk it began in, at most one
            # read, is not counted).
            self._head_bytes += len(data)
            cap = self._limits.max_url_bytes + self._limits.max_header_bytes
            if self._head_bytes > cap:
                self._fail(431, f"request head larger than {cap} bytes")

    def close(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.close()

    # -- httptools callbacks ------------------------------------------------
    def on_message_begin(self) -> None:
        self._in_message = True
        self._in_head = True
        self._head_bytes = 0
        self.idle_since = None
        if self.head_since is None:
            self.head_since = time.monotonic()

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._limits.max_url_bytes:
            self._fail(414, f"request target longer than {self._limits.max_url_bytes} bytes")
            raise _Refused

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4  # ": " and CRLF
        if self._header_bytes > self._limits.max_header_bytes:
            self._fail(431, f"request headers larger than {self._limits.max_header_bytes} bytes")
            raise _Refused
        self._headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self.head_since = None
        self._in_head = False
        self.body_since = time.monotonic()  # until the message completes
        length = self._headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self._max_body:
            # Refuse before reading a byte of the body, and drop the connection
            # (the client may still be sending it).
            self._fail(413, f"request body of {int(length)} bytes exceeds the limit of {self._max_body}")
        elif self._headers.get(b"expect", b"").lower() == b"100-continue" and self._transport is not None:
            # curl and others wait (1 s) for this before sending a large body
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self._too_large or self._closing:
            return
        self._body_len += len(body)
        if self._body_len > self._max_body:
            self._too_large = True
            self._body.clear()
        else:
            self._body.append(body)

    def on_message_complete(self) -> None:
        self.body_since = None
        if self._closing:
            return
        if self._too_large:  # chunked body that grew past the limit
            self._fail(413, f"request body exceeds the limit of {self._max_body} bytes")
            return
        method = self._parser.get_method().decode()
        path, _, query = self._url.partition(b"?")
        req = Request(method, path.decode("utf-8", "replace"), self._headers, b"".join(self._body),
                      query.decode("latin-1"), self._peer)
        keep_alive = self._parser.should_keep_alive()
        self._reset()
        self._in_message = False
        if self._held or self._write_paused or len(self._pending) >= self._limits.max_pipelined:
            self._held.append((req, keep_alive))
            self._reading()
            return
        self._dispatch(req, keep_alive)

    def _reading(self) -> None:
        """Read while nothing is held back; stop while requests wait for
        answers to go out or the client is not taking them."""
        pause = bool(self._held) or self._write_paused
        if pause != self._paused and self._transport is not None and not self._closing:
            self._paused = pause
            (self._transport.pause_reading if pause else self._transport.resume_reading)()

    # -- asyncio flow control: the client stopped reading our answers -------
    def pause_writing(self) -> None:
        self._write_paused = True
        self._reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._release_held()

    def _dispatch(self, req: Request, keep_alive: bool) -> None:
        head = req.method == "HEAD"  # the handler answers it as GET; the body is not sent
        result = self._handler(req)
        ready = type(result) is tuple  # a Response now (most routes but infer)
        if ready and not self._pending:
            self._write(result, close=not keep_alive or self._owner.draining or self._aged(), head=head)
            return
        fut = _done(result) if ready else asyncio.ensure_future(result)
        fut.keep_alive = keep_alive  # type: ignore[attr-defined]
        fut.head = head  # type: ignore[attr-defined]
        self._pending.append(fut)
        fut.add_done_callback(self._flush)

    # -- responses ----------------------------------------------------------
    def _flush(self, _fut=None) -> None:
        # Answer pipelined requests strictly in arrival order.
        while self._pending and self._pending[0].done():
            fut = self._pending.popleft()
            if fut.cancelled():
                # no answer will come for it: the next one written would be
                # taken for its answer, so this connection ends here
                self._closing = True
                if self._transport is not None:
                    self._transport.close()
                return
            exc = fut.exception()
            resp = self._on_error(500, f"internal error: {exc!r}") if exc else fut.result()
            # a draining server ends the connection after its last answer
            last = not self._pending and not self._in_message and not self._held
            self._write(resp, close=not fut.keep_alive or ((self._owner.draining or self._aged()) and last),
                        head=fut.head)
        self._release_held()

    def _aged(self) -> bool:
        """Past its max age, with nothing else in progress on it (see
        HttpLimits.max_connection_age_s)."""
        return (self._expires is not None and not self._held and not self._in_message
                and time.monotonic() > self._expires)

    def _release_held(self) -> None:
        while (self._held and not self._write_paused and not self._closing
               and len(self._pending) < self._limits.max_pipelined):
            self._dispatch(*self._held.popleft())
        self._reading()

    def _write(self, resp: Response, close: bool, head: bool = False, linger: bool = False) -> None:
        t = self._transport
        if t is None or t.is_closing():
            return
        status, body, ctype = resp[0], resp[1], resp[2]
        extra = resp[3] if len(resp) > 3 else b""
        if len(resp) > 4:
            t.write(_head(status, ctype, b"transfer-encoding: chunked", close, extra) + _chunked(body, resp[4]))
        else:
            framing = b"content-length: %d" % len(body)
            t.write(_head(status, ctype, framing, close, extra) + (b"" if head else body))
        if close:
            self._closing = True
            _linger_close(t) if linger else t.close()
        elif not self._pending and not self._in_message and not self._held:
            self.idle_since = time.monotonic()

    def _fail(self, status: int, message: str) -> None:
        # the client may still be sending the refused request: linger, so
        # that the answer is not lost to a reset
        self._write(self._on_error(status, message), close=True, linger=True)
        self._closing = True


_FULL = b'{"error":"this server has as many connections open as it takes; retry later"}'


# How long a refused connection is kept half-closed (our answer sent, then
# FIN) while what the client still sends is read and dropped: closing a
# socket with unread data resets it, and a reset can destroy the answer
# before the client reads it.
LINGER_S = 1.0


def _linger_close(transport: asyncio.Transport) -> None:
    if transport.can_write_eof():
        transport.write_eof()
        asyncio.get_running_loop().call_later(LINGER_S, transport.close)  # the client's EOF may close it first
    else:
        transport.close()


def _done(value) -> asyncio.Future:
    fut = asyncio.get_running_loop().create_future()
    fut.set_result(value)
    return fut


async def start_http_server(
    handler: Handler,
    host: str,
    port: int,
    *,
    max_body: int,
    on_error: Callable[[int, str], Response],
    reuse_port: bool = False,
    limits: HttpLimits | None = None,
    counts=None,
    ssl_context: ssl.SSLContext | None = None,
) -> HttpServer:
    """Listen on host:port on the running loop.

    ``handler`` may return a Response or an awaitable of one. ``on_error``
    builds the body for protocol-level errors (400 malformed, 413 too large,
    414 / 431 request target / headers too large, 500 when a handler raised,
    which handlers should never let happen). ``counts``: where to count
    connections refused, timed out and open (see HttpServer).
    ``ssl_context``: serve HTTPS; a client must finish its TLS handshake
    within the header timeout.
    """
    owner = HttpServer(limits, counts)
    owner.start_sweeping()
    tls: dict = {}
    if ssl_context is not None:
        tls = {"ssl": ssl_context, "ssl_handshake_timeout": owner.limits.header_timeout_s or 60.0}
    owner.server = await asyncio.get_running_loop().create_server(
        lambda: _Connection(handler, max_body, on_error, owner),
        host,
        port,
        reuse_address=True,
        reuse_port=reuse_port,
        backlog=1024,
        **tls,
    )
    return owner


async def start_unix_http_server(
    handler: Handler, path: str, *, max_body: int, on_error: Callable[[int, str], Response],
    limits: HttpLimits | None = None,
) -> HttpServer:
    """The same server on a Unix socket at ``path`` (for a local front end:
    no TCP stack between it and this process). By default without timeouts:
    its one client pools its connections and keeps them open."""
    owner = HttpServer(limits or HttpLimits(header_timeout_s=None, keepalive_timeout_s=None))
    owner.start_sweeping()
    owner.server = await asyncio.get_running_loop().create_unix_server(
        lambda: _Connection(handler, max_body, on_error, owner), path, backlog=1024,
    )
    return owner
