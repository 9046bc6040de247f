"""The asyncio HTTP client: AsyncClient, a small HTTP/1.1 keep-alive client on
asyncio streams (stdlib only), driving the same protocol flows as Client."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from flywheel.client._http import MAX_IDLE, parse_url
from flywheel.client._result import ClientError, InferResult
from flywheel.client._tls import TlsFiles
from flywheel.client._v2 import Flow, HttpCall, HttpReply, Inputs, Outputs, V2Http, endpoint_path, model_path, with_allow

MAX_HEAD_BYTES = 64 * 1024  # status line and headers of one answer
_STALE = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, asyncio.IncompleteReadError)


class _Conn:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def usable(self) -> bool:
        # an idle connection whose EOF has arrived was closed by the server
        return not (self.writer.is_closing() or self.reader.at_eof())

    def close(self) -> None:
        self.writer.close()


async def _read_reply(reader: asyncio.StreamReader) -> tuple[HttpReply, bool]:
    """One answer; also whether the connection must be closed after it."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise ClientError(None, f"the answer's headers exceed {MAX_HEAD_BYTES} bytes") from None
    lines = head[:-4].decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    try:
        status = int(rest[:3])
    except ValueError:
        raise ClientError(None, f"malformed HTTP status line {lines[0]!r}") from None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name, value = name.strip().lower(), value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    conn_header = headers.get("connection", "").lower()
    close = "close" in conn_header or (version == "HTTP/1.0" and "keep-alive" not in conn_header)
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        body = await _read_chunked(reader)
    elif status in (204, 304) or 100 <= status < 200:
        body = b""
    else:  # delimited by the end of the connection
        body, close = await reader.read(), True
    return HttpReply(status, headers, body), close


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                pass
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


def _check_header(name: str, value: str) -> None:
    if any(c in f"{name}{value}" for c in "\r\n\0"):
        raise ValueError(f"HTTP header {name!r} holds a line break or NUL")


