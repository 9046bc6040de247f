"""A sampled access log of the HTTP port (``server.access_log``).

:func:`with_access_log` wraps the HTTP handler: a request not drawn by the
sample costs one ``random()`` and a compare; with ``sample: 0`` the handler
is not wrapped at all. A sampled request gives one record when its answer
is ready: method, path, model, version, status, duration (ms, from the
handler's call to its answer), bytes in and out, the client's address
(``host:port`` of the TCP peer: a proxy in front is what shows), request
id, trace id (the ``traceparent`` the answer names when tracing is on, else
the caller's trace id when its header parses).

Never logged: a header's value (``Authorization`` above all), a query
string, a body, a key; the request id is the one the answer names or the
caller sent in ``flywheel-request-id``. The path is the request's own
(no query), cut to 256 characters.

gRPC through the HTTP/2 front (``grpc_server: haproxy``) is logged the same
way, the front's HTTP/1.1 call being an HTTP request to this process: path
``/inference.GRPCInferenceService/<Method>``, status 200 and the call's
``grpc_status`` beside it; no model field (its name is inside the message,
which is not parsed for the log), no client address (the front's Unix
socket). gRPC on grpcio is not logged.

Lines go to the ``flywheel.access`` logger (INFO, the fields in
``extra["access"]``, so that common/log_format.py writes them as JSON
fields) or, with ``path``, appended to that file as one JSON object per
line (a sampled request writes there on the loop: keep the sample small
for a busy server, or use the logger).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any

import msgspec

from flywheel.serving._private.http_server import Request, Response
from flywheel.serving._private.tracing import parse_traceparent

log = logging.getLogger("flywheel.access")

MAX_PATH = 256
_REQUEST_ID = b"flywheel-request-id"
_VERSION = b"flywheel-model-version"
_ENCODE = msgspec.json.Encoder()


def _header_value(head: bytes, name: bytes) -> str | None:
    """A header's value in a block of ``name: value\\r\\n`` lines."""
    for line in head.split(b"\r\n"):
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == name:
            return value.strip().decode("latin-1")
    return None


def _model(path: str) -> str | None:
    parts = path.strip("/").split("/")
    if len(parts) >= 3 and parts[0] == "v2" and parts[1] == "models":
        return parts[2]
    return None


def access_fields(req: Request, resp: Response, duration_s: float) -> dict[str, Any]:
    """The fields of one access log line (see the module docstring)."""
    # headers, and trailers (a gRPC call's answer through the HTTP/2 front:
    # its metadata and grpc-status travel there)
    extra = (resp[3] if len(resp) > 3 else b"") + (resp[4] if len(resp) > 4 else b"")
    trace = _header_value(extra, b"traceparent") if extra else None
    parsed = parse_traceparent(trace or req.headers.get(b"traceparent"))
    rid = (_header_value(extra, _REQUEST_ID) if extra else None) or req.headers.get(_REQUEST_ID)
    fields = {
        "method": req.method,
        "path": req.path[:MAX_PATH],
        "model": _model(req.path),
        "version": _header_value(extra, _VERSION) if extra else None,
        "status": resp[0],
        "duration_ms": round(duration_s * 1000, 3),
        "bytes_in": len(req.body),
        "bytes_out": len(resp[1]),
        "client": req.peer or None,
        "request_id": (rid.decode("latin-1") if isinstance(rid, bytes) else rid)[:128] if rid else None,
        "trace_id": f"{parsed.trace_id:032x}" if parsed is not None else None,
    }
    grpc_status = _header_value(extra, b"grpc-status") if len(resp) > 4 else None
    if grpc_status is not None:
        fields["grpc_status"] = int(grpc_status) if grpc_status.isdigit() else grpc_status
    return fields


class AccessLog:
    """Where sampled lines go: ``path`` (a file, JSON lines) or the logger."""

    def __init__(self, sample: float, path: str = "", rand: Callable[[], float] = random.random) -> None:
        self.sample = sample
        self._rand = rand
        self._file = open(path, "a", buffering=1, encoding="utf-8") if path else None  # noqa: SIM115

    def write(self, fields: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(_ENCODE.encode(fields).decode() + "\n")
            return
        log.info("%s %s %s %.3fms", fields["method"], fields["path"], fields["status"], fields["duration_ms"],
                 extra={"access": fields, "request_id": fields["request_id"], "trace_id": fields["trace_id"]})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def wrap(self, handle: Callable[[Request], Any]) -> Callable[[Request], Any]:
        """``handle`` with the sampled requests logged (its answers unchanged)."""
        sample, rand = self.sample, self._rand

        def logged(req: Request):
            if rand() >= sample:
                return handle(req)
            started = time.perf_counter()
            result = handle(req)
            if type(result) is tuple:
                self._done(req, result, started)
                return result
            return self._later(req, result, started)

        return logged

    async def _later(self, req: Request, pending, started: float) -> Response:
        resp = await pending
        self._done(req, resp, started)
        return resp

    def _done(self, req: Request, resp: Response, started: float) -> None:
        try:
            self.write(access_fields(req, resp, time.perf_counter() - started))
        except Exception:  # noqa: BLE001 - the log never fails a request
            log.warning("access log line not written", exc_info=True)
