"""The signature of an ONNX file, read from its graph without building a
session: what a controller needs to judge a model before any replica loads it.

Reads the protobuf (weights in side files are not read); initializers listed
as graph inputs are left out, as ONNX Runtime leaves them out. The result
matches :attr:`OnnxRuntimeBackend.signature` for the models ONNX Runtime
loads; a replica's loaded model stays the final word (see
serving/_private/signature_gate.py).
"""

from __future__ import annotations

import numpy as np

from flywheel.protocol.datatypes import v2_datatype
from flywheel.protocol.errors import ConfigError, FlywheelError
from flywheel.runtime.signature import Signature, TensorSpec


def read_onnx_signature(path: str) -> Signature:
    """The V2 signature of the ONNX model at ``path``; ConfigError when the
    file is not ONNX or a tensor's type has no V2 datatype."""
    try:
        import onnx
        from onnx.helper import tensor_dtype_to_np_dtype
    except ImportError as exc:  # pragma: no cover - onnx is a core dependency
        raise ConfigError(f"reading an ONNX signature needs the onnx package: {exc}") from None
    try:
        graph = onnx.load(path, load_external_data=False).graph
    except Exception as exc:
        raise ConfigError(f"{path}: not a readable ONNX model: {exc}") from None
    weights = {t.name for t in graph.initializer}

    def spec(vi) -> TensorSpec:
        if not vi.type.HasField("tensor_type"):
            raise ConfigError(f"{path}: {vi.name!r} is not a tensor")
        tensor = vi.type.tensor_type
        try:
            datatype = v2_datatype(np.dtype(tensor_dtype_to_np_dtype(tensor.elem_type)))
        except (FlywheelError, KeyError, TypeError, ValueError):
            raise ConfigError(f"{path}: tensor {vi.name!r} has type {tensor.elem_type} with no V2 datatype") from None
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tensor.shape.dim)
        return TensorSpec(vi.name, datatype, dims)

    return Signature(
        inputs=tuple(spec(vi) for vi in graph.input if vi.name not in weights),
        outputs=tuple(spec(vi) for vi in graph.output),
    )
