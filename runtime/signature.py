"""Model signatures and request validation against them.

A signature is the V2 metadata of a model: input and output tensors with their
datatypes and shapes (``-1`` marks a variable dimension; the first dimension of a
batchable model is its batch axis). Validation runs once per request, before the
request may join a batch, so a bad request never fails anybody else's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import msgspec
import numpy as np

from flywheel.protocol.datatypes import V2_DATATYPES, numpy_dtype
from flywheel.protocol.errors import InvalidInputError


class TensorSpec(msgspec.Struct, frozen=True):
    """One tensor of a signature: V2 ``{name, datatype, shape}``."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.datatype not in V2_DATATYPES:
            raise InvalidInputError(
                f"tensor {self.name!r}: unknown datatype {self.datatype!r}"
            )
        if any(d < -1 for d in self.shape):
            raise InvalidInputError(f"tensor {self.name!r}: shape dims must be >= -1")


class Signature(msgspec.Struct, frozen=True):
    """Inputs and outputs of a model, in the model's order."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def batchable(self) -> bool:
        """True when every input and output has a variable first dimension."""
        return all(t.shape and t.shape[0] == -1 for t in (*self.inputs, *self.outputs))


def validate_inputs(
    signature: Signature, arrays: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Check decoded input arrays against ``signature``.

    Checks names (unknown and missing), datatype, rank and every fixed dimension,
    and that all inputs of a batchable model agree on the batch size. Returns
    the arrays in signature order. Raises InvalidInputError naming the tensor.
    """
    known = {t.name for t in signature.inputs}
    for name in arrays:
        if name not in known:
            raise InvalidInputError(
                f"unknown input {name!r}; the model's inputs are {sorted(known)}"
            )
    out: dict[str, np.ndarray] = {}
    batch: int | None = None
    batchable = signature.batchable
    for spec in signature.inputs:
        try:
            arr = arrays[spec.name]
        except KeyError:
            raise InvalidInputError(f"missing input {spec.name!r}") from None
        want = numpy_dtype(spec.datatype)
        if arr.dtype != want:
            raise InvalidInputError(
                f"input {spec.name!r}: datatype must be {spec.datatype}, got {arr.dtype}"
            )
        if arr.ndim != len(spec.shape) or any(
            w != -1 and w != g for w, g in zip(spec.shape, arr.shape)
        ):
            raise InvalidInputError(
                f"input {spec.name!r}: shape {list(arr.shape)} does not match "
                f"the model's {list(spec.shape)} (-1 = any size)"
            )
        if batchable:
            if batch is None:
                batch = arr.shape[0]
            elif arr.shape[0] != batch:
                raise InvalidInputError(
                    f"input {spec.name!r}: batch size {arr.shape[0]} differs from "
                    f"the other inputs' {batch}"
                )
        out[spec.name] = arr
    return out


def batch_size(arrays: Mapping[str, np.ndarray]) -> int:
    """Rows in a (validated, batchable) request: the first input's first dim."""
    first = next(iter(arrays.values()))
    return int(first.shape[0]) if first.ndim else 1


# -- compatibility: may traffic move from one model to another? --------------
#
# A candidate is compatible with an endpoint's signature when a caller of the
# endpoint cannot tell the difference: the same input names with the same
# datatypes and shapes, and the same outputs. -1 is a wildcard matching any
# size, with one exception: an input the endpoint takes at any size must stay
# any size (a model with a fixed batch size cannot take the batches callers
# already send). An added output is a difference too: callers that ask for no
# output by name get every output, and batch scoring writes each as a column,
# so a new one changes their answers' layout.


class SignatureMismatchError(InvalidInputError):
    """A candidate model's signature differs from the endpoint's; the message
    names the first difference. INVALID_ARGUMENT (HTTP 400): the request names
    a model the endpoint cannot take, and sending it again unchanged will never
    succeed (unlike a busy endpoint's FAILED_PRECONDITION, which waiting cures)."""


def signature_from_doc(doc: Mapping) -> Signature:
    """A Signature from its JSON form: a registry version's ``signature`` or a
    model's V2 metadata (both ``{"inputs": [...], "outputs": [...]}`` of
    ``{name, datatype, shape}``). InvalidInputError when it is not one."""
    try:
        return msgspec.convert(
            {"inputs": doc.get("inputs", ()), "outputs": doc.get("outputs", ())}, Signature, strict=False
        )
    except (msgspec.ValidationError, AttributeError) as exc:
        raise InvalidInputError(f"not a signature: {exc}") from None


def signature_difference(
    ours: Signature, theirs: Signature, *, ours_label: str = "the endpoint", theirs_label: str = "the candidate"
) -> str | None:
    """The first difference that would break a caller of a model with
    signature ``ours`` whose requests went to one with ``theirs``, as one
    sentence (e.g. ``input 'x': datatype FP32 on the endpoint, FP64 on
    version 3``); None when there is none. Inputs are compared before
    outputs, each in ``ours``' order, then what only ``theirs`` has."""
    for kind, accepts, mine, other in (
        ("input", True, ours.inputs, theirs.inputs),
        ("output", False, ours.outputs, theirs.outputs),
    ):
        by_name = {t.name: t for t in other}
        for spec in mine:
            cand = by_name.get(spec.name)
            where = f"{kind} {spec.name!r}"
            if cand is None:
                return f"{where}: on {ours_label}, missing on {theirs_label}"
            if cand.datatype != spec.datatype:
                return f"{where}: datatype {spec.datatype} on {ours_label}, {cand.datatype} on {theirs_label}"
            shapes = f"shape {list(spec.shape)} on {ours_label}, {list(cand.shape)} on {theirs_label}"
            if len(cand.shape) != len(spec.shape):
                return f"{where}: {shapes} (rank {len(spec.shape)} vs {len(cand.shape)})"
            for i, (a, b) in enumerate(zip(spec.shape, cand.shape)):
                if a == b or b == -1 or (a == -1 and not accepts):
                    continue
                if a == -1:
                    return f"{where}: {shapes} (dimension {i}: any size on {ours_label}, only {b} on {theirs_label})"
                return f"{where}: {shapes} (dimension {i})"
        known = {t.name for t in mine}
        for cand in other:
            if cand.name not in known:
                verb = "required by" if accepts else "added by"
                return f"{kind} {cand.name!r}: not on {ours_label}, {verb} {theirs_label}"
    return None


def check_compatible(
    ours: Signature, theirs: Signature, *, ours_label: str = "the endpoint", theirs_label: str = "the candidate"
) -> None:
    """Raise SignatureMismatchError naming the first difference
    (:func:`signature_difference`) when ``theirs`` cannot take ``ours``' traffic."""
    diff = signature_difference(ours, theirs, ours_label=ours_label, theirs_label=theirs_label)
    if diff is not None:
        raise SignatureMismatchError(diff)
