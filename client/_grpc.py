"""The gRPC clients: GrpcClient (blocking) and AsyncGrpcClient (grpc.aio).

grpc and the V2 stubs are imported when a client is made, not when this
module is: ``import flywheel.client`` stays cheap for HTTP-only users.
Tensors travel as ``raw_input_contents`` / ``raw_output_contents``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flywheel.client._result import ClientError, InferResult
from flywheel.client._tls import TlsFiles
from flywheel.client._v2 import REQUEST_ID, ROUTING_KEY, Inputs, Outputs
from flywheel.protocol.datatypes import numpy_dtype, v2_datatype
from flywheel.protocol.errors import FlywheelError
from flywheel.protocol.raw import tensor_from_raw, tensor_to_raw

Metadata = Sequence[tuple[str, str]] | Mapping[str, str] | None
_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
_NOT_THERE = ("NOT_FOUND", "UNAVAILABLE")  # model_ready answers False for these


def _load():
    """(grpc, inference_pb2, inference_pb2_grpc, grpc_codec), imported on first use."""
    try:
        import grpc
        from flywheel.protocol import grpc_codec
        from flywheel.protocol.proto import inference_pb2, inference_pb2_grpc
    except ImportError as exc:
        raise ImportError(
            f"flywheel.client's gRPC clients need grpcio and protobuf ({exc}): pip install grpcio protobuf"
        ) from exc
    return grpc, inference_pb2, inference_pb2_grpc, grpc_codec


def _target(url: str) -> tuple[str, bool]:
    """(host:port, tls) of ``host:port``, ``grpc://host:port`` or ``grpcs://host:port``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url, False
    if scheme not in ("grpc", "grpcs") or not rest:
        raise ValueError(f"gRPC URL {url!r} must look like host:port, grpc://host:port or grpcs://host:port")
    return rest.rstrip("/"), scheme == "grpcs"


def _set_param(p, value: Any) -> None:
    # InferParameter has bool, int64 and string (no float: PROTOCOL.md)
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, str):
        p.string_param = value
    else:
        raise ValueError(f"gRPC parameter value {value!r}: only bool, int and str travel (send a float as str)")


def _build_request(pb, model, version, inputs: Mapping[str, Any], request_id, outputs: Outputs, parameters):
    req = pb.ModelInferRequest(model_name=model, model_version=version or "", id=request_id or "")
    for name, value in inputs.items():
        arr = np.asarray(value)
        req.inputs.add(name=name, datatype=v2_datatype(arr.dtype), shape=arr.shape)
        req.raw_input_contents.append(tensor_to_raw(arr))
    if outputs is not None:
        per = outputs if isinstance(outputs, Mapping) else {n: {} for n in outputs}
        for name, params in per.items():
            out = req.outputs.add(name=name)
            for k, v in (params or {}).items():
                _set_param(out.parameters[k], v)
    for k, v in (parameters or {}).items():
        _set_param(req.parameters[k], v)
    return req


def _to_result(codec, resp, metadata: Sequence[tuple[str, Any]]) -> InferResult:
    """An InferResult from a ModelInferResponse (raw or typed contents; the
    server's own grpc_codec says which contents field carries a datatype)."""
    outputs: dict[str, np.ndarray] = {}
    raw = resp.raw_output_contents
    try:
        for i, out in enumerate(resp.outputs):
            shape = list(out.shape)
            if raw:
                if i >= len(raw):
                    raise ClientError(None, f"malformed infer answer: no raw_output_contents for {out.name!r}")
                # a view of protobuf's immutable bytes: copied, so that it is writable
                count = int(np.prod(shape, dtype=np.int64))
                arr = tensor_from_raw(out.name, out.datatype, shape, raw[i], count).copy()
            else:
                field = codec._CONTENTS_FIELD.get(out.datatype)  # None for FP16: raw only
                values = list(getattr(out.contents, field)) if field else []
                if out.datatype == "BYTES":
                    arr = np.empty(len(values), dtype=object)
                    arr[:] = values
                else:
                    arr = np.array(values, dtype=numpy_dtype(out.datatype))
                arr = arr.reshape(shape)  # ValueError when the values do not fill it
            outputs[out.name] = arr
    except FlywheelError as exc:
        raise ClientError(None, f"malformed infer answer: {exc.message}") from None
    except ValueError as exc:
        raise ClientError(None, f"malformed infer answer: {exc}") from None
    headers = {k.lower(): v for k, v in metadata}
    return InferResult(outputs, resp.model_name, resp.model_version, resp.id, codec._params(resp.parameters), headers)


def _model_meta(resp) -> dict:
    tensor = lambda t: {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}  # noqa: E731
    return {"name": resp.name, "versions": list(resp.versions), "platform": resp.platform,
            "inputs": [tensor(t) for t in resp.inputs], "outputs": [tensor(t) for t in resp.outputs]}


def _only_input(model: str, meta) -> str:
    names = [t.name for t in meta.inputs]
    if len(names) != 1:
        raise ValueError(f"model {model!r} has {len(names)} inputs {names}: pass a dict of input name -> array")
    return names[0]


