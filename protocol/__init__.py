"""Flywheel's wire layer: the V2 (Open Inference Protocol) types and codecs.

Shared by the server and the Python client, so it imports neither Ray nor a
web framework, nor any other Flywheel package:

- ``errors``: the one error vocabulary (neutral codes each transport maps);
- ``datatypes``: the V2 datatype table and its NumPy equivalents;
- ``shapes``: limits on declared shapes, checked before data is read;
- ``raw``: raw tensor bytes (binary extension, gRPC raw contents) <-> NumPy;
- ``codec``: V2 HTTP (JSON and binary extension) bodies <-> NumPy;
- ``grpc_codec`` and ``proto``: V2 gRPC messages and their generated stubs.
"""

from flywheel.protocol.datatypes import V2_DATATYPES, numpy_dtype, v2_datatype
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

__all__ = [
    "ConfigError",
    "DeadlineExceededError",
    "ErrorCode",
    "FlywheelError",
    "InvalidInputError",
    "NotFoundError",
    "OverloadedError",
    "PayloadTooLargeError",
    "UnavailableError",
    "V2_DATATYPES",
    "numpy_dtype",
    "v2_datatype",
]
