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
