from __future__ import annotations

import numpy as np
import pytest

from flywheel.protocol.errors import InvalidInputError
from flywheel.runtime.signature import Signature, TensorSpec, validate_inputs

SIG = Signature(
    inputs=(TensorSpec("a", "FP32", (-1, 4)), TensorSpec("b", "INT64", (-1,))),
    outputs=(TensorSpec("y", "FP32", (-1, 2)),),
)


def ok():
    return {"b": np.zeros(3, np.int64), "a": np.zeros((3, 4), np.float32)}


def test_valid_inputs_come_back_in_signature_order():
    assert list(validate_inputs(SIG, ok())) == ["a", "b"]


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda d: d.update(c=np.zeros(1)), "unknown input 'c'"),
        (lambda d: d.pop("b"), "missing input 'b'"),
        (lambda d: d.update(a=np.zeros((3, 4), np.float64)), "input 'a': datatype must be FP32"),
        (lambda d: d.update(a=np.zeros((3, 5), np.float32)), "input 'a': shape [3, 5]"),
        (lambda d: d.update(a=np.zeros((3, 4, 1), np.float32)), "input 'a': shape"),
        (lambda d: d.update(b=np.zeros(2, np.int64)), "batch size 2"),
    ],
)
def test_each_mismatch_names_the_tensor_and_what_was_expected(change, fragment):
    d = ok()
    change(d)
    with pytest.raises(InvalidInputError) as info:
        validate_inputs(SIG, d)
    assert fragment in info.value.message


def test_spec_rejects_unknown_datatype():
    with pytest.raises(InvalidInputError, match="FP8"):
        TensorSpec("x", "FP8", (1,))