class _Base:
    def __init__(self, url: str, api_key: str | None, timeout: float, http_url: str | None,
                 tls: TlsFiles) -> None:
        self.url = url
        self._target, self._tls = _target(url)
        tls.check_scheme(url, self._tls)
        self._tls_files = tls
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, not {timeout!r}")
        self._api_key, self._timeout, self._http_url = api_key, timeout, http_url
        self._grpc, self._pb, self._pb_grpc, self._codec = _load()
        self._auth = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._input_names: dict[tuple[str, str], str] = {}

    def _metadata(self, key: str | None, request_id: str | None, extra: Metadata) -> list[tuple[str, str]]:
        md = list(self._auth)
        if key is not None:
            md.append((ROUTING_KEY, str(key)))
        if request_id is not None:
            md.append((REQUEST_ID, str(request_id)))
        if extra:
            md.extend((k.lower(), v) for k, v in (extra.items() if isinstance(extra, Mapping) else extra))
        return md

    @staticmethod
    def _error(exc) -> ClientError:
        code = getattr(exc, "code", None)  # every RpcError raised by a call is also a grpc.Call
        if code is None:
            return ClientError(None, str(exc))
        return ClientError(code().name, exc.details() or "")

    def _no_feedback(self) -> ClientError:
        return ClientError(None, "gRPC has no feedback RPC: make the client with http_url='http://host:port' "
                                 "to send feedback over HTTP")


