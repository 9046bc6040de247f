"""What every transport of the client returns or raises: InferResult and ClientError."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


class ClientError(Exception):
    """A call the server refused or could not be made.

    status: the HTTP status (int) of a refused HTTP call, the gRPC status
        code's name (``"INVALID_ARGUMENT"``, ``"NOT_FOUND"``, ...) of a failed
        gRPC call, or None when no answer came at all (connection refused,
        timed out, malformed answer) or the client itself refused the call.
    message: the server's ``"error"`` text (gRPC: the status details), or a
        description of what went wrong on the client's side.
    """

    def __init__(self, status: int | str | None, message: str) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message

    def __str__(self) -> str:
        return self.message if self.status is None else f"[{self.status}] {self.message}"


class InferResult:
    """One inference answer.

    outputs: output name -> NumPy array, in the server's order. Arrays are
        writable and own (or solely share) their memory. BYTES outputs are
        object arrays of ``bytes``.
    model_name / model_version: who answered. ``model_version`` is the variant
        that served the call: the V2 body's ``model_version``, else the
        ``flywheel-model-version`` header (gRPC: metadata), else None.
    request_id: the V2 ``id`` of the answer, else the ``flywheel-request-id``
        header (gRPC: metadata), else None.
    parameters: the answer's V2 ``parameters`` (an empty dict when none).
    headers: the HTTP response headers (gRPC: initial and trailing
        metadata), names in lower case.
    """

    __slots__ = ("outputs", "model_name", "model_version", "request_id", "parameters", "headers")

    def __init__(
        self,
        outputs: dict[str, np.ndarray],
        model_name: str,
        model_version: str | None,
        request_id: str | None,
        parameters: Mapping[str, Any] | None,
        headers: Mapping[str, str],
    ) -> None:
        self.outputs = outputs
        self.model_name = model_name
        self.model_version = model_version or headers.get("flywheel-model-version") or None
        self.request_id = request_id or headers.get("flywheel-request-id") or None
        self.parameters = dict(parameters or {})
        self.headers = dict(headers)

    def output(self, name: str | None = None) -> np.ndarray:
        """The output called ``name``; without a name, the only output.

        Raises KeyError for a name the answer lacks and ValueError when no
        name is given and the answer holds other than exactly one output
        (both messages list the outputs there are).
        """
        if name is None:
            if len(self.outputs) != 1:
                raise ValueError(
                    f"the answer has {len(self.outputs)} outputs {list(self.outputs)}: name the one you want"
                )
            return next(iter(self.outputs.values()))
        try:
            return self.outputs[name]
        except KeyError:
            raise KeyError(f"no output {name!r} in the answer; it has {list(self.outputs)}") from None

    def __repr__(self) -> str:
        shapes = {n: (a.dtype.name, a.shape) for n, a in self.outputs.items()}
        return (
            f"InferResult(model_name={self.model_name!r}, model_version={self.model_version!r}, "
            f"request_id={self.request_id!r}, outputs={shapes})"
        )
