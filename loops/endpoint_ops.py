"""The running endpoint as a loop sees it: serving's public HTTP face.

A loop never reaches into serving's processes: it adds its candidate as a
variant, starts the canary and reads the endpoint's status and drift history
over HTTP, as an operator would, with an API key of role ``operate`` when the
server has auth on. Refusals come back as the domain errors they were.
"""

from __future__ import annotations

from typing import Any

from flywheel.client import Client, ClientError
from flywheel.protocol.errors import (
    FlywheelError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    PreconditionFailedError,
    UnauthenticatedError,
    UnavailableError,
)

_BY_STATUS = {400: InvalidInputError, 401: UnauthenticatedError, 403: PermissionDeniedError, 404: NotFoundError,
              409: PreconditionFailedError, 412: PreconditionFailedError, 422: InvalidInputError}


def as_domain_error(exc: ClientError) -> FlywheelError:
    """A refused call as the domain error it was; no answer at all (or a 5xx)
    is UnavailableError, which a loop retries on its next tick."""
    cls = _BY_STATUS.get(exc.status) if isinstance(exc.status, int) else None
    return (cls or UnavailableError)(f"{exc.status or 'no answer'}: {exc.message}")


class HttpEndpointOps:
    """Thread-confined: one controller thread uses it."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 10.0) -> None:
        self._client = Client(url, api_key=api_key, timeout=timeout)

    def _call(self, fn, *args) -> Any:
        try:
            return fn(*args)
        except ClientError as exc:
            raise as_domain_error(exc) from None

    def status(self, endpoint: str) -> dict:
        return self._call(self._client.endpoint, endpoint)

    def add_variant(self, endpoint: str, model: dict) -> Any:
        return self._call(self._client.add_variant, endpoint, model)

    def remove_variant(self, endpoint: str, version: str) -> Any:
        return self._call(self._client.remove_variant, endpoint, version)

    def start_canary(self, endpoint: str, canary: dict) -> Any:
        return self._call(self._client.start_canary, endpoint, canary)

    def abort_canary(self, endpoint: str) -> Any:
        return self._call(self._client.abort_canary, endpoint)

    def drift_history(self, endpoint: str, version: str) -> list[dict]:
        """The drift monitor's recent windows of one variant, oldest first
        (an empty list when the variant is not monitored)."""
        try:
            return self._call(self._client.drift, endpoint, version)
        except NotFoundError:
            return []

    def close(self) -> None:
        self._client.close()