class GrpcClient(_Base):
    """A blocking V2 gRPC client (``inference.GRPCInferenceService``).

    ``url``: ``host:port`` (``grpcs://host:port`` for TLS). ``api_key``: sent as
    metadata ``authorization: Bearer <key>``. ``timeout``: seconds per call.
    ``ca_file`` / ``cert_file`` / ``key_file``: as for the HTTP Client.
    ``http_url``: the same server's HTTP address, used only by feedback()
    (there is no gRPC feedback RPC). Thread-safe (a gRPC channel is).
    Methods raise ClientError with the gRPC status code's name and details.
    """

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 10.0, *,
                 http_url: str | None = None, ca_file: str | None = None, cert_file: str | None = None,
                 key_file: str | None = None) -> None:
        super().__init__(url, api_key, timeout, http_url, TlsFiles(ca_file, cert_file, key_file))
        g = self._grpc
        self._channel = (g.secure_channel(self._target, self._tls_files.grpc_credentials(g), _OPTIONS)
                         if self._tls else g.insecure_channel(self._target, _OPTIONS))
        self._stub = self._pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._http = None

    def _call(self, rpc: str, request, metadata=None, with_call: bool = False):
        try:
            fn = getattr(self._stub, rpc)
            md = metadata if metadata is not None else list(self._auth)
            return (fn.with_call if with_call else fn)(request, metadata=md, timeout=self._timeout)
        except self._grpc.RpcError as exc:
            raise self._error(exc) from exc

    def infer(self, model: str, inputs: Inputs, version: str | None = None, key: str | None = None,
              request_id: str | None = None, outputs: Outputs = None,
              parameters: Mapping[str, Any] | None = None, metadata: Metadata = None) -> InferResult:
        """As Client.infer, over gRPC: ``metadata`` (extra gRPC metadata)
        instead of ``headers``; tensors always travel raw, so no ``binary``;
        ``parameters`` values must be bool, int or str. The routing key goes
        as metadata ``flywheel-routing-key``, the request id as the V2 ``id``
        and metadata ``flywheel-request-id``."""
        named = inputs if isinstance(inputs, Mapping) else None
        if named is None:
            cache = (model, version or "")
            if cache not in self._input_names:
                meta = self._call("ModelMetadata", self._pb.ModelMetadataRequest(name=model, version=version or ""))
                self._input_names[cache] = _only_input(model, meta)
            named = {self._input_names[cache]: inputs}
        req = _build_request(self._pb, model, version, named, request_id, outputs, parameters)
        try:
            resp, call = self._call("ModelInfer", req, self._metadata(key, request_id, metadata), with_call=True)
        except ClientError:
            if not isinstance(inputs, Mapping):  # the model may have changed: re-read its input
                self._input_names.pop((model, version or ""), None)
            raise
        return _to_result(self._codec, resp, [*(call.initial_metadata() or ()), *(call.trailing_metadata() or ())])

    def feedback(self, model: str, request_id: str, reward: float) -> Any:
        """As Client.feedback, sent over HTTP to ``http_url``; ClientError
        (status None) when the client was made without one."""
        if self._http_url is None:
            raise self._no_feedback()
        if self._http is None:
            from flywheel.client._http import Client

            t = self._tls_files
            self._http = Client(self._http_url, self._api_key, self._timeout, ca_file=t.ca_file,
                                cert_file=t.cert_file, key_file=t.key_file)
        return self._http.feedback(model, request_id, reward)

    def live(self) -> bool:
        """ServerLive."""
        return self._call("ServerLive", self._pb.ServerLiveRequest()).live

    def ready(self) -> bool:
        """ServerReady."""
        return self._call("ServerReady", self._pb.ServerReadyRequest()).ready

    def model_ready(self, name: str, version: str | None = None) -> bool:
        """ModelReady; False when the model is unknown (NOT_FOUND) or unavailable."""
        try:
            return self._call("ModelReady", self._pb.ModelReadyRequest(name=name, version=version or "")).ready
        except ClientError as exc:
            if exc.status in _NOT_THERE:
                return False
            raise

    def metadata(self, name: str | None = None, version: str | None = None) -> dict:
        """Server or model metadata, as the same dict as HTTP's V2 JSON."""
        if name is None:
            r = self._call("ServerMetadata", self._pb.ServerMetadataRequest())
            return {"name": r.name, "version": r.version, "extensions": list(r.extensions)}
        return _model_meta(self._call("ModelMetadata", self._pb.ModelMetadataRequest(name=name, version=version or "")))

    def close(self) -> None:
        """Close the channel (and the feedback HTTP client)."""
        self._channel.close()
        if self._http is not None:
            self._http.close()

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncGrpcClient(_Base):
    """The grpc.aio twin of GrpcClient: the same methods as coroutines.

    The channel is made on the running loop at the first call, so the client
    may be constructed anywhere; it then belongs to that loop. feedback()
    goes over HTTP with an AsyncClient to ``http_url``.
    """

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 10.0, *,
                 http_url: str | None = None, ca_file: str | None = None, cert_file: str | None = None,
                 key_file: str | None = None) -> None:
        super().__init__(url, api_key, timeout, http_url, TlsFiles(ca_file, cert_file, key_file))
        self._channel = self._stub = self._http = None

    def _stub_now(self):
        if self._stub is None:
            aio = self._grpc.aio
            self._channel = (aio.secure_channel(self._target, self._tls_files.grpc_credentials(self._grpc), _OPTIONS)
                             if self._tls else aio.insecure_channel(self._target, _OPTIONS))
            self._stub = self._pb_grpc.GRPCInferenceServiceStub(self._channel)
        return self._stub

    async def _call(self, rpc: str, request, metadata=None, headers: list | None = None):
        try:
            call = getattr(self._stub_now(), rpc)(
                request, metadata=metadata if metadata is not None else list(self._auth), timeout=self._timeout
            )
            resp = await call
            if headers is not None:
                headers.extend([*((await call.initial_metadata()) or ()), *((await call.trailing_metadata()) or ())])
            return resp
        except self._grpc.RpcError as exc:
            raise self._error(exc) from exc

    async def infer(self, model: str, inputs: Inputs, version: str | None = None, key: str | None = None,
                    request_id: str | None = None, outputs: Outputs = None,
                    parameters: Mapping[str, Any] | None = None, metadata: Metadata = None) -> InferResult:
        """As GrpcClient.infer."""
        named = inputs if isinstance(inputs, Mapping) else None
        if named is None:
            cache = (model, version or "")
            if cache not in self._input_names:
                req = self._pb.ModelMetadataRequest(name=model, version=version or "")
                meta = await self._call("ModelMetadata", req)
                self._input_names[cache] = _only_input(model, meta)
            named = {self._input_names[cache]: inputs}
        req = _build_request(self._pb, model, version, named, request_id, outputs, parameters)
        headers: list = []
        try:
            resp = await self._call("ModelInfer", req, self._metadata(key, request_id, metadata), headers)
        except ClientError:
            if not isinstance(inputs, Mapping):
                self._input_names.pop((model, version or ""), None)
            raise
        return _to_result(self._codec, resp, headers)

    async def feedback(self, model: str, request_id: str, reward: float) -> Any:
        """As GrpcClient.feedback."""
        if self._http_url is None:
            raise self._no_feedback()
        if self._http is None:
            from flywheel.client._aio_http import AsyncClient

            t = self._tls_files
            self._http = AsyncClient(self._http_url, self._api_key, self._timeout, ca_file=t.ca_file,
                                cert_file=t.cert_file, key_file=t.key_file)
        return await self._http.feedback(model, request_id, reward)

    async def live(self) -> bool:
        return (await self._call("ServerLive", self._pb.ServerLiveRequest())).live

    async def ready(self) -> bool:
        return (await self._call("ServerReady", self._pb.ServerReadyRequest())).ready

    async def model_ready(self, name: str, version: str | None = None) -> bool:
        try:
            return (await self._call("ModelReady", self._pb.ModelReadyRequest(name=name, version=version or ""))).ready
        except ClientError as exc:
            if exc.status in _NOT_THERE:
                return False
            raise

    async def metadata(self, name: str | None = None, version: str | None = None) -> dict:
        if name is None:
            r = await self._call("ServerMetadata", self._pb.ServerMetadataRequest())
            return {"name": r.name, "version": r.version, "extensions": list(r.extensions)}
        req = self._pb.ModelMetadataRequest(name=name, version=version or "")
        return _model_meta(await self._call("ModelMetadata", req))

    async def close(self) -> None:
        """Close the channel (and the feedback HTTP client)."""
        if self._channel is not None:
            await self._channel.close()
        if self._http is not None:
            await self._http.close()

    async def __aenter__(self) -> AsyncGrpcClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
