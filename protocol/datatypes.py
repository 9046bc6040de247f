"""V2 (Open Inference Protocol) datatypes and their NumPy equivalents."""

from __future__ import annotations

import numpy as np

from flywheel.protocol.errors import InvalidInputError

# BYTES tensors are object arrays of ``bytes``; everything else is a fixed-width
# NumPy dtype, little-endian on the wire.
_V2_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
_NUMPY_TO_V2: dict[np.dtype, str] = {v: k for k, v in _V2_TO_NUMPY.items() if k != "BYTES"}

V2_DATATYPES: tuple[str, ...] = tuple(_V2_TO_NUMPY)
INT_DATATYPES = frozenset(k for k, v in _V2_TO_NUMPY.items() if v.kind in "iu")
FLOAT_DATATYPES = frozenset(("FP16", "FP32", "FP64"))


def numpy_dtype(datatype: str) -> np.dtype:
    """NumPy dtype for a V2 datatype name; raises InvalidInputError if unknown."""
    try:
        return _V2_TO_NUMPY[datatype]
    except KeyError:
        raise InvalidInputError(
            f"unknown datatype {datatype!r}; expected one of {', '.join(V2_DATATYPES)}"
        ) from None


_V2_OF: dict[np.dtype, str] = {}  # memo: every response encodes a dtype or two


def v2_datatype(dtype: np.dtype) -> str:
    """V2 datatype name for a NumPy dtype (object and str/bytes kinds map to BYTES)."""
    try:
        return _V2_OF[dtype]
    except (KeyError, TypeError):
        pass
    name = _v2_datatype(dtype)
    if isinstance(dtype, np.dtype):
        _V2_OF[dtype] = name
    return name


def _v2_datatype(dtype: np.dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return "BYTES"
    try:
        return _NUMPY_TO_V2[dtype.newbyteorder("=")]
    except KeyError:
        raise InvalidInputError(f"dtype {dtype} has no V2 datatype") from None
