"""ONNX Runtime backend: CPU always; CUDA / TensorRT providers when present."""

from __future__ import annotations

import logging
import os

import msgspec
import numpy as np

from flywheel.runtime.backend import Backend, refuse_pickle
from flywheel.runtime.errors import ConfigError, InvalidInputError
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


class OnnxRuntimeConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """ONNX Runtime settings for one model.

    providers: wanted execution providers in priority order, from
        ``cpu``, ``cuda``, ``tensorrt``; missing ones are skipped with a logged
        reason and ``cpu`` is always the last resort.
    intra_op_threads: threads inside one operator (0 = ONNX Runtime's default,
        one per core). On a small host with several replicas, 1 is usually best.
    inter_op_threads: threads across independent operators (0 = default).
    """

    providers: tuple[str, ...] = ("cpu",)
    intra_op_threads: int = 1
    inter_op_threads: int = 1

    def __post_init__(self) -> None:
        bad = [p for p in self.providers if p not in _PROVIDERS]
        if bad:
            raise ConfigError(
                f"onnxruntime.providers {bad} unknown; allowed: {sorted(_PROVIDERS)}"
            )
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise ConfigError("onnxruntime.*_threads must be >= 0")


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
        providers = self._choose_providers(ort.get_available_providers())
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

    @property
    def signature(self) -> Signature:
        if self._signature is None:
            raise RuntimeError("call load() first")
        return self._signature

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
