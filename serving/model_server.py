"""One loaded model version and its request handling, with no transport.

A ModelServer decodes, validates, batches, runs and encodes V2 infer calls.
Two hosts use it: a dedicated :class:`~flywheel.serving.replica.ModelReplica`
(its own Serve deployment, reached over the loopback frame protocol) and the
ingress itself for colocated models, which call :meth:`ModelServer.handle`
in-process: no socket, no copy, no second process on the request path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import msgspec
import numpy as np

from flywheel.runtime.backends import Backend, get_backend
from flywheel.runtime.backends.pipeline import PipelineBackend
from flywheel.runtime.backends.steps import StepsBackend
from flywheel.runtime.batcher import DynamicBatcher
from flywheel.protocol.codec import DecodedRequest, decode_infer_request, encode_response, select_outputs
from flywheel.protocol.errors import ConfigError, ErrorCode, FlywheelError, InvalidInputError
from flywheel.runtime.signature import validate_inputs
from flywheel.serving._private.drift_sampler import DriftSampler
from flywheel.serving._private.live_endpoint import new_request_id
from flywheel.serving._private.execution import Execution, choose_execution
from flywheel.serving._private.tracing import MODEL_TIMES
from flywheel.protocol.grpc_codec import decode_grpc_request, encode_grpc_response
from flywheel.serving._private.wire import OP_INFER, OP_INFER_GRPC, OP_METADATA, Call, Reply, Stats
from flywheel.serving.capture import CaptureWriter
from flywheel.serving.config import ModelConfig, RegistryConfig, RequestLimits

log = logging.getLogger(__name__)


def model_file(model: ModelConfig, registry: RegistryConfig | None) -> str:
    """The local file to load: ``path``, or the registry artifact behind
    ``ref`` after checking its sha256 (a damaged artifact is refused here);
    for a backend that loads a folder (BackendSpec.folder), a folder holding
    every artifact of the version, each checked."""
    if not model.ref:
        return model.path
    from flywheel.registry import Registry

    if registry is None or not registry.uri:
        raise ConfigError(f"model {model.name!r}: ref {model.ref!r} needs a registry location")
    reg = Registry.open(registry.uri, registry.artifacts)
    try:
        if get_backend(model.backend).folder:
            return reg.version_folder(model.ref)[1]
        return reg.artifact_path(model.ref, model.artifact)[1]
    finally:
        reg.close()


def make_backend(model: ModelConfig, registry: RegistryConfig | None = None) -> Backend:
    """The backend a model config asks for (not yet loaded), made by its
    registry spec (runtime/backends/); a ``pipeline`` is its stages' backends
    chained, and ``preprocess`` / ``postprocess`` steps wrap the model's
    backend, so that the server sees one backend with the outer signature."""
    if model.pipeline:
        stages = [(m.name, make_backend(m, registry)) for m in model.stage_models()]
        return PipelineBackend(model.name, stages)
    path = model_file(model, registry)
    backend = get_backend(model.backend).create(path, model)
    if model.preprocess is None and model.postprocess is None:
        return backend
    return StepsBackend(backend, name=model.name, version=model.version, folder=_step_folder(model, registry, path),
                        preprocess=model.preprocess, postprocess=model.postprocess)


def _step_folder(model: ModelConfig, registry: RegistryConfig | None, path: str) -> str:
    """Where a model's steps find their modules and files: the model's
    folder, or for a registry ``ref`` every artifact of the version."""
    if os.path.isdir(path):
        return path
    if not model.ref:
        return os.path.dirname(os.path.abspath(path))
    from flywheel.registry import Registry

    reg = Registry.open(registry.uri, registry.artifacts)
    try:
        return reg.version_folder(model.ref)[1]
    finally:
        reg.close()


def model_metadata(model: ModelConfig, backend: Backend, execution: Execution | None = None) -> dict:
    sig = backend.signature
    tensor = lambda t: {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}  # noqa: E731
    doc = {
        "name": model.name,
        "versions": [model.version],
        "platform": backend.platform,
        "inputs": [tensor(t) for t in sig.inputs],
        "outputs": [tensor(t) for t in sig.outputs],
    }
    if execution is not None:  # how this replica runs it (an extension, as KServe's parameters)
        doc["parameters"] = execution.parameters()
    return doc


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


class ModelServer:
    """Construct (loads and warms the model: blocking), then :meth:`start` on
    the event loop that will call :meth:`handle`; :meth:`close` on that loop.

    ``capture``: the model's CaptureWriter (serving/capture.py), None without
    ``capture:``; the feedback route writes labels through it and the
    metrics read its counters. A captured request's answer names its id (the
    caller's, else a new one), which labels name."""

    def __init__(
        self,
        model: ModelConfig,
        limits: RequestLimits,
        registry: RegistryConfig | None = None,
        drift_port: int = 0,
        *,
        secret: bytes | None = None,
        drift_app: str = "",
    ) -> None:
        """``secret``: the deployment's, proven on the connection to the
        drift monitor (see serving/_private/wire.py). ``drift_app``: the
        monitor's Serve application, through which a replica on another
        node reaches it ("" = loopback only)."""
        if not model.version:
            model = msgspec.structs.replace(model, version="1")
        self.model = model
        self._limits = limits
        self._drift_port = drift_port
        self._drift_app = drift_app
        self._secret = secret
        self._max_elements = limits.max_tensor_elements
        self._timeout_s = limits.request_timeout_ms / 1000 if limits.request_timeout_ms else None
        self._backend = make_backend(model, registry)
        self._backend.load()
        self._signature = self._backend.signature
        self._batchable = self._signature.batchable
        self._backend.warmup(model.warmup_batch_sizes if self._batchable else (1,))
        self.execution = choose_execution(self._backend, model.batching, self._batchable)
        log.info("model %s:%s %s", model.name, model.version, self.execution.describe())
        self.metadata = msgspec.json.encode(model_metadata(model, self._backend, self.execution))
        self._executor = ThreadPoolExecutor(
            model.batching.max_concurrent_batches, thread_name_prefix=f"flywheel-{model.name}"
        )
        self._sampler: DriftSampler | None = None
        # made here, so that a capture without pyarrow fails the start
        self.capture = CaptureWriter(model.capture, model.name, model.version) if model.capture else None
        self._batcher: DynamicBatcher | None = None
        self._closed = False

    async def start(self) -> None:
        model = self.model
        if model.drift.enabled and self._drift_port:
            self._sampler = DriftSampler(model.drift, model.name, model.version, self._drift_port,
                                         track=msgspec.json.encode(model), secret=self._secret, app=self._drift_app)
            self._sampler.start()
        if self.capture is not None:
            self.capture.start()
        batching = model.batching
        if not self._batchable:  # no batch axis: one request per call
            batching = msgspec.structs.replace(batching, max_batch_size=1)
        executor = None if self.execution.inline else self._executor
        self._batcher = DynamicBatcher(self._backend.infer, batching, executor=executor,
                                       merge=self._backend.merges_requests)

    async def handle(self, call: Call) -> Reply:
        """Answer one call; never raises (errors become coded replies)."""
        if call.op == OP_INFER or call.op == OP_INFER_GRPC:
            return await self._infer(call)
        if call.op == OP_METADATA:
            return Reply(0, self.metadata)
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
        name, version = self.model.name, self.model.version
        batcher, capture = self._batcher, self.capture
        # set by a traced request's data plane in this process (tracing.py);
        # None otherwise, and then no clock is read here
        times = MODEL_TIMES.get()
        try:
            if times is not None:
                times.decode_start = time.time_ns()
            req = self._decode(call)
            arrays = validate_inputs(self._signature, req.inputs)
            check_limits(arrays, self._batchable, self._limits)
            if times is not None:
                times.decode_end = time.time_ns()
            if self._sampler is not None:
                self._sampler.offer(arrays)
            rid = req.id
            take = capture is not None and capture.sampled()
            if take and not rid:
                # the id labels name: the response carries it (its ``id``);
                # a request left out of the capture has nothing to label
                rid = new_request_id()
            result = await batcher.submit(arrays, timeout_s=timeout)
            if take:
                self._capture(rid, arrays, result.outputs)
            if times is not None:
                times.encode_start = time.time_ns()
            outputs = select_outputs(result.outputs, req.outputs)
            if call.op == OP_INFER_GRPC:
                body, aux = encode_grpc_response(name, version, outputs, rid), 0
            else:
                binary = req.binary_outputs(list(outputs))
                body, aux = encode_response(name, version, outputs, rid, binary)
            if times is not None:
                times.encode_end = time.time_ns()
        except FlywheelError as exc:
            return Reply(int(exc.code), exc.message.encode(), Stats(queue_depth=batcher.queue_depth))
        except Exception as exc:  # a model bug: report it, keep serving
            log.exception("inference failed in %s:%s", name, version)
            return Reply(int(ErrorCode.INTERNAL), f"model error: {exc!r}".encode())
        stats = Stats(
            int(result.queue_s * 1e6), int(result.compute_s * 1e6), result.batch_rows,
            batcher.queue_depth, result.leader,
        )
        return Reply(0, body, stats, aux)

    def _capture(self, rid: str, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """Hand copies of one request's rows to the capture writer (copies:
        the arrays may view the request's buffer or the batch's output).
        A tensor without the request's row axis is captured as one row."""
        try:
            ins = {k: a.copy() for k, a in inputs.items()}
            outs = {k: a.copy() for k, a in outputs.items()}
            n = len(next(iter(ins.values()))) if self._batchable else 0
            if not n or not all(a.ndim and len(a) == n for d in (ins, outs) for a in d.values()):
                ins, outs, n = {k: a[None] for k, a in ins.items()}, {k: a[None] for k, a in outs.items()}, 1
            self.capture.offer(rid, ins, outs, n)
        except Exception:  # noqa: BLE001 - capture never fails a request
            log.warning("capture of a request to %s:%s failed", self.model.name, self.model.version, exc_info=True)

    async def close(self) -> None:
        """Let accepted requests finish, then stop the sampler, the capture
        writer (queued rows written, its open file finished) and threads.
        Safe to call twice (a variant removed at run time, then the ingress)."""
        if self._closed:
            return
        self._closed = True
        if self._batcher is not None:
            await self._batcher.close()
        if self._sampler is not None:
            self._sampler.close()
        if self.capture is not None:  # finishes the open file (blocking I/O: off the loop)
            await asyncio.get_running_loop().run_in_executor(None, self.capture.close)
        self._executor.shutdown(wait=False)
        # a user model's close() may block: off the loop too
        await asyncio.get_running_loop().run_in_executor(None, self._backend.close)
