"""Limits on the shapes a client declares, shared by the HTTP and gRPC codecs.

A declared shape decides how much memory decoding allocates, so it is checked
before any tensor data is read.
"""

from __future__ import annotations

from collections.abc import Sequence

from flywheel.protocol.errors import InvalidInputError


def check_shape(name: str, shape: Sequence[int], max_elements: int) -> int:
    """Check a client-declared shape; return its element count.

    Raises InvalidInputError for negative dims or more than ``max_elements``
    elements (which also guards against absurd allocations).
    """
    count = 1
    spread = 1  # product of the non-zero dims: an empty tensor may not declare absurd ones
    for dim in shape:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
            raise InvalidInputError(
                f"input {name!r}: shape {list(shape)} must hold non-negative integers"
            )
        count *= dim
        spread *= dim or 1
    if spread > max_elements and count == 0:
        raise InvalidInputError(
            f"input {name!r}: shape {list(shape)} is empty but its other dimensions multiply to {spread}, "
            f"more than the limit of {max_elements}"
        )
    if count > max_elements:
        raise InvalidInputError(
            f"input {name!r}: shape {list(shape)} has {count} elements, "
            f"more than the limit of {max_elements}"
        )
    return count
