"""Shadow traffic: a share of an endpoint's requests mirrored to a shadow
variant whose answers are only compared with the primary's, never returned.
:class:`ShadowConfig` says which variant and how much; :func:`compare_outputs`
judges one pair of answers (the router records the result per variant).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import msgspec
import numpy as np

from flywheel.protocol.errors import ConfigError


class ShadowConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Mirror a share of requests to a shadow variant whose responses are only
    compared, never returned. variant: its version; fraction: in (0, 1]."""

    variant: str
    fraction: float = 1.0

    def __post_init__(self) -> None:
        if not self.variant:
            raise ConfigError("shadow.variant must name a variant")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"shadow.fraction {self.fraction} must lie in (0, 1]")


def compare_outputs(primary: Mapping[str, np.ndarray], shadow: Mapping[str, np.ndarray]) -> tuple[bool, float]:
    """(agree, mean_abs_diff) of two responses' outputs.

    Different output names or shapes: (False, inf). A floating output with
    ndim >= 2 and last dimension > 1 is class scores: it agrees when the
    argmax along the last axis matches in every row. Other floating outputs
    agree when np.allclose(rtol=1e-3, atol=1e-5), NaN equal to NaN; others
    (ints, bools, bytes) when exactly equal. mean_abs_diff is over every
    element of the floating outputs (0.0 when there are none); an element
    that is NaN on one side only counts as inf.
    """
    if set(primary) != set(shadow):
        return False, math.inf
    pairs = [(np.asarray(primary[n]), np.asarray(shadow[n])) for n in primary]
    if any(a.shape != b.shape for a, b in pairs):
        return False, math.inf
    agree, diff_sum, diff_n = True, 0.0, 0
    for a, b in pairs:
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(b.dtype, np.floating)):
            agree = agree and bool(np.array_equal(a, b))
            continue
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        if a.ndim >= 2 and a.shape[-1] > 1:
            agree = agree and bool(np.array_equal(a64.argmax(axis=-1), b64.argmax(axis=-1)))
        else:
            agree = agree and bool(np.allclose(a64, b64, rtol=1e-3, atol=1e-5, equal_nan=True))
        with np.errstate(invalid="ignore"):
            d = np.abs(a64 - b64)
        d[(a64 == b64) | (np.isnan(a64) & np.isnan(b64))] = 0.0  # equal infs and paired NaNs
        d[np.isnan(d)] = math.inf
        diff_sum += float(d.sum())
        diff_n += d.size
    return agree, diff_sum / diff_n if diff_n else 0.0
