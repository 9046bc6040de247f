"""Signature compatibility: what counts as a difference between an
endpoint's signature and a candidate's, and the sentence that names it."""

from __future__ import annotations

import pytest

from flywheel.protocol.errors import InvalidInputError
from flywheel.runtime.signature import (
    Signature,
    SignatureMismatchError,
    TensorSpec,
    check_compatible,
    signature_difference,
    signature_from_doc,
)


def sig(inputs=(("x", "FP32", (-1, 4)),), outputs=(("y", "FP32", (-1, 3)),)) -> Signature:
    return Signature(
        inputs=tuple(TensorSpec(n, d, tuple(s)) for n, d, s in inputs),
        outputs=tuple(TensorSpec(n, d, tuple(s)) for n, d, s in outputs),
    )


def diff(ours: Signature, theirs: Signature) -> str | None:
    return signature_difference(ours, theirs, ours_label="the endpoint", theirs_label="version 3")


def test_identical_signatures_have_no_difference():
    assert diff(sig(), sig()) is None


def test_input_order_does_not_matter():
    two = (("a", "FP32", (-1, 1)), ("b", "INT64", (-1,)))
    assert diff(sig(inputs=two), sig(inputs=tuple(reversed(two)))) is None


def test_a_datatype_difference_names_both_datatypes():
    got = diff(sig(), sig(inputs=(("x", "FP64", (-1, 4)),)))
    assert got == "input 'x': datatype FP32 on the endpoint, FP64 on version 3"


def test_a_missing_input_is_named():
    got = diff(sig(), sig(inputs=(("z", "FP32", (-1, 4)),)))
    assert got == "input 'x': on the endpoint, missing on version 3"


def test_an_extra_input_is_a_difference():
    got = diff(sig(), sig(inputs=(("x", "FP32", (-1, 4)), ("z", "FP32", (-1, 1)))))
    assert got == "input 'z': not on the endpoint, required by version 3"


def test_a_fixed_dimension_that_differs_is_named():
    got = diff(sig(), sig(inputs=(("x", "FP32", (-1, 5)),)))
    assert got == "input 'x': shape [-1, 4] on the endpoint, [-1, 5] on version 3 (dimension 1)"


def test_a_different_rank_is_a_difference():
    got = diff(sig(), sig(inputs=(("x", "FP32", (-1, 4, 1)),)))
    assert got is not None and got.endswith("(rank 2 vs 3)")


def test_a_candidate_input_of_any_size_takes_a_fixed_one():
    assert diff(sig(inputs=(("x", "FP32", (2, 4)),)), sig(inputs=(("x", "FP32", (-1, -1)),))) is None


def test_an_input_of_any_size_must_stay_any_size():
    got = diff(sig(), sig(inputs=(("x", "FP32", (8, 4)),)))
    assert got is not None
    assert "dimension 0: any size on the endpoint, only 8 on version 3" in got


@pytest.mark.parametrize("ours, theirs", [((-1, 3), (5, 3)), ((5, 3), (-1, 3)), ((-1, 3), (-1, -1))])
def test_minus_one_in_an_output_matches_any_size(ours, theirs):
    assert diff(sig(outputs=(("y", "FP32", ours),)), sig(outputs=(("y", "FP32", theirs),))) is None


def test_an_output_dimension_that_differs_is_named():
    got = diff(sig(), sig(outputs=(("y", "FP32", (-1, 2)),)))
    assert got == "output 'y': shape [-1, 3] on the endpoint, [-1, 2] on version 3 (dimension 1)"


def test_a_missing_output_is_named():
    got = diff(sig(), sig(outputs=(("p", "FP32", (-1, 3)),)))
    assert got == "output 'y': on the endpoint, missing on version 3"


def test_an_added_output_is_refused_too():
    got = diff(sig(), sig(outputs=(("y", "FP32", (-1, 3)), ("p", "FP32", (-1, 1)))))
    assert got == "output 'p': not on the endpoint, added by version 3"


def test_inputs_are_judged_before_outputs():
    got = diff(sig(), sig(inputs=(("x", "INT32", (-1, 4)),), outputs=(("y", "INT32", (-1, 3)),)))
    assert got is not None and got.startswith("input 'x'")


def test_check_compatible_raises_the_first_difference_as_a_bad_request():
    with pytest.raises(SignatureMismatchError, match=r"^input 'x': datatype FP32 on the endpoint, FP64 on v3$"):
        check_compatible(sig(), sig(inputs=(("x", "FP64", (-1, 4)),)), theirs_label="v3")
    assert issubclass(SignatureMismatchError, InvalidInputError)  # the 400 of every bad request
    check_compatible(sig(), sig())  # compatible: no error


def test_a_signature_reads_from_v2_metadata():
    meta = {"name": "m", "versions": ["1"], "platform": "onnx_onnxv1",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}]}
    assert signature_from_doc(meta) == sig()


def test_a_malformed_signature_document_is_refused():
    with pytest.raises(InvalidInputError, match="not a signature"):
        signature_from_doc({"inputs": [{"name": "x"}]})
