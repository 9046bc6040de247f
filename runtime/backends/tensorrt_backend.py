"""TensorRT backend (``backend: tensorrt``): an ONNX model compiled into a
TensorRT engine for this GPU.

``load()`` builds the engine with tensorrt_plan.py, or reuses a plan it
built before from the plan cache (keyed by :func:`engine_cache_key`).
``infer()`` copies inputs to the GPU with CuPy, runs the engine on a CUDA
stream and copies outputs back. The settings are the model config's
``tensorrt:`` (:class:`TensorRTConfig`), and a replica that loads this
backend asks Ray for a GPU.

TensorRT (10.x) and CuPy are imported inside functions: importing this module
never needs them, and without them (or without a GPU) ``load()`` raises
:class:`UnavailableError` with an install hint.

Only plans this backend built itself are deserialized (a plan is machine code
for one GPU model and one TensorRT version, so it is never an artifact to
ship), and TensorRT is told not to run host code embedded in a plan.
"""

from __future__ import annotations

import logging
import os
import queue
from typing import Any

import numpy as np

from flywheel.protocol.datatypes import numpy_dtype
from flywheel.protocol.errors import ConfigError, FlywheelError, InvalidInputError
from flywheel.runtime.backends.base import Backend, refuse_pickle
from flywheel.runtime.backends.registry import BackendSpec, ConfigField
from flywheel.runtime.backends.tensorrt_plan import (
    TensorRTConfig,
    build_plan,
    engine_cache_key,
    file_sha256,
    gpu_identity,
    import_gpu_stack,
    v2_datatype_of,
    write_atomically,
)
from flywheel.runtime.signature import Signature, TensorSpec

__all__ = ["SPEC", "TensorRTBackend", "TensorRTConfig"]

log = logging.getLogger(__name__)


class _Slot:
    """One execution context and its stream: a context runs one call at a time."""

    __slots__ = ("context", "stream")

    def __init__(self, context: Any, stream: Any) -> None:
        self.context = context
        self.stream = stream


