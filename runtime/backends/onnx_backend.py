"""ONNX Runtime backend (``backend: onnxruntime``): an .onnx file in an
``onnxruntime.InferenceSession``; CPU always, CUDA / TensorRT execution
providers when present. Its settings are the model config's ``onnxruntime:``
(:class:`OnnxRuntimeConfig`). onnxruntime is imported by ``load()`` only."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import msgspec
import numpy as np

from flywheel.runtime.backends.base import Backend, refuse_pickle
from flywheel.runtime.backends.registry import BackendSpec, ConfigField
from flywheel.protocol.errors import ConfigError, InvalidInputError
from flywheel.runtime.signature import Signature, TensorSpec

log = logging.getLogger(__name__)

# ONNX tensor element type names (as onnxruntime reports them) -> V2 datatypes.
_ORT_TO_V2 = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
GPU_PROVIDERS = frozenset({"cuda", "tensorrt"})


class OnnxRuntimeConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """ONNX Runtime settings for one model.

    providers: wanted execution providers in priority order, from
        ``cpu``, ``cuda``, ``tensorrt``; missing ones are skipped with a logged
        reason and ``cpu`` is always the last resort.
    intra_op_threads: threads inside one operator (0 = ONNX Runtime's default,
        one per core). On a small host with several replicas, 1 is usually best.
    inter_op_threads: threads across independent operators (0 = default).
    device_id: the CUDA device the ``cuda`` and ``tensorrt`` providers use.

    The ``trt_*`` settings apply to the ``tensorrt`` provider only (ONNX
    Runtime's TensorRT execution provider, which compiles the subgraphs
    TensorRT supports and leaves the rest to ``cuda`` / ``cpu``); giving one
    without ``tensorrt`` in ``providers`` is an error.

    trt_fp16: let TensorRT pick FP16 kernels.
    trt_int8: let TensorRT pick INT8 kernels: the model must carry Q/DQ nodes,
        or ``trt_int8_calibration_table`` must name a calibration table.
    trt_int8_calibration_table: file name of a TensorRT calibration table,
        looked up by ONNX Runtime in ``trt_engine_cache_path``.
    trt_engine_cache_path: folder where built engines (and timing caches) are
        kept between loads; empty = build on every load.
    trt_batch_profile: ``[min, opt, max]`` rows of the batch (first) dimension
        the engine is built for; empty = let ONNX Runtime build for the shapes
        it meets (and rebuild when a larger one comes).
    trt_workspace_mib: TensorRT's scratch memory limit in MiB (0 = ONNX
        Runtime's default).
    """

    providers: tuple[str, ...] = ("cpu",)
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    device_id: int = 0
    trt_fp16: bool = False
    trt_int8: bool = False
    trt_int8_calibration_table: str = ""
    trt_engine_cache_path: str = ""
    trt_batch_profile: tuple[int, ...] = ()
    trt_workspace_mib: int = 0

    def __post_init__(self) -> None:
        bad = [p for p in self.providers if p not in _PROVIDERS]
        if bad:
            raise ConfigError(
                f"onnxruntime.providers {bad} unknown; allowed: {sorted(_PROVIDERS)}"
            )
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise ConfigError("onnxruntime.*_threads must be >= 0")
        if self.device_id < 0:
            raise ConfigError(f"onnxruntime.device_id {self.device_id} must be >= 0")
        given = [f for f in _TRT_FIELDS if getattr(self, f)]
        if given and "tensorrt" not in self.providers:
            raise ConfigError(
                f"onnxruntime.{given[0]} is a TensorRT setting, but 'tensorrt' is not in "
                f"onnxruntime.providers {list(self.providers)}"
            )
        profile = self.trt_batch_profile
        if profile and (len(profile) != 3 or not 1 <= profile[0] <= profile[1] <= profile[2]):
            raise ConfigError(
                f"onnxruntime.trt_batch_profile {list(profile)} must be [min, opt, max] with "
                "1 <= min <= opt <= max"
            )
        if self.trt_int8_calibration_table and not self.trt_int8:
            raise ConfigError("onnxruntime.trt_int8_calibration_table needs onnxruntime.trt_int8: true")
        if self.trt_workspace_mib < 0:
            raise ConfigError("onnxruntime.trt_workspace_mib must be >= 0 (0 = ONNX Runtime's default)")


_TRT_FIELDS = (
    "trt_fp16",
    "trt_int8",
    "trt_int8_calibration_table",
    "trt_engine_cache_path",
    "trt_batch_profile",
    "trt_workspace_mib",
)


def _flag(on: bool) -> str:
    # "1"/"0" rather than True/False: ONNX Runtime turns every option into a
    # string, and older releases parse booleans from digits only.
    return "1" if on else "0"


def _profile_shapes(input_shapes: Mapping[str, Sequence[int]], rows: int) -> str:
    parts = []
    for name, shape in input_shapes.items():
        if not shape or shape[0] != -1:
            continue  # no batch axis: TensorRT needs no profile for it
        if any(d < 0 for d in shape[1:]):
            raise ConfigError(
                f"onnxruntime.trt_batch_profile: input {name!r} has shape {list(shape)}; only the "
                "first (batch) dimension may vary"
            )
        if ":" in name or "," in name:
            raise ConfigError(
                f"onnxruntime.trt_batch_profile: input name {name!r} contains ':' or ',', which "
                "ONNX Runtime's profile syntax cannot express"
            )
        parts.append(f"{name}:" + "x".join(str(d) for d in (rows, *shape[1:])))
    return ",".join(parts)


def provider_options(
    config: OnnxRuntimeConfig,
    providers: Sequence[str],
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> list[tuple[str, dict[str, str]]]:
    """ONNX Runtime's ``(provider, options)`` pairs for ``providers``, in order.

    providers: ONNX Runtime provider names (``"TensorrtExecutionProvider"``
        ...), as chosen from what this build offers.
    input_shapes: the model's input shapes (-1 = variable) by name; needed
        only when ``config.trt_batch_profile`` is set and TensorRT is chosen.
    Options are strings, as ONNX Runtime stores them. The CPU provider gets
    none. Pure: reads no files and imports nothing. Raises ConfigError when a
    batch profile cannot be expressed for these inputs.
    """
    pairs = []
    for name in providers:
        if name == "TensorrtExecutionProvider":
            opts = _tensorrt_options(config, input_shapes)
        elif name == "CUDAExecutionProvider":
            opts = {"device_id": str(config.device_id)}
        else:
            opts = {}
        pairs.append((name, opts))
    return pairs


def _tensorrt_options(
    config: OnnxRuntimeConfig, input_shapes: Mapping[str, Sequence[int]] | None
) -> dict[str, str]:
    opts = {
        "device_id": str(config.device_id),
        "trt_fp16_enable": _flag(config.trt_fp16),
        "trt_int8_enable": _flag(config.trt_int8),
    }
    if config.trt_int8_calibration_table:
        opts["trt_int8_calibration_table_name"] = config.trt_int8_calibration_table
    if config.trt_workspace_mib:
        opts["trt_max_workspace_size"] = str(config.trt_workspace_mib << 20)
    if config.trt_engine_cache_path:
        # the timing cache beside the engines makes a rebuild (new profile,
        # new model version) much faster than a cold one
        opts["trt_engine_cache_enable"] = "1"
        opts["trt_engine_cache_path"] = config.trt_engine_cache_path
        opts["trt_timing_cache_enable"] = "1"
        opts["trt_timing_cache_path"] = config.trt_engine_cache_path
    if config.trt_batch_profile:
        if input_shapes is None:
            raise ConfigError("onnxruntime.trt_batch_profile needs the model's input shapes")
        lo, opt, hi = config.trt_batch_profile
        shapes = {k: _profile_shapes(input_shapes, rows) for k, rows in
                  (("min", lo), ("opt", opt), ("max", hi))}
        if shapes["min"]:
            opts["trt_profile_min_shapes"] = shapes["min"]
            opts["trt_profile_opt_shapes"] = shapes["opt"]
            opts["trt_profile_max_shapes"] = shapes["max"]
    return opts


def onnx_input_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """The graph inputs of an ONNX file (initializers excluded) and their
    shapes, -1 for a symbolic or unknown dimension. Weights stored in side
    files are not read."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    shapes = {}
    for vi in graph.input:
        if vi.name in weights:
            continue
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
    return shapes