class AsyncClient:
    """The asyncio twin of Client: the same methods, as coroutines, with the
    same arguments, answers and errors (see Client's docstrings).

    Keep-alive connections are pooled (LIFO): sequential calls share one
    socket, concurrent calls open more. ``timeout`` bounds each whole call.
    An AsyncClient belongs to the event loop it is first used on (its
    connections do); use one per loop. ``await close()`` or ``async with``.
    Not thread-safe (asyncio objects never are). ``sockets_opened`` counts
    the TCP connections it has opened.
    """

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 10.0, *,
                 ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None) -> None:
        scheme, self._host, self._port, self._prefix = parse_url(url)
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, not {timeout!r}")
        self.url, self._timeout = url, timeout
        tls = TlsFiles(ca_file, cert_file, key_file)
        tls.check_scheme(url, scheme == "https")
        self._ssl = tls.ssl_context() if scheme == "https" else None
        default_port = 443 if self._ssl else 80
        self._host_header = self._host if self._port == default_port else f"{self._host}:{self._port}"
        self._v2 = V2Http(api_key)
        self._idle: list[_Conn] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self.sockets_opened = 0

    # -- transport ------------------------------------------------------------
    async def _connect(self) -> _Conn:
        reader, writer = await asyncio.open_connection(
            self._host, self._port, ssl=self._ssl, limit=MAX_HEAD_BYTES
        )
        self.sockets_opened += 1
        return _Conn(reader, writer)

    async def _get(self) -> tuple[_Conn, bool]:
        while self._idle:
            conn = self._idle.pop()
            if conn.usable():
                return conn, True
            conn.close()
        return await self._connect(), False

    def _head(self, call: HttpCall) -> bytes:
        lines = [f"{call.method} {self._prefix}{call.path} HTTP/1.1", f"host: {self._host_header}",
                 f"content-length: {len(call.body)}"]
        for name, value in (call.headers or {}).items():
            _check_header(name, value)
            lines.append(f"{name}: {value}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _exchange(self, call: HttpCall) -> HttpReply:
        head = self._head(call)
        for attempt in (0, 1):
            conn, reused = await self._get()
            try:
                conn.writer.write(head + call.body if len(call.body) < 65536 else head)
                if len(call.body) >= 65536:  # large bodies: no concatenated copy
                    conn.writer.write(call.body)
                await conn.writer.drain()
                reply, close = await _read_reply(conn.reader)
            except _STALE as exc:
                conn.close()
                if reused and not attempt and not (isinstance(exc, asyncio.IncompleteReadError) and exc.partial):
                    continue  # the server closed this idle connection meanwhile
                raise
            except BaseException:  # timed out or cancelled mid-exchange: out of step
                conn.close()
                raise
            if close or self._closed or len(self._idle) >= MAX_IDLE:
                conn.close()
            else:
                self._idle.append(conn)
            return reply
        raise AssertionError("unreachable")

    async def _send(self, call: HttpCall) -> HttpReply:
        loop = asyncio.get_running_loop()
        if self._closed:
            raise ClientError(None, "this client is closed")
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("this AsyncClient was first used on another event loop: use one client per loop")
        try:
            async with asyncio.timeout(self._timeout):
                return await self._exchange(call)
        except TimeoutError:
            raise ClientError(None, f"no answer from {self.url} within {self._timeout} s") from None
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise ClientError(None, f"cannot reach {self.url}: {exc!r}") from exc

    async def _run(self, flow: Flow) -> Any:
        try:
            call = next(flow)
            while True:
                call = flow.send(await self._send(call))
        except StopIteration as done:
            return done.value

    # -- inference ----------------------------------------------------------
    async def infer(
        self,
        model: str,
        inputs: Inputs,
        version: str | None = None,
        key: str | None = None,
        request_id: str | None = None,
        binary: bool = True,
        outputs: Outputs = None,
        parameters: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> InferResult:
        """As Client.infer."""
        return await self._run(self._v2.infer(
            model, inputs, version=version, key=key, request_id=request_id, binary=binary,
            outputs=outputs, parameters=parameters, headers=headers,
        ))

    async def feedback(self, model: str, request_id: str, reward: float) -> Any:
        """As Client.feedback."""
        return await self._run(self._v2.feedback(model, request_id, reward))

    # -- health and metadata -------------------------------------------------
    async def live(self) -> bool:
        """As Client.live."""
        return await self._run(self._v2.probe("/v2/health/live"))

    async def ready(self) -> bool:
        """As Client.ready."""
        return await self._run(self._v2.probe("/v2/health/ready"))

    async def model_ready(self, name: str, version: str | None = None) -> bool:
        """As Client.model_ready."""
        return await self._run(self._v2.probe(model_path(name, version) + "/ready"))

    async def metadata(self, name: str | None = None, version: str | None = None) -> dict:
        """As Client.metadata."""
        return await self._run(self._v2.metadata(name, version))

    # -- management (see Client for the routes) ---------------------------------
    async def _json(self, method: str, path: str, body: Any = None) -> Any:
        return await self._run(self._v2.json(method, path, body))

    async def endpoints(self) -> Any:
        return await self._json("GET", "/v2/endpoints")

    async def endpoint(self, name: str) -> Any:
        return await self._json("GET", endpoint_path(name))

    async def set_policy(self, name: str, policy: Mapping[str, Any]) -> Any:
        return await self._json("PUT", endpoint_path(name, "policy"), policy)

    async def add_variant(self, name: str, model: Mapping[str, Any], *, allow_signature_change: bool = False) -> Any:
        return await self._json("POST", endpoint_path(name, "variants"), with_allow(model, allow_signature_change))

    async def remove_variant(self, name: str, version: str) -> Any:
        return await self._json("DELETE", endpoint_path(name, "variants", version))

    async def swap(self, name: str, model: Mapping[str, Any], *, allow_signature_change: bool = False) -> Any:
        return await self._json("POST", endpoint_path(name, "swap"), with_allow(model, allow_signature_change))

    async def start_canary(self, name: str, canary: Mapping[str, Any], *, allow_signature_change: bool = False) -> Any:
        return await self._json("POST", endpoint_path(name, "canary"), with_allow(canary, allow_signature_change))

    async def abort_canary(self, name: str) -> Any:
        return await self._json("DELETE", endpoint_path(name, "canary"))

    async def promote(self, name: str, version: str) -> Any:
        return await self._json("POST", endpoint_path(name, "promote"), {"version": version})

    async def rollback(self, name: str) -> Any:
        return await self._json("POST", endpoint_path(name, "rollback"))

    async def set_shadow(self, name: str, shadow: Mapping[str, Any]) -> Any:
        return await self._json("PUT", endpoint_path(name, "shadow"), shadow)

    async def clear_shadow(self, name: str) -> Any:
        return await self._json("DELETE", endpoint_path(name, "shadow"))

    # -- lifetime -------------------------------------------------------------
    async def close(self) -> None:
        """Close the pooled connections (calls in flight close theirs when
        done); later calls raise ClientError."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        for conn in idle:
            try:
                await conn.writer.wait_closed()
            except OSError:
                pass

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncClient({self.url!r})"
