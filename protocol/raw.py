"""Raw tensor bytes (V2 binary extension and gRPC raw contents) <-> NumPy.

Layout (PROTOCOL.md): little-endian, row-major; BOOL is one byte; a BYTES
tensor is, per element, a 4-byte little-endian length and then its bytes.
Fixed-width types are viewed zero-copy with ``np.frombuffer``.
"""

from __future__ import annotations

import struct

import numpy as np

from flywheel.protocol.datatypes import numpy_dtype
from flywheel.protocol.errors import InvalidInputError

_LEN = struct.Struct("<I")


def tensor_from_raw(name: str, datatype: str, shape: list[int], buf: bytes | memoryview, count: int) -> np.ndarray:
    """Interpret ``buf`` as a tensor of ``count`` elements of ``datatype``.

    Raises InvalidInputError (naming the tensor) when the byte size does not
    match shape x datatype, or a BYTES element runs past the end.
    """
    if datatype == "BYTES":
        return _bytes_from_raw(name, buf, count).reshape(shape)
    dtype = numpy_dtype(datatype).newbyteorder("<")
    want = count * dtype.itemsize
    if len(buf) != want:
        raise InvalidInputError(
            f"input {name!r}: {len(buf)} raw bytes do not match shape {list(shape)} x "
            f"{datatype} ({want} bytes)"
        )
    arr = np.frombuffer(buf, dtype=dtype)
    if not dtype.isnative:
        arr = arr.astype(dtype.newbyteorder("="))
    return arr.reshape(shape)


def _bytes_from_raw(name: str, buf: bytes | memoryview, count: int) -> np.ndarray:
    out = np.empty(count, dtype=object)
    view = memoryview(buf)
    pos, end = 0, len(view)
    for i in range(count):
        if pos + 4 > end:
            raise InvalidInputError(f"input {name!r}: BYTES data ends inside element {i}'s length")
        (n,) = _LEN.unpack_from(view, pos)
        pos += 4
        if pos + n > end:
            raise InvalidInputError(f"input {name!r}: BYTES element {i} runs past the end of the data")
        out[i] = bytes(view[pos : pos + n])
        pos += n
    if pos != end:
        raise InvalidInputError(
            f"input {name!r}: {end - pos} bytes left over after {count} BYTES elements"
        )
    return out


def tensor_to_raw(arr: np.ndarray) -> bytes:
    """The raw bytes of ``arr`` (BYTES: length-prefixed; str elements as UTF-8)."""
    if arr.dtype.kind in "OSU":
        parts = []
        for v in arr.reshape(-1):
            b = v if isinstance(v, bytes) else str(v).encode()
            parts.append(_LEN.pack(len(b)))
            parts.append(b)
        return b"".join(parts)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return np.ascontiguousarray(arr).tobytes()