def _dim(d: object) -> int:
    return d if isinstance(d, int) and d >= 0 else -1


class OnnxRuntimeBackend(Backend):
    """An ONNX model in an ``onnxruntime.InferenceSession``."""

    platform = "onnx_onnxv1"

    def __init__(self, path: str, config: OnnxRuntimeConfig | None = None) -> None:
        if not os.path.isfile(path):
            raise ConfigError(f"model file {path!r} does not exist")
        self._path = path
        self._cfg = config or OnnxRuntimeConfig()
        self._session = None
        self._signature: Signature | None = None
        self._output_names: list[str] = []
        self.providers: list[str] = []

    def _choose_providers(self, available: list[str]) -> list[str]:
        chosen = []
        for name in self._cfg.providers:
            provider = _PROVIDERS[name]
            if provider in available:
                chosen.append(provider)
            else:
                log.warning(
                    "onnxruntime provider %s unavailable (this build offers %s); skipping",
                    provider,
                    available,
                )
        if "CPUExecutionProvider" not in chosen:
            chosen.append("CPUExecutionProvider")
        return chosen

    def load(self) -> None:
        import onnxruntime as ort

        refuse_pickle(self._path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self._cfg.intra_op_threads
        opts.inter_op_num_threads = self._cfg.inter_op_threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        chosen = self._choose_providers(ort.get_available_providers())
        shapes = None
        if self._cfg.trt_batch_profile and "TensorrtExecutionProvider" in chosen:
            shapes = onnx_input_shapes(self._path)
        providers = [(name, o) if o else name for name, o in provider_options(self._cfg, chosen, shapes)]
        self._session = ort.InferenceSession(self._path, opts, providers=providers)
        self.providers = self._session.get_providers()
        self._signature = Signature(
            inputs=tuple(self._spec(i) for i in self._session.get_inputs()),
            outputs=tuple(self._spec(o) for o in self._session.get_outputs()),
        )
        self._output_names = [o.name for o in self._signature.outputs]

    @staticmethod
    def _spec(node) -> TensorSpec:
        try:
            datatype = _ORT_TO_V2[node.type]
        except KeyError:
            raise ConfigError(f"tensor {node.name!r} has unsupported type {node.type}") from None
        return TensorSpec(node.name, datatype, tuple(_dim(d) for d in node.shape))

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {}
        for name, arr in inputs.items():
            if arr.dtype == object:  # ONNX strings: str, not bytes
                try:
                    arr = np.vectorize(bytes.decode, otypes=[object])(arr)
                except UnicodeDecodeError:
                    raise InvalidInputError(f"input {name!r}: BYTES must be UTF-8") from None
            feed[name] = arr
        results = self._session.run(self._output_names, feed)
        return dict(zip(self._output_names, results))


def _create(path: str, model) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(path, model.onnxruntime)


def _gpus(model_config) -> float:
    """A GPU when a GPU provider is wanted: Ray must place the replica on a
    GPU node, where otherwise it could land on a CPU node and silently run
    on the CPU fallback."""
    providers = model_config.onnxruntime.providers
    return 1.0 if any(p in GPU_PROVIDERS for p in providers) else 0.0


SPEC = BackendSpec(
    name="onnxruntime",
    create=_create,
    gpus=_gpus,
    summary="an .onnx file run by ONNX Runtime",
    # not exclusive: a config moved to backend tensorrt may keep its block
    fields=(ConfigField("onnxruntime", OnnxRuntimeConfig, OnnxRuntimeConfig(), exclusive=False),),
)
