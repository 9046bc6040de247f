"""A model replica: one (model, version) with its backend and batcher.

Ray Serve places, health-checks, restarts and rolls these replicas; the request
path does not go through Serve. Each replica runs the internal frame server
(``_private/wire.py``) on its own uvloop thread. All replicas of a deployment
bind the same loopback port with SO_REUSEPORT, so the kernel spreads the
ingress's connections among them and a restarted replica simply joins in.
The port is bound last, after the model is loaded and warmed up: a replica
that accepts connections is ready.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import msgspec
import numpy as np

from flywheel.runtime.backend import Backend
from flywheel.runtime.batcher import DynamicBatcher
from flywheel.runtime.codec import DecodedRequest, decode_infer_request, encode_response, select_outputs
from flywheel.runtime.errors import ConfigError, ErrorCode, FlywheelError, InvalidInputError
from flywheel.runtime.onnx_backend import OnnxRuntimeBackend
from flywheel.runtime.signature import validate_inputs
from flywheel.runtime.torch_backend import TorchBackend
from flywheel.serving._private.drift_sampler import DriftSampler
from flywheel.serving._private.grpc_codec import decode_grpc_request, encode_grpc_response
from flywheel.serving._private.loop_thread import LoopThread
from flywheel.serving._private.wire import (
    OP_INFER,
    OP_INFER_GRPC,
    OP_METADATA,
    Call,
    Reply,
    Stats,
    start_frame_server,
)
from flywheel.serving.config import ModelConfig, RegistryConfig, RequestLimits

log = logging.getLogger(__name__)

# A loop that has not beaten for this long is stuck: fail the health check
# so that Serve replaces the replica.
STALL_LIMIT_S = 10.0


def model_file(model: ModelConfig, registry: RegistryConfig | None) -> str:
    """The local file to load: ``path``, or the registry artifact behind
    ``ref`` after checking its sha256 (a damaged artifact is refused here)."""
    if not model.ref:
        return model.path
    from flywheel.registry import Registry

    if registry is None or not registry.uri:
        raise ConfigError(f"model {model.name!r}: ref {model.ref!r} needs a registry location")
    reg = Registry.open(registry.uri, registry.artifacts)
    try:
        return reg.artifact_path(model.ref, model.artifact)[1]
    finally:
        reg.close()


def make_backend(model: ModelConfig, registry: RegistryConfig | None = None) -> Backend:
    """The backend a model config asks for (not yet loaded)."""
    path = model_file(model, registry)
    if model.backend == "torch":
        return TorchBackend(path, model.architecture, model.hparams)
    return OnnxRuntimeBackend(path, model.onnxruntime)


def model_metadata(model: ModelConfig, backend: Backend) -> dict:
    sig = backend.signature
    tensor = lambda t: {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}  # noqa: E731
    return {
        "name": model.name,
        "versions": [model.version],
        "platform": backend.platform,
        "inputs": [tensor(t) for t in sig.inputs],
        "outputs": [tensor(t) for t in sig.outputs],
    }


def check_limits(arrays: dict[str, np.ndarray], batchable: bool, limits: RequestLimits) -> None:
    """Rows and BYTES element sizes within the server's limits (400 if not)."""
    for name, arr in arrays.items():
        if batchable:
            if arr.shape[0] == 0:
                raise InvalidInputError("the batch dimension (first dim) must be >= 1")
            if arr.shape[0] > limits.max_batch_rows:
                raise InvalidInputError(
                    f"input {name!r} has {arr.shape[0]} rows, more than server.max_batch_rows "
                    f"{limits.max_batch_rows}"
                )
        if arr.dtype == object and arr.size:
            longest = max(len(v) for v in arr.flat)
            if longest > limits.max_bytes_element:
                raise InvalidInputError(
                    f"input {name!r} has a BYTES element of {longest} bytes, more than "
                    f"server.max_bytes_element {limits.max_bytes_element}"
                )


