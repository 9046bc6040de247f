"""The V2 HTTP protocol of the client, without I/O (shared by Client and AsyncClient).

Each operation is a generator ("flow") that yields the HttpCalls it needs and
receives their HttpReplies; a transport drives it (``Client._run`` with
blocking sockets, ``AsyncClient._run`` on asyncio streams) and gets the
flow's return value. So the protocol — paths, headers, JSON and binary tensor
encoding, error mapping — is written once, and a transport is only a way of
moving bytes.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union
from urllib.parse import quote

import msgspec
import numpy as np

from flywheel.client._result import ClientError, InferResult
from flywheel.protocol.codec import InferResponse, OutgoingInput, OutgoingOutput, OutgoingRequest
from flywheel.protocol.datatypes import numpy_dtype, v2_datatype
from flywheel.protocol.errors import FlywheelError
from flywheel.protocol.raw import tensor_from_raw, tensor_to_raw

ROUTING_KEY = "flywheel-routing-key"
REQUEST_ID = "flywheel-request-id"
_HEADER_LENGTH = "inference-header-content-length"

Inputs = Union[np.ndarray, Mapping[str, Any]]
# requested outputs: names, or name -> that output's V2 parameters
Outputs = Union[Sequence[str], Mapping[str, Mapping[str, Any]], None]


@dataclass(slots=True)
class HttpCall:
    """One HTTP request: ``path`` is absolute from the server's V2 root."""

    method: str
    path: str
    body: bytes = b""
    headers: dict[str, str] | None = None


@dataclass(slots=True)
class HttpReply:
    """One HTTP answer; header names in lower case."""

    status: int
    headers: dict[str, str]
    body: bytes | bytearray


Flow = Generator[HttpCall, HttpReply, Any]


_ENCODER = msgspec.json.Encoder()
_ANY = msgspec.json.Decoder()
# The answer's types are the server's own (protocol/codec.py); they ignore
# fields they do not know, so answers from other V2 servers decode too.
_RESPONSE = msgspec.json.Decoder(InferResponse)


def model_path(name: str, version: str | None = None) -> str:
    path = f"/v2/models/{quote(name, safe='')}"
    return f"{path}/versions/{quote(str(version), safe='')}" if version else path


def endpoint_path(name: str, *rest: str) -> str:
    return "/".join([f"/v2/endpoints/{quote(name, safe='')}", *(quote(str(r), safe="") for r in rest)])


def with_allow(body: Mapping[str, Any], allow_signature_change: bool) -> Mapping[str, Any]:
    """A management body (add_variant, swap, canary) with
    ``allow_signature_change: true`` when asked: the server then moves traffic
    even to a model whose signature (input/output names, datatypes, shapes)
    differs from the endpoint's, and records the change. Without it such a
    move is refused with a 400 ClientError naming the first difference, and
    nothing changes."""
    return {**body, "allow_signature_change": True} if allow_signature_change else body


def error_from(reply: HttpReply) -> ClientError:
    """The ClientError of a 4xx/5xx answer: the server's ``{"error": ...}``
    text when the body has one, else the body itself (shortened)."""
    message = ""
    try:
        doc = _ANY.decode(reply.body)
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            message = doc["error"]
    except msgspec.DecodeError:
        pass
    if not message:
        message = bytes(reply.body[:500]).decode("utf-8", "replace") or f"HTTP {reply.status}"
    return ClientError(reply.status, message)


def _decode_json(reply: HttpReply) -> Any:
    if reply.status >= 400:
        raise error_from(reply)
    if not reply.body:
        return {}
    try:
        return _ANY.decode(reply.body)
    except msgspec.DecodeError as exc:
        raise ClientError(None, f"HTTP {reply.status} answer whose body is not JSON: {exc}") from None


def _bytes_as_text(name: str, arr: np.ndarray) -> list[str]:
    try:
        return [v.decode() if isinstance(v, bytes) else str(v) for v in arr.reshape(-1)]
    except UnicodeDecodeError:
        raise ValueError(f"input {name!r} holds BYTES that are not UTF-8: send it with binary=True") from None


def encode_infer(
    inputs: Mapping[str, Any],
    *,
    binary: bool,
    request_id: str | None,
    outputs: Outputs,
    parameters: Mapping[str, Any] | None,
) -> tuple[bytes, int]:
    """A V2 infer request body and its JSON part's length (0 when nothing
    travels as binary). With ``binary``, every input travels as raw bytes
    after the JSON and every output is asked for as binary (the caller's own
    ``binary_data_output`` / per-output ``binary_data`` win)."""
    tensors, raw = [], []
    for name, value in inputs.items():
        arr = np.asarray(value)
        t = OutgoingInput(name=name, shape=list(arr.shape), datatype=v2_datatype(arr.dtype))
        if binary:
            chunk = tensor_to_raw(arr)
            raw.append(chunk)
            t.parameters = {"binary_data_size": len(chunk)}
        elif t.datatype == "BYTES":
            t.data = _bytes_as_text(name, arr)
        else:
            t.data = arr.reshape(-1).tolist()
        tensors.append(t)
    params = dict(parameters or {})
    if binary:
        params.setdefault("binary_data_output", True)
    wanted = None
    if outputs is not None:
        per = outputs if isinstance(outputs, Mapping) else {n: {} for n in outputs}
        wanted = []
        for n, p in per.items():
            p = dict(p or {})
            if binary:
                p.setdefault("binary_data", True)
            wanted.append(OutgoingOutput(name=n, parameters=p or None))
    header = _ENCODER.encode(OutgoingRequest(inputs=tensors, id=request_id, parameters=params or None, outputs=wanted))
    if not raw:
        return header, 0
    return b"".join([header, *raw]), len(header)


