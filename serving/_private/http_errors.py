"""The one table mapping Flywheel's error codes to HTTP statuses."""

from __future__ import annotations

from flywheel.protocol.codec import encode_json
from flywheel.protocol.errors import ErrorCode
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
