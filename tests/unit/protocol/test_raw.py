from __future__ import annotations

import struct

import numpy as np
import pytest

from flywheel.protocol.errors import InvalidInputError
from flywheel.protocol.raw import tensor_from_raw, tensor_to_raw

TYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}


@pytest.mark.parametrize("datatype", sorted(TYPES))
def test_fixed_width_round_trip_is_little_endian_and_zero_copy(datatype):
    arr = (np.arange(6) % 2).astype(TYPES[datatype]).reshape(2, 3)
    raw = tensor_to_raw(arr)
    assert raw == arr.astype(np.dtype(TYPES[datatype]).newbyteorder("<")).tobytes()
    back = tensor_from_raw("x", datatype, [2, 3], raw, 6)
    np.testing.assert_array_equal(back, arr)
    assert back.dtype == np.dtype(TYPES[datatype])


def test_bytes_are_length_prefixed():
    arr = np.array([b"ab", b"", "hé"], dtype=object)
    raw = tensor_to_raw(arr)
    assert raw == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 0) + struct.pack("<I", 3) + "hé".encode()
    back = tensor_from_raw("x", "BYTES", [3], raw, 3)
    assert list(back) == [b"ab", b"", "hé".encode()]


@pytest.mark.parametrize(
    "datatype, raw, count, fragment",
    [
        ("FP32", b"\0" * 7, 2, "7 raw bytes do not match"),
        ("BYTES", b"\x05\0\0\0ab", 1, "runs past the end"),
        ("BYTES", b"\x01\0", 1, "inside element 0's length"),
        ("BYTES", b"\x01\0\0\0ab", 1, "1 bytes left over"),
    ],
)
def test_bad_raw_data_names_the_input(datatype, raw, count, fragment):
    with pytest.raises(InvalidInputError) as info:
        tensor_from_raw("pix", datatype, [count], raw, count)
    assert "'pix'" in info.value.message
    assert fragment in info.value.message
