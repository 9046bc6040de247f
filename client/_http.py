"""The synchronous HTTP client: Client, on stdlib http.client with keep-alive."""

from __future__ import annotations

import http.client
import select
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from flywheel.client._result import ClientError, InferResult
from flywheel.client._tls import TlsFiles
from flywheel.client._v2 import Flow, HttpCall, HttpReply, Inputs, Outputs, V2Http, endpoint_path, model_path, with_allow

MAX_IDLE = 32  # idle connections kept per client; more are closed when returned
# A reused connection failing this way was closed by the server while idle:
# the request is sent again once, on a new connection.
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


def parse_url(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path prefix) of ``http[s]://host[:port][/prefix]``
    (a bare ``host:port`` means http). Raises ValueError for anything else."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"server URL {url!r} must look like http://host:port or https://host[:port]")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, parts.hostname, port, parts.path.rstrip("/")


def _idle_but_readable(sock) -> bool:
    """An idle keep-alive socket with something to read has been closed by
    the server (EOF) or is out of step: either way it must not be reused."""
    if hasattr(select, "poll"):  # select.select fails on descriptors >= 1024
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([sock], [], [], 0)[0])


class _Pool:
    """Keep-alive connections to one server, LIFO, shared by threads.

    ``sockets_opened`` counts every TCP connection made (reconnects
    included): what keep-alive saves shows there.
    """

    def __init__(self, scheme: str, host: str, port: int, timeout: float, tls: TlsFiles) -> None:
        base = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        pool = self

        class Connection(base):  # counts its sockets; http.client reconnects by itself
            def connect(self) -> None:
                super().connect()
                with pool._lock:
                    pool.sockets_opened += 1

        kwargs: dict[str, Any] = {"timeout": timeout}
        if scheme == "https":
            kwargs["context"] = tls.ssl_context()
        self._new = lambda: Connection(host, port, **kwargs)
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = False
        self.sockets_opened = 0

    def get(self) -> http.client.HTTPConnection:
        with self._lock:
            if self._closed:
                raise ClientError(None, "this client is closed")
            conn = self._idle.pop() if self._idle else None
        return conn or self._new()

    def put(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < MAX_IDLE:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed, idle, self._idle = True, self._idle, []
        for conn in idle:
            conn.close()


def _read_body(resp: http.client.HTTPResponse) -> bytearray:
    # Read into a bytearray: binary outputs are then writable NumPy views of
    # it, with no copy.
    if resp.length is None:  # chunked or delimited by close
        return bytearray(resp.read())
    buf = bytearray(resp.length)
    view, got = memoryview(buf), 0
    while got < len(buf):
        n = resp.readinto(view[got:])
        if not n:
            raise http.client.IncompleteRead(bytes(buf[:got]), len(buf) - got)
        got += n
    # Mark the answer done (an empty body is never read): http.client sends
    # the connection's next request only after that.
    resp.close()
    return buf


class Client:
    """A V2 HTTP client for one Flywheel (or any V2) server.

    ``url``: ``http://host:port`` (or https, optionally with a path prefix).
    ``api_key``: sent as ``Authorization: Bearer <key>``. ``timeout``: seconds
    for connecting and for each read of an answer. ``ca_file``: PEM CAs to
    trust for https instead of the system's; ``cert_file`` / ``key_file``:
    this client's certificate and key, for a server that wants mutual TLS.

    Connections are kept alive and reused (a small LIFO pool, so that
    sequential calls share one socket and concurrent ones get their own).
    Thread-safe: share one Client between threads. ``close()`` (or ``with``)
    closes the pooled connections.

    Every method raises ClientError: with the HTTP status and the server's
    message for a 4xx/5xx answer, with status None when the server could not
    be reached or did not answer in time. A request on a kept-alive connection
    that the server had closed meanwhile is sent once more on a new one.
    """

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 10.0, *,
                 ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None) -> None:
        scheme, host, port, self._prefix = parse_url(url)
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, not {timeout!r}")
        self.url, self._timeout = url, timeout
        self._host = f"{host}:{port}"
        tls = TlsFiles(ca_file, cert_file, key_file)
        tls.check_scheme(url, scheme == "https")
        self._pool = _Pool(scheme, host, port, timeout, tls)
        self._v2 = V2Http(api_key)

    # -- transport ------------------------------------------------------------
    def _send(self, call: HttpCall) -> HttpReply:
        conn = self._pool.get()
        try:
            for attempt in (0, 1):
                reused = conn.sock is not None
                if reused and _idle_but_readable(conn.sock):
                    conn.close()
                    reused = False
                try:
                    conn.request(call.method, self._prefix + call.path, call.body, call.headers or {})
                    resp = conn.getresponse()
                    body = _read_body(resp)
                    break
                except _STALE:
                    conn.close()
                    if not reused or attempt:
                        raise
        except TimeoutError:
            conn.close()
            raise ClientError(None, f"no answer from {self.url} within {self._timeout} s") from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise ClientError(None, f"cannot reach {self.url}: {exc!r}") from exc
        except BaseException:  # interrupted mid-exchange: the connection is out of step
            conn.close()
            raise
        if resp.will_close:
            conn.close()
        self._pool.put(conn)
        return HttpReply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)

    def _run(self, flow: Flow) -> Any:
        try:
            call = next(flow)
            while True:
                call = flow.send(self._send(call))
        except StopIteration as done:
            return done.value

    # -- inference ----------------------------------------------------------
    def infer(
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
        """Run ``model`` (at ``version``; None = the server's choice) on ``inputs``.

        inputs: one array (sent as the model's only input; its name is read
            from the model's metadata once and cached) or name -> array.
            Arrays keep their dtype (float64 travels as FP64).
        key: sticky routing key, header ``flywheel-routing-key``.
        request_id: the V2 ``id``, also sent as header ``flywheel-request-id``.
        binary: tensors travel in the binary tensor data extension (inputs
            and outputs); False sends and asks for JSON tensors.
        outputs: output names to return (default: all), or name -> that
            output's V2 parameters.
        parameters: the request's V2 parameters. headers: extra HTTP headers
            (they override the client's own).

        Raises ClientError (400 bad input, 404 unknown model or version, 503
        not ready or overloaded, ...), ValueError when a single array is
        given for a model with several inputs.
        """
        return self._run(self._v2.infer(
            model, inputs, version=version, key=key, request_id=request_id, binary=binary,
            outputs=outputs, parameters=parameters, headers=headers,
        ))

    def feedback(self, model: str, request_id: str, reward: float) -> Any:
        """Report the ``reward`` of an earlier answer (its ``request_id``):
        ``POST /v2/models/{model}/feedback`` ``{"id", "reward"}``; returns the
        decoded JSON answer."""
        return self._run(self._v2.feedback(model, request_id, reward))

    # -- health and metadata -------------------------------------------------
    def live(self) -> bool:
        """Whether the server is live (False on 404/503; ClientError when unreachable)."""
        return self._run(self._v2.probe("/v2/health/live"))

    def ready(self) -> bool:
        """Whether every model the server serves is ready."""
        return self._run(self._v2.probe("/v2/health/ready"))

    def model_ready(self, name: str, version: str | None = None) -> bool:
        """Whether model ``name`` (at ``version``) is ready; False when unknown."""
        return self._run(self._v2.probe(model_path(name, version) + "/ready"))

    def metadata(self, name: str | None = None, version: str | None = None) -> dict:
        """Server metadata (no name) or model ``name``'s metadata (V2 JSON)."""
        return self._run(self._v2.metadata(name, version))

    # -- management (JSON in, decoded JSON out) ----------------------------------
    def _json(self, method: str, path: str, body: Any = None) -> Any:
        return self._run(self._v2.json(method, path, body))

    def drift(self, name: str, version: str) -> Any:
        """``GET /v2/models/{name}/versions/{version}/drift``: the drift
        monitor's recent windows of that version, oldest first."""
        return self._json("GET", model_path(name, version) + "/drift")

    def endpoints(self) -> Any:
        """``GET /v2/endpoints``."""
        return self._json("GET", "/v2/endpoints")

    def endpoint(self, name: str) -> Any:
        """``GET /v2/endpoints/{name}``."""
        return self._json("GET", endpoint_path(name))

    def set_policy(self, name: str, policy: Mapping[str, Any]) -> Any:
        """``PUT /v2/endpoints/{name}/policy`` with ``policy``."""
        return self._json("PUT", endpoint_path(name, "policy"), policy)

    def add_variant(self, name: str, model: Mapping[str, Any], *, allow_signature_change: bool = False) -> Any:
        """``POST /v2/endpoints/{name}/variants`` with ``model``; see
        :func:`~flywheel.client._v2.with_allow` for ``allow_signature_change``."""
        return self._json("POST", endpoint_path(name, "variants"), with_allow(model, allow_signature_change))

    def remove_variant(self, name: str, version: str) -> Any:
        """``DELETE /v2/endpoints/{name}/variants/{version}``."""
        return self._json("DELETE", endpoint_path(name, "variants", version))

    def swap(self, name: str, model: Mapping[str, Any], *, allow_signature_change: bool = False) -> Any:
        """``POST /v2/endpoints/{name}/swap`` with ``model``; see
        :func:`~flywheel.client._v2.with_allow` for ``allow_signature_change``."""
        return self._json("POST", endpoint_path(name, "swap"), with_allow(model, allow_signature_change))

    def start_canary(self, name: str, canary: Mapping[str, Any], *, allow_signature_change: bool = False) -> Any:
        """``POST /v2/endpoints/{name}/canary`` with ``canary``; see
        :func:`~flywheel.client._v2.with_allow` for ``allow_signature_change``."""
        return self._json("POST", endpoint_path(name, "canary"), with_allow(canary, allow_signature_change))

    def abort_canary(self, name: str) -> Any:
        """``DELETE /v2/endpoints/{name}/canary``."""
        return self._json("DELETE", endpoint_path(name, "canary"))

    def promote(self, name: str, version: str) -> Any:
        """``POST /v2/endpoints/{name}/promote`` with ``{"version": version}``."""
        return self._json("POST", endpoint_path(name, "promote"), {"version": version})

    def rollback(self, name: str) -> Any:
        """``POST /v2/endpoints/{name}/rollback``."""
        return self._json("POST", endpoint_path(name, "rollback"))

    def approve(self, name: str, version: int | str, comment: str = "") -> Any:
        """``POST /v2/models/{name}/versions/{version}/approve``: approve a
        registry version for production as this client's API key (recorded
        as ``key:<key name>``; needs the admin role). Answers the version's
        approvers and the gates that still fail; ClientError 409 when this
        key's identity already approved it, 403 without an admin key or
        when the server runs without auth."""
        return self._json("POST", model_path(name, str(version)) + "/approve", {"comment": comment})

    def set_shadow(self, name: str, shadow: Mapping[str, Any]) -> Any:
        """``PUT /v2/endpoints/{name}/shadow`` with ``shadow``."""
        return self._json("PUT", endpoint_path(name, "shadow"), shadow)

    def clear_shadow(self, name: str) -> Any:
        """``DELETE /v2/endpoints/{name}/shadow``."""
        return self._json("DELETE", endpoint_path(name, "shadow"))

    # -- lifetime -------------------------------------------------------------
    @property
    def sockets_opened(self) -> int:
        """TCP connections this client has opened so far (keep-alive at work: it stays low)."""
        return self._pool.sockets_opened

    def close(self) -> None:
        """Close the pooled connections; later calls raise ClientError."""
        self._pool.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.url!r})"
