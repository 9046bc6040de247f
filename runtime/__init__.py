"""Flywheel runtime: backends, batcher, codecs, signatures, export.

Plain library code: no Ray and no web framework, usable in a notebook or on an
edge box. Heavy optional parts (torch, onnxruntime) are imported on first use.
"""

from flywheel.runtime.backends import Backend, BackendSpec, available_backends, get_backend
from flywheel.runtime.batcher import BatchingConfig, BatchResult, DynamicBatcher
from flywheel.protocol.codec import DecodedRequest, decode_infer_request, encode_infer_response
from flywheel.protocol.errors import (
    ConfigError,
    DeadlineExceededError,
    ErrorCode,
    FlywheelError,
    InvalidInputError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    UnavailableError,
)
from flywheel.runtime.backends.onnx_backend import OnnxRuntimeBackend, OnnxRuntimeConfig
from flywheel.runtime.signature import Signature, TensorSpec, validate_inputs
from flywheel.runtime.backends.torch_backend import TorchBackend

__all__ = [
    "Backend",
    "BackendSpec",
    "BatchResult",
    "BatchingConfig",
    "ConfigError",
    "DeadlineExceededError",
    "DecodedRequest",
    "DynamicBatcher",
    "ErrorCode",
    "FlywheelError",
    "InvalidInputError",
    "NotFoundError",
    "OnnxRuntimeBackend",
    "OnnxRuntimeConfig",
    "OverloadedError",
    "PayloadTooLargeError",
    "Signature",
    "TensorSpec",
    "TorchBackend",
    "UnavailableError",
    "available_backends",
    "decode_infer_request",
    "encode_infer_response",
    "get_backend",
    "validate_inputs",
]
