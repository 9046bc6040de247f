"""The one table mapping Flywheel's error codes to HTTP statuses."""

from __future__ import annotations

from flywheel.protocol.codec import encode_json
from flywheel.protocol.errors import ErrorCode, FlywheelError, RateLimitedError
from flywheel.serving._private.http_server import JSON, Response

HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INTERNAL: 500,
    ErrorCode.INVALID_ARGUMENT: 400,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.RESOURCE_EXHAUSTED: 503,
    ErrorCode.DEADLINE_EXCEEDED: 504,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.ALREADY_EXISTS: 409,
    ErrorCode.FAILED_PRECONDITION: 412,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.PERMISSION_DENIED: 403,
    ErrorCode.RATE_LIMITED: 429,
}


def status_for(code: int) -> int:
    """HTTP status for an ErrorCode value (500 for anything unknown)."""
    try:
        return HTTP_STATUS[ErrorCode(code)]
    except ValueError:
        return 500


def error_response(status: int, message: str) -> Response:
    """A V2 error: ``{"error": "<message>"}`` with the given status."""
    return status, encode_json({"error": message}), JSON


def error_for_code(code: int, message: str) -> Response:
    status = status_for(code)
    if status == 401:  # RFC 9110: a 401 names the scheme to use
        return status, encode_json({"error": message}), JSON, b"www-authenticate: Bearer\r\n"
    return error_response(status, message)


def error_for(exc: FlywheelError) -> Response:
    """``error_for_code`` of a raised error, with what only the error knows:
    ``Retry-After`` (whole seconds) on a 429 whose delay is known."""
    if type(exc) is RateLimitedError and exc.retry_after_s is not None:
        status = status_for(exc.code)
        return status, encode_json({"error": exc.message}), JSON, b"retry-after: %d\r\n" % exc.retry_after_whole_s()
    return error_for_code(exc.code, exc.message)


def method_not_allowed(path: str, method: str, allowed: tuple[str, ...]) -> Response:
    """A 405 with the ``Allow`` header that RFC 9110 asks of it."""
    listed = ", ".join(allowed)
    return 405, encode_json({"error": f"{path} takes {' or '.join(allowed)}, not {method}"}), JSON, \
        b"allow: " + listed.encode() + b"\r\n"
