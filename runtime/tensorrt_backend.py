"""TensorRT backend: an ONNX model compiled into a TensorRT engine for this GPU.

``load()`` parses the ONNX file with TensorRT's ONNX parser and builds an
engine with one optimization profile over the batch range (FP16 by default;
FP32, or INT8 from calibration rows or from a Q/DQ model), or reuses a plan
it built before: plans are cached on disk under :func:`engine_cache_key`,
which covers everything that makes a plan valid. ``infer()`` copies inputs to
the GPU with CuPy, runs the engine on a CUDA stream and copies outputs back.

TensorRT (10.x) and CuPy are imported inside functions: importing this module
never needs them, and without them (or without a GPU) ``load()`` raises
:class:`UnavailableError` with an install hint.

Only plans this backend built itself are deserialized (a plan is machine code
for one GPU model and one TensorRT version, so it is never an artifact to
ship), and TensorRT is told not to run host code embedded in a plan.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import tempfile
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np

from flywheel.runtime.backend import Backend, refuse_pickle
from flywheel.protocol.datatypes import numpy_dtype
from flywheel.protocol.errors import ConfigError, FlywheelError, InvalidInputError, UnavailableError
from flywheel.runtime.signature import Signature, TensorSpec

log = logging.getLogger(__name__)

PRECISIONS = ("fp16", "fp32", "int8")
INSTALL_HINT = (
    "install TensorRT 10 and CuPy for the host's CUDA on a machine with an NVIDIA GPU "
    "(pip install 'flywheel-ml[gpu]' for CUDA 12; tensorrt-cu13 and cupy-cuda13x for CUDA 13)"
)
# Bump when the build recipe below changes, so that plans built the old way
# are not reused.
_KEY_FORMAT = 1
# TensorRT DataType member names -> V2 datatypes (by name, so that this table
# needs no tensorrt import). BF16, FP8, INT4 have no V2 / NumPy equivalent.
_TRT_TO_V2 = {
    "FLOAT": "FP32",
    "HALF": "FP16",
    "INT8": "INT8",
    "INT32": "INT32",
    "INT64": "INT64",
    "BOOL": "BOOL",
    "UINT8": "UINT8",
}
_QDQ_OPS = frozenset(("QuantizeLinear", "DequantizeLinear"))


class TensorRTConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """TensorRT engine settings for one model (``tensorrt:`` in a model config).

    precision: ``fp16`` (FP16 kernels wherever TensorRT finds them faster,
        FP32 elsewhere), ``fp32`` (IEEE FP32: TF32 off) or ``int8`` (INT8 with
        FP16 fallback; needs ``calibration`` or ``qdq``).
    min_batch / opt_batch / max_batch: the optimization profile of the batch
        (first) dimension: the engine takes min..max rows and its kernels are
        tuned for opt. A call with more rows runs in max_batch slices, one
        with fewer than min_batch is padded.
    workspace_mib: scratch GPU memory TensorRT may use per layer, in MiB
        (more lets it consider more kernels).
    cache_dir: folder of built plans; empty = ``.tensorrt-cache`` beside the
        model file. A plan is reused only if the ONNX file, GPU model, compute
        capability, TensorRT version, precision, batch profile and calibration
        data all match (workspace_mib is not part of the key: empty the folder
        to rebuild with another). Must be writable by the server only.
    calibration: for int8: a .npy of representative input rows (shape
        ``[rows, ...]`` of the model's single input, at least opt_batch rows),
        fed to TensorRT's entropy calibrator (IInt8EntropyCalibrator2).
    qdq: for int8: the ONNX model is already quantized (QuantizeLinear /
        DequantizeLinear nodes carry the scales, e.g. from quantization-aware
        training or NVIDIA ModelOpt); TensorRT uses those scales and takes no
        calibration file.
    device: CUDA device ordinal.
    """

    precision: str = "fp16"
    min_batch: int = 1
    opt_batch: int = 16
    max_batch: int = 32
    workspace_mib: int = 1024
    cache_dir: str = ""
    calibration: str = ""
    qdq: bool = False
    device: int = 0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"tensorrt.precision {self.precision!r} unknown; allowed: {', '.join(PRECISIONS)}"
            )
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ConfigError(
                f"tensorrt.min_batch {self.min_batch}, opt_batch {self.opt_batch}, max_batch "
                f"{self.max_batch} must satisfy 1 <= min_batch <= opt_batch <= max_batch"
            )
        if self.workspace_mib < 1:
            raise ConfigError(f"tensorrt.workspace_mib {self.workspace_mib} must be >= 1")
        if self.device < 0:
            raise ConfigError(f"tensorrt.device {self.device} must be >= 0")
        if self.calibration and not self.calibration.endswith(".npy"):
            raise ConfigError(
                f"tensorrt.calibration {self.calibration!r} must be a .npy file of input rows"
            )
        if self.precision == "int8":
            if self.qdq and self.calibration:
                raise ConfigError(
                    "tensorrt.calibration must be empty with tensorrt.qdq: true (a Q/DQ model "
                    "carries its own scales; TensorRT does not calibrate it)"
                )
            if not self.qdq and not self.calibration:
                raise ConfigError(
                    "tensorrt.calibration is required for precision int8: a .npy of "
                    "representative input rows (or set tensorrt.qdq: true for a Q/DQ-quantized model)"
                )
        elif self.calibration or self.qdq:
            field = "calibration" if self.calibration else "qdq"
            raise ConfigError(
                f"tensorrt.{field} applies to precision int8 only (precision is {self.precision!r})"
            )

    @property
    def profile(self) -> tuple[int, int, int]:
        return (self.min_batch, self.opt_batch, self.max_batch)


def engine_cache_key(
    onnx_sha256: str,
    gpu_name: str,
    compute_capability: str,
    trt_version: str,
    precision: str,
    profile: Sequence[int],
    *,
    calibration_sha256: str = "",
) -> str:
    """The cache key of a plan, a 64-digit hex string.

    A plan is valid only for the model bytes (``onnx_sha256``), the GPU model
    and compute capability, the exact TensorRT version, the precision and the
    ``(min, opt, max)`` batch profile it was built with, and for INT8 the
    calibration data (``calibration_sha256``); any change gives another key.
    Deterministic and pure. Raises ConfigError for a profile that is not
    three batch sizes.
    """
    if len(profile) != 3:
        raise ConfigError(f"profile {list(profile)} must be (min, opt, max)")
    fields = {
        "format": _KEY_FORMAT,
        "onnx_sha256": onnx_sha256.lower(),
        "gpu": gpu_name,
        "compute_capability": str(compute_capability),
        "tensorrt": trt_version,
        "precision": precision,
        "profile": [int(n) for n in profile],
        "calibration_sha256": calibration_sha256.lower(),
    }
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def file_sha256(path: str) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomically(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the
    whole new one, never a part: a temporary file in the same folder, synced,
    then ``os.replace``. Several replicas building the same plan at once just
    replace each other's identical result."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".plan", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def onnx_has_qdq(path: str) -> bool:
    """Whether an ONNX model's main graph holds QuantizeLinear or
    DequantizeLinear nodes (an explicitly quantized model)."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    return any(node.op_type in _QDQ_OPS for node in graph.node)


def v2_datatype_of(trt_dtype: Any, tensor: str) -> str:
    """V2 datatype of a TensorRT ``DataType`` member; ConfigError for types
    with no V2 / NumPy equivalent (BF16, FP8, INT4)."""
    name = getattr(trt_dtype, "name", None) or str(trt_dtype).rsplit(".", 1)[-1]
    try:
        return _TRT_TO_V2[name]
    except KeyError:
        raise ConfigError(
            f"engine tensor {tensor!r} has TensorRT type {name}, which V2 cannot carry; keep the "
            "model's inputs and outputs in FP32/FP16/integer types"
        ) from None


def import_gpu_stack() -> tuple[Any, Any]:
    """``(tensorrt, cupy)``, or UnavailableError saying what is missing and
    how to install it: no TensorRT, TensorRT older than 10, no CuPy, no
    CUDA driver or no GPU."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise UnavailableError(
            f"backend tensorrt: TensorRT is not installed ({exc}); {INSTALL_HINT}"
        ) from None
    major = str(getattr(trt, "__version__", "0")).split(".")[0]
    if not major.isdigit() or int(major) < 10:
        raise UnavailableError(
            f"backend tensorrt needs TensorRT 10.x; found {getattr(trt, '__version__', '?')}. {INSTALL_HINT}"
        )
    try:
        import cupy
    except ImportError as exc:
        raise UnavailableError(f"backend tensorrt: CuPy is not installed ({exc}); {INSTALL_HINT}") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - no driver / no device: CuPy raises its own types
        raise UnavailableError(f"backend tensorrt: no usable CUDA GPU ({exc})") from None
    if count < 1:
        raise UnavailableError("backend tensorrt: no CUDA GPU is visible to this process")
    return trt, cupy


def tensorrt_available() -> bool:
    """True where TensorRT 10, CuPy and a CUDA GPU are all usable."""
    try:
        import_gpu_stack()
    except Exception:  # noqa: BLE001 - any failure means no
        return False
    return True


def _gpu_identity(cupy: Any, device: int) -> tuple[str, str]:
    props = cupy.cuda.runtime.getDeviceProperties(device)
    name = props["name"]
    name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
    return name.strip("\x00 "), f"{props['major']}.{props['minor']}"


def _calibration_rows(cfg: TensorRTConfig, network: Any) -> tuple[str, np.ndarray]:
    if network.num_inputs != 1:
        raise ConfigError(
            f"tensorrt.calibration takes rows of one input, but the model has {network.num_inputs}; "
            "quantize a multi-input model to Q/DQ and set tensorrt.qdq: true"
        )
    tensor = network.get_input(0)
    shape = tuple(int(d) for d in tensor.shape)
    try:
        rows = np.load(cfg.calibration, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"tensorrt.calibration {cfg.calibration!r}: not a readable .npy ({exc})") from None
    if rows.ndim != len(shape) or tuple(rows.shape[1:]) != shape[1:]:
        raise ConfigError(
            f"tensorrt.calibration {cfg.calibration!r} has shape {list(rows.shape)}; input "
            f"{tensor.name!r} needs [rows, {', '.join(map(str, shape[1:]))}]"
        )
    if rows.shape[0] < cfg.opt_batch:
        raise ConfigError(
            f"tensorrt.calibration {cfg.calibration!r} has {rows.shape[0]} rows; at least "
            f"tensorrt.opt_batch ({cfg.opt_batch}) are needed"
        )
    dtype = numpy_dtype(v2_datatype_of(tensor.dtype, tensor.name))
    return tensor.name, np.ascontiguousarray(rows, dtype=dtype)


def _make_calibrator(trt: Any, cupy: Any, rows: np.ndarray, batch: int) -> Any:
    """An IInt8EntropyCalibrator2 that hands TensorRT ``rows`` in batches of
    ``batch`` (the calibration profile's opt size; a partial last batch is
    dropped), from one device buffer."""

    class _RowsCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)  # pybind11 needs the base initialised
            self._starts = list(range(0, rows.shape[0] - batch + 1, batch))
            self._device = cupy.empty((batch, *rows.shape[1:]), dtype=rows.dtype)

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            if not self._starts:
                return None
            start = self._starts.pop(0)
            self._device.set(rows[start : start + batch])
            # TensorRT reads the buffer on its own stream: the copy must be done
            cupy.cuda.runtime.deviceSynchronize()
            return [int(self._device.data.ptr)]

        def read_calibration_cache(self) -> bytes | None:
            return None  # the engine cache already spares recalibration

        def write_calibration_cache(self, cache: Any) -> None:
            return None

    return _RowsCalibrator()


def build_plan(trt: Any, cupy: Any, logger: Any, path: str, cfg: TensorRTConfig) -> bytes:
    """Parse the ONNX file at ``path`` and build a serialized engine (plan)
    as ``cfg`` asks. Raises ConfigError for a model or setting TensorRT cannot
    build, FlywheelError if the build itself fails."""
    has_qdq = onnx_has_qdq(path)
    if cfg.qdq and not has_qdq:
        raise ConfigError(f"tensorrt.qdq is true, but {path} has no QuantizeLinear/DequantizeLinear nodes")
    if has_qdq and not cfg.qdq:
        raise ConfigError(
            f"{path} is quantized (it has Q/DQ nodes): set tensorrt.precision: int8 and tensorrt.qdq: true"
        )
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: always explicit batch; no flags needed
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(path):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ConfigError(f"TensorRT cannot parse {path}: {errors or 'unknown error'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_mib << 20)

    profile = None
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(int(d) for d in tensor.shape)
        if any(d < 0 for d in shape[1:]):
            raise ConfigError(
                f"input {tensor.name!r} has shape {list(shape)}: only the first (batch) dimension may "
                "vary for the tensorrt backend"
            )
        if shape and shape[0] < 0:
            if profile is None:  # not `profile or ...`: a profile's truth is its validity
                profile = builder.create_optimization_profile()
            rest = shape[1:]
            profile.set_shape(
                tensor.name, (cfg.min_batch, *rest), (cfg.opt_batch, *rest), (cfg.max_batch, *rest)
            )
    if profile is not None and config.add_optimization_profile(profile) < 0:
        raise ConfigError(f"TensorRT refused the batch profile {list(cfg.profile)} for {path}")

    if cfg.precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 is on by default; fp32 means fp32
    else:
        config.set_flag(trt.BuilderFlag.FP16)
    calibrator = None
    if cfg.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # also required for Q/DQ models
        if cfg.calibration:
            _, rows = _calibration_rows(cfg, network)
            # `calibrator` stays referenced until the build returns: the config
            # holds only a pointer to it. (Calibrators are deprecated since
            # TensorRT 10.1 in favour of Q/DQ models, and still honoured in 10.x.)
            calibrator = _make_calibrator(trt, cupy, rows, cfg.opt_batch)
            config.int8_calibrator = calibrator
            if profile is not None:
                config.set_calibration_profile(profile)
    plan = builder.build_serialized_network(network, config)
    del calibrator
    if plan is None:
        raise FlywheelError(f"TensorRT could not build an engine for {path} (see its log above)")
    return bytes(plan)


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
            gpu, capability = _gpu_identity(cupy, cfg.device)
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

    @property
    def signature(self) -> Signature:
        if self._signature is None:
            raise RuntimeError("call load() first")
        return self._signature

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
