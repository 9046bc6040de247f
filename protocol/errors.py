"""One error vocabulary for all of Flywheel.

Domain code raises these; each transport maps :class:`ErrorCode` to its own
status in exactly one table (HTTP: ``flywheel.serving._private.http_errors``).
Nothing here knows about HTTP or gRPC.
"""

from __future__ import annotations

import enum
import math


class ErrorCode(enum.IntEnum):
    """Neutral error codes. The integer values travel on Flywheel's internal
    replica protocol, so never renumber an existing member."""

    INTERNAL = 1
    INVALID_ARGUMENT = 2
    NOT_FOUND = 3
    UNAVAILABLE = 4  # not ready (loading, draining)
    RESOURCE_EXHAUSTED = 5  # overloaded: queue full
    DEADLINE_EXCEEDED = 6
    PAYLOAD_TOO_LARGE = 7
    ALREADY_EXISTS = 8
    FAILED_PRECONDITION = 9  # e.g. a promotion gate refused
    UNAUTHENTICATED = 10  # no valid credentials
    PERMISSION_DENIED = 11  # valid credentials, wrong role
    RATE_LIMITED = 12  # this caller exceeds its own rate or in-flight limit


class FlywheelError(Exception):
    """Base of all domain errors; ``code`` says what kind of failure it is."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInputError(FlywheelError):
    """The caller sent something malformed; the message names the field."""

    code = ErrorCode.INVALID_ARGUMENT


class NotFoundError(FlywheelError):
    """Unknown model, version or route."""

    code = ErrorCode.NOT_FOUND


class UnavailableError(FlywheelError):
    """The model exists but cannot take requests now (loading, stopping)."""

    code = ErrorCode.UNAVAILABLE


class OverloadedError(FlywheelError):
    """The model's queue is full; retry later."""

    code = ErrorCode.RESOURCE_EXHAUSTED


class DeadlineExceededError(FlywheelError):
    """The request's deadline passed before it could be served."""

    code = ErrorCode.DEADLINE_EXCEEDED


class PayloadTooLargeError(FlywheelError):
    """The request body is larger than the configured limit."""

    code = ErrorCode.PAYLOAD_TOO_LARGE


class AlreadyExistsError(FlywheelError):
    """The thing to create exists already (a model name, an artifact name)."""

    code = ErrorCode.ALREADY_EXISTS


class PreconditionFailedError(FlywheelError):
    """The request is well-formed but the current state forbids it (a stage
    transition that is not allowed, a promotion gate that failed)."""

    code = ErrorCode.FAILED_PRECONDITION


class UnauthenticatedError(FlywheelError):
    """No credentials, or credentials that are not (or no longer) valid."""

    code = ErrorCode.UNAUTHENTICATED


class PermissionDeniedError(FlywheelError):
    """The caller is known but its role does not allow this call."""

    code = ErrorCode.PERMISSION_DENIED


class RateLimitedError(FlywheelError):
    """The caller's own limit (its request rate, or its requests in flight)
    is reached. ``retry_after_s``: when a retry can succeed, where known."""

    code = ErrorCode.RATE_LIMITED

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def retry_after_whole_s(self) -> int | None:
        """The delay in whole seconds, at least 1 (HTTP Retry-After's unit)."""
        if self.retry_after_s is None:
            return None
        return max(1, math.ceil(self.retry_after_s))


class IntegrityError(FlywheelError):
    """Stored data does not match what was recorded (a tampered or truncated
    artifact): refused, never served."""

    code = ErrorCode.INTERNAL


class ConfigError(FlywheelError, ValueError):
    """A configuration value is invalid; the message names the field.

    Also a ValueError, so that msgspec, when it raises out of a
    ``__post_init__``, adds the path of the offending field to the message."""

    code = ErrorCode.INVALID_ARGUMENT


_BY_CODE = {
    cls.code: cls
    for cls in (
        FlywheelError,
        InvalidInputError,
        NotFoundError,
        UnavailableError,
        OverloadedError,
        DeadlineExceededError,
        PayloadTooLargeError,
        AlreadyExistsError,
        PreconditionFailedError,
        UnauthenticatedError,
        PermissionDeniedError,
        RateLimitedError,
    )
}


def error_from_code(code: int, message: str) -> FlywheelError:
    """Rebuild a domain error from its code (the inverse of ``err.code``)."""
    try:
        cls = _BY_CODE[ErrorCode(code)]
    except ValueError:
        cls = FlywheelError
    return cls(message)
