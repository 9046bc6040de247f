"""Flywheel runtime: backends, batcher, signatures, export.

Plain library code: no Ray and no web framework, usable in a notebook or on an
edge box. Heavy optional parts (torch, onnxruntime) are imported on first use.
The error vocabulary and the V2 codecs are flywheel.protocol's.
"""

from flywheel.runtime.backends import Backend, BackendSpec, available_backends, get_backend
from flywheel.runtime.backends.onnx_backend import OnnxRuntimeBackend, OnnxRuntimeConfig
from flywheel.runtime.backends.torch_backend import TorchBackend
from flywheel.runtime.batcher import BatchingConfig, BatchResult, DynamicBatcher
from flywheel.runtime.signature import Signature, TensorSpec, validate_inputs

__all__ = [
    "Backend",
    "BackendSpec",
    "BatchResult",
    "BatchingConfig",
    "DynamicBatcher",
    "OnnxRuntimeBackend",
    "OnnxRuntimeConfig",
    "Signature",
    "TensorSpec",
    "TorchBackend",
    "available_backends",
    "get_backend",
    "validate_inputs",
]