class ModelReplica:
    """Serve deployment class for one model version (see module docstring)."""

    def __init__(
        self,
        model: ModelConfig,
        port: int,
        limits: RequestLimits,
        registry: RegistryConfig | None = None,
        drift_port: int = 0,
    ):
        if not model.version:
            model = msgspec.structs.replace(model, version="1")
        self._model = model
        self._limits = limits
        self._max_elements = limits.max_tensor_elements
        self._timeout_s = limits.request_timeout_ms / 1000 if limits.request_timeout_ms else None
        self._backend = make_backend(model, registry)
        self._backend.load()
        self._signature = self._backend.signature
        if self._signature.batchable:
            self._backend.warmup(model.warmup_batch_sizes)
        else:
            self._backend.warmup((1,))
        self._metadata = msgspec.json.encode(model_metadata(model, self._backend))
        self._executor = ThreadPoolExecutor(
            model.batching.max_concurrent_batches, thread_name_prefix=f"flywheel-{model.name}"
        )
        self._loop = LoopThread(f"flywheel-replica-{model.name}")
        self._loop.start()
        self._loop.call(self._start(port, drift_port))
        log.info("replica of %s:%s serving on 127.0.0.1:%d", model.name, model.version, port)

    async def _start(self, port: int, drift_port: int) -> None:
        self._sampler = None
        if self._model.drift.enabled and drift_port:
            self._sampler = DriftSampler(self._model.drift, self._model.name, self._model.version, drift_port)
            self._sampler.start()
        batching = self._model.batching
        if not self._signature.batchable:  # no batch axis: one request per call
            batching = msgspec.structs.replace(batching, max_batch_size=1)
        executor = None if batching.inline else self._executor
        self._batcher = DynamicBatcher(self._backend.infer, batching, executor=executor)
        self._server = await start_frame_server(self._handle, "127.0.0.1", port)

    async def _handle(self, call: Call) -> Reply:
        if call.op == OP_INFER or call.op == OP_INFER_GRPC:
            return await self._infer(call)
        if call.op == OP_METADATA:
            return Reply(0, self._metadata)
        return Reply(int(ErrorCode.INVALID_ARGUMENT), f"unknown operation {call.op}".encode())

    def _decode(self, call: Call) -> DecodedRequest:
        if call.op == OP_INFER_GRPC:
            return decode_grpc_request(call.payload, max_elements=self._max_elements)
        return decode_infer_request(
            call.payload, max_elements=self._max_elements, header_length=call.aux or None
        )

    async def _infer(self, call: Call) -> Reply:
        timeout = self._timeout_s
        if call.timeout_ms:
            timeout = min(timeout or float("inf"), call.timeout_ms / 1000)
        name, version = self._model.name, self._model.version
        try:
            req = self._decode(call)
            arrays = validate_inputs(self._signature, req.inputs)
            check_limits(arrays, self._signature.batchable, self._limits)
            if self._sampler is not None:
                self._sampler.offer(arrays)
            result = await self._batcher.submit(arrays, timeout_s=timeout)
            outputs = select_outputs(result.outputs, req.outputs)
            if call.op == OP_INFER_GRPC:
                body, aux = encode_grpc_response(name, version, outputs, req.id), 0
            else:
                binary = req.binary_outputs(list(outputs))
                body, aux = encode_response(name, version, outputs, req.id, binary)
        except FlywheelError as exc:
            return Reply(int(exc.code), exc.message.encode(), Stats(queue_depth=self._batcher.queue_depth))
        except Exception as exc:  # a model bug: report it, keep serving
            log.exception("inference failed in %s:%s", name, version)
            return Reply(int(ErrorCode.INTERNAL), f"model error: {exc!r}".encode())
        stats = Stats(
            int(result.queue_s * 1e6), int(result.compute_s * 1e6), result.batch_rows,
            self._batcher.queue_depth, result.leader,
        )
        return Reply(0, body, stats, aux)

    def check_health(self) -> None:
        """Serve's health probe: fail if our own loop has stopped beating."""
        stalled = self._loop.stalled_for()
        if stalled > STALL_LIMIT_S:
            raise RuntimeError(f"request loop stalled for {stalled:.1f}s")

    def __del__(self) -> None:
        # Ray Serve calls __del__ on graceful shutdown.
        self.close()

    def close(self) -> None:
        """Stop serving and release the port; safe to call more than once."""
        loop, self._loop = getattr(self, "_loop", None), None
        if loop is None:
            return

        async def _stop() -> None:
            # Stop accepting connections, let accepted requests finish.
            self._server.close()
            await self._batcher.close()
            if self._sampler is not None:
                self._sampler.close()

        loop.shutdown(_stop)
        self._executor.shutdown(wait=False)