class TensorRTBackend(Backend):
    """An ONNX model run as a TensorRT engine on one GPU.

    INT8: both routes are supported, chosen by the config. ``qdq: true`` takes
    an ONNX model that already holds Q/DQ nodes (explicit quantization), the
    route TensorRT recommends since 10.1 because the scales come from the
    training side (QAT, ModelOpt) and survive conversion exactly.
    ``calibration`` takes a plain FP32 export and .npy rows and lets TensorRT's
    entropy calibrator choose scales (implicit quantization): no retraining or
    extra tooling, but deprecated since TensorRT 10.1, so the Q/DQ route is the
    one to move to. Both fall back to FP16, not FP32, where a layer has no INT8
    kernel.

    Thread-safety: ``infer`` may be called from several threads at once; each
    concurrent call gets its own execution context and CUDA stream (created
    on first need and then reused).
    """

    platform = "tensorrt_plan"

    def __init__(self, path: str, config: TensorRTConfig | None = None) -> None:
        if not os.path.isfile(path):
            raise ConfigError(f"model file {path!r} does not exist")
        cfg = config or TensorRTConfig()
        if cfg.calibration and not os.path.isfile(cfg.calibration):
            raise ConfigError(f"tensorrt.calibration file {cfg.calibration!r} does not exist")
        self._path = path
        self._cfg = cfg
        self._signature: Signature | None = None
        self._engine: Any = None
        self._slots: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        self._dtypes: dict[str, np.dtype] = {}
        self._batch_range: tuple[int, int] | None = None
        self.cache_path = ""  # the plan file, once loaded
        self.built = False  # whether load() built the plan (False: reused from the cache)

    @property
    def cache_dir(self) -> str:
        return self._cfg.cache_dir or os.path.join(
            os.path.dirname(os.path.abspath(self._path)), ".tensorrt-cache"
        )

    def load(self) -> None:
        """Build the engine or load it from the plan cache. Raises
        UnavailableError without TensorRT / CuPy / a GPU, ConfigError for a
        model or setting TensorRT cannot build, IntegrityError for a pickle."""
        refuse_pickle(self._path)
        trt, cupy = import_gpu_stack()
        cfg = self._cfg
        count = cupy.cuda.runtime.getDeviceCount()
        if cfg.device >= count:
            raise ConfigError(f"tensorrt.device {cfg.device}: this host has {count} CUDA device(s)")
        with cupy.cuda.Device(cfg.device):
            gpu, capability = gpu_identity(cupy, cfg.device)
            key = engine_cache_key(
                file_sha256(self._path), gpu, capability, trt.__version__, cfg.precision, cfg.profile,
                calibration_sha256=file_sha256(cfg.calibration) if cfg.calibration else "",
            )
            plan_path = os.path.join(self.cache_dir, f"{key}.plan")
            logger = trt.Logger(trt.Logger.WARNING)
            runtime = trt.Runtime(logger)
            runtime.engine_host_code_allowed = False  # the default; never trust code in a plan
            engine = None
            if os.path.isfile(plan_path):
                with open(plan_path, "rb") as f:
                    engine = runtime.deserialize_cuda_engine(f.read())
                if engine is None:
                    log.warning("cached TensorRT plan %s could not be loaded; rebuilding it", plan_path)
            if engine is None:
                log.info("building a TensorRT %s engine for %s on %s (sm %s)", cfg.precision, self._path,
                         gpu, capability)
                plan = build_plan(trt, cupy, logger, self._path, cfg)
                self.built = True
                try:
                    write_atomically(plan_path, plan)
                except OSError as exc:  # a read-only model folder: serve, just without a cache
                    log.warning("cannot cache the TensorRT plan at %s (%s); it will be rebuilt next load",
                                plan_path, exc)
                engine = runtime.deserialize_cuda_engine(plan)
                if engine is None:
                    raise FlywheelError(f"TensorRT built a plan for {self._path} but cannot load it")
        # the engine needs its runtime and logger alive as long as it lives
        self._trt, self._cupy, self._logger, self._runtime = trt, cupy, logger, runtime
        self._engine = engine
        self.cache_path = plan_path
        self._read_io(trt, engine)

    def _read_io(self, trt: Any, engine: Any) -> None:
        inputs, outputs = [], []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            spec = TensorSpec(
                name,
                v2_datatype_of(engine.get_tensor_dtype(name), name),
                tuple(int(d) for d in engine.get_tensor_shape(name)),
            )
            self._dtypes[name] = numpy_dtype(spec.datatype)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                inputs.append(spec)
            else:
                outputs.append(spec)
        self._signature = Signature(inputs=tuple(inputs), outputs=tuple(outputs))
        if self._signature.batchable:
            lo, _, hi = engine.get_tensor_profile_shape(inputs[0].name, 0)
            self._batch_range = (int(lo[0]), int(hi[0]))

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._engine is None:
            raise RuntimeError("call load() first")
        with self._cupy.cuda.Device(self._cfg.device):  # the current device is per thread
            slot = self._acquire()
            try:
                return self._infer_rows(slot, inputs)
            finally:
                self._slots.put(slot)

    def _acquire(self) -> _Slot:
        try:
            return self._slots.get_nowait()
        except queue.Empty:
            context = self._engine.create_execution_context()
            if context is None:
                raise FlywheelError("TensorRT could not create an execution context (GPU memory?)") from None
            return _Slot(context, self._cupy.cuda.Stream(non_blocking=True))

    def _infer_rows(self, slot: _Slot, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Fit the call to the engine's batch range: slices of at most
        max_batch rows, and a short call padded up to min_batch."""
        if self._batch_range is None:
            return self._run(slot, inputs)
        lo, hi = self._batch_range
        rows = next(iter(inputs.values())).shape[0]
        if lo <= rows <= hi:
            return self._run(slot, inputs)
        if rows > hi:
            parts = [
                self._infer_rows(slot, {n: a[start : start + hi] for n, a in inputs.items()})
                for start in range(0, rows, hi)
            ]
            return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        padded = {
            n: np.concatenate([a, np.zeros((lo - rows, *a.shape[1:]), a.dtype)]) for n, a in inputs.items()
        }
        return {n: a[:rows] for n, a in self._run(slot, padded).items()}

    def _run(self, slot: _Slot, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cupy, context, stream = self._cupy, slot.context, slot.stream
        device_arrays = []  # referenced until the stream is done with them
        with stream:  # CuPy copies and allocations go to this call's stream
            for spec in self._signature.inputs:
                host = np.ascontiguousarray(inputs[spec.name], dtype=self._dtypes[spec.name])
                if not context.set_input_shape(spec.name, host.shape):
                    raise InvalidInputError(
                        f"input {spec.name!r}: shape {list(host.shape)} is outside the engine's profile "
                        f"(batch {self._batch_range}, signature {list(spec.shape)})"
                    )
                dev = cupy.asarray(host)
                device_arrays.append(dev)
                context.set_tensor_address(spec.name, dev.data.ptr)
            outputs = {}
            for spec in self._signature.outputs:
                shape = tuple(int(d) for d in context.get_tensor_shape(spec.name))
                if any(d < 0 for d in shape):
                    raise FlywheelError(
                        f"output {spec.name!r} has a data-dependent shape, which the tensorrt backend "
                        "does not support"
                    )
                dev = cupy.empty(shape, dtype=self._dtypes[spec.name])
                outputs[spec.name] = dev
                context.set_tensor_address(spec.name, dev.data.ptr)
            if not context.execute_async_v3(stream.ptr):
                raise FlywheelError("TensorRT failed to enqueue the engine (see its log)")
            result = {name: dev.get(stream=stream) for name, dev in outputs.items()}
        stream.synchronize()
        del device_arrays
        return result


def _create(path: str, model) -> TensorRTBackend:
    return TensorRTBackend(path, model.tensorrt)


def _validate(model) -> None:
    if model.tensorrt.max_batch < model.batching.max_batch_size:
        raise ConfigError(
            f"tensorrt.max_batch {model.tensorrt.max_batch} is smaller than batching.max_batch_size "
            f"{model.batching.max_batch_size}; every full batch would run in slices. Raise "
            "tensorrt.max_batch or lower batching.max_batch_size"
        )


SPEC = BackendSpec(
    name="tensorrt",
    create=_create,
    summary="an .onnx file compiled into a TensorRT engine on the replica's GPU",
    fields=(ConfigField("tensorrt", TensorRTConfig, TensorRTConfig()),),
    validate=_validate,
    gpus=1,
)
