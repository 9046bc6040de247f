"""TensorRT plans for the ``tensorrt`` backend: settings, build, cache keys.

:class:`TensorRTConfig` is the model config's ``tensorrt:``. :func:`build_plan`
parses an ONNX file with TensorRT's ONNX parser and builds an engine with one
optimization profile over the batch range (FP16 by default; FP32, or INT8
from calibration rows or from a Q/DQ model). Plans are cached on disk under
:func:`engine_cache_key`, which covers everything that makes a plan valid,
and written with :func:`write_atomically` so that replicas sharing a cache
never read half a plan. The backend that loads and runs them is
tensorrt_backend.py.

TensorRT (10.x) and CuPy are imported inside functions (:func:`import_gpu_stack`):
importing this module never needs them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np

from flywheel.protocol.datatypes import numpy_dtype
from flywheel.protocol.errors import ConfigError, FlywheelError, UnavailableError

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


def gpu_identity(cupy: Any, device: int) -> tuple[str, str]:
    """``(GPU model name, compute capability "major.minor")`` of a CUDA device."""
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
