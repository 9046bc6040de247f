"""Flywheel runtime: backends, batcher, codecs, signatures, export.

Plain library code: no Ray and no web framework, usable in a notebook or on an
edge box. Heavy optional parts (torch, onnxruntime) are imported on first use.
"""

from flywheel.runtime.backend import Backend
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
from flywheel.runtime.onnx_backend import OnnxRuntimeBackend, OnnxRuntimeConfig
from flywheel.runtime.signature import Signature, TensorSpec, validate_inputs
from flywheel.runtime.torch_backend import TorchBackend

__all__ = [
    "Backend",
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
    "decode_infer_request",
    "encode_infer_response",
    "validate_inputs",
]