def _malformed(what: str) -> ClientError:
    return ClientError(None, f"malformed infer answer: {what}")


def decode_infer(reply: HttpReply) -> InferResult:
    """An InferResult from a 200 infer answer (JSON, or JSON then binary tensors)."""
    body = memoryview(reply.body)
    raw_length = reply.headers.get(_HEADER_LENGTH)
    try:
        n = int(raw_length) if raw_length is not None else len(body)
    except ValueError:
        raise _malformed(f"Inference-Header-Content-Length {raw_length!r} is not a number") from None
    if not 0 < n <= len(body):
        raise _malformed(f"JSON header length {n} does not fit the {len(body)}-byte body")
    try:
        resp = _RESPONSE.decode(body[:n])
    except msgspec.DecodeError as exc:
        raise _malformed(str(exc)) from None
    binary, offset = body[n:], 0
    outputs: dict[str, np.ndarray] = {}
    try:
        for out in resp.outputs:
            count = int(np.prod(out.shape, dtype=np.int64))
            size = (out.parameters or {}).get("binary_data_size")
            if size is not None:
                if not isinstance(size, int) or offset + size > len(binary):
                    raise _malformed(f"output {out.name!r}: binary_data_size {size!r} runs past the body")
                arr = tensor_from_raw(out.name, out.datatype, out.shape, binary[offset : offset + size], count)
                offset += size
            elif out.data is None:
                raise _malformed(f"output {out.name!r} has neither data nor binary_data_size")
            elif out.datatype == "BYTES":
                flat = np.asarray(out.data, dtype=object).reshape(-1)
                arr = np.empty(flat.size, dtype=object)
                arr[:] = [v.encode() if isinstance(v, str) else v for v in flat]
                arr = arr.reshape(out.shape)
            else:
                arr = np.asarray(out.data, dtype=numpy_dtype(out.datatype)).reshape(out.shape)
            # a view into an immutable body: copy, so every output is writable
            outputs[out.name] = arr if arr.flags.writeable else arr.copy()
    except FlywheelError as exc:  # bad datatype or size, from the shared codec
        raise _malformed(exc.message) from None
    except ValueError as exc:  # data that does not fill the shape
        raise _malformed(str(exc)) from None
    return InferResult(outputs, resp.model_name, resp.model_version, resp.id, resp.parameters, reply.headers)


class V2Http:
    """The flows of every HTTP operation, for one server and one credential.

    Holds the input-name cache (model, version) -> its only input's name.
    Thread-safe: the cache is a dict whose single reads and writes are atomic;
    two threads may both fetch a missing name, which is harmless.
    """

    def __init__(self, api_key: str | None) -> None:
        self._base = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._input_names: dict[tuple[str, str], str] = {}

    def _headers(self, extra: Mapping[str, str] | None = None, **more: str) -> dict[str, str]:
        headers = {**self._base, **more}
        if extra:
            headers.update({k.lower(): v for k, v in extra.items()})
        return headers

    def json(self, method: str, path: str, body: Any = None) -> Flow:
        """Any JSON route: returns the decoded answer ({} when empty)."""
        data, headers = b"", self._headers()
        if body is not None:
            data = _ENCODER.encode(body)
            headers["content-type"] = "application/json"
        reply = yield HttpCall(method, path, data, headers)
        return _decode_json(reply)

    def probe(self, path: str) -> Flow:
        """True on 200; False on 404 or 503 (the protocol's "not there" and
        "not ready"); ClientError for any other answer (an auth refusal, say)."""
        reply = yield HttpCall("GET", path, b"", self._headers())
        if reply.status == 200:
            return True
        if reply.status in (404, 503):
            return False
        raise error_from(reply)

    def _input_name(self, model: str, version: str | None) -> Flow:
        key = (model, version or "")
        name = self._input_names.get(key)
        if name is None:
            meta = yield from self.json("GET", model_path(model, version))
            names = [t.get("name") for t in meta.get("inputs", [])] if isinstance(meta, dict) else []
            if len(names) != 1:
                raise ValueError(
                    f"model {model!r} has {len(names)} inputs {names}: pass a dict of input name -> array"
                )
            name = self._input_names[key] = names[0]
        return name

    def infer(
        self,
        model: str,
        inputs: Inputs,
        *,
        version: str | None,
        key: str | None,
        request_id: str | None,
        binary: bool,
        outputs: Outputs,
        parameters: Mapping[str, Any] | None,
        headers: Mapping[str, str] | None,
    ) -> Flow:
        cached = not isinstance(inputs, Mapping)
        if cached:
            inputs = {(yield from self._input_name(model, version)): inputs}
        body, header_length = encode_infer(
            inputs, binary=binary, request_id=request_id, outputs=outputs, parameters=parameters
        )
        more = {"content-type": "application/octet-stream" if header_length else "application/json"}
        if header_length:
            more[_HEADER_LENGTH] = str(header_length)
        if key is not None:
            more[ROUTING_KEY] = str(key)
        if request_id is not None:
            more[REQUEST_ID] = str(request_id)
        reply = yield HttpCall("POST", model_path(model, version) + "/infer", body, self._headers(headers, **more))
        if reply.status >= 400:
            if cached:  # the model may have been replaced: ask for its input again next time
                self._input_names.pop((model, version or ""), None)
            raise error_from(reply)
        return decode_infer(reply)

    def feedback(self, model: str, request_id: str, reward: float) -> Flow:
        return self.json("POST", model_path(model) + "/feedback", {"id": request_id, "reward": float(reward)})

    def metadata(self, name: str | None, version: str | None) -> Flow:
        return self.json("GET", "/v2" if name is None else model_path(name, version))
