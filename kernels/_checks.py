"""Input checks shared by every backend: shapes, dtypes and the NaN policy."""

from __future__ import annotations

import numpy as np

from flywheel.protocol.errors import InvalidInputError

NAN_POLICIES = ("raise", "omit")


def as_matrix(name: str, x, *, features: int | None = None) -> np.ndarray:
    """A 2-D float64 array (rows x features); a 1-D input is one feature."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise InvalidInputError(f"{name} must be 2-D (rows x features), got shape {list(arr.shape)}")
    if features is not None and arr.shape[1] != features:
        raise InvalidInputError(f"{name} has {arr.shape[1]} features; the reference has {features}")
    if arr.shape[0] < 1:
        raise InvalidInputError(f"{name} has no rows")
    return arr


def check_nans(name: str, arr: np.ndarray, policy: str) -> None:
    """Under ``raise``, refuse NaNs naming the first affected feature."""
    check_counted(name, np.isnan(arr).any(axis=0) if policy == "raise" else None, bool(np.isinf(arr).any()),
                  policy)


def check_counted(name: str, nan_features: np.ndarray | None, has_inf: bool, policy: str) -> None:
    """``check_nans`` from what a kernel counted: which features hold a NaN
    (a boolean per feature; only read under ``raise``) and whether any value
    is infinite."""
    if policy not in NAN_POLICIES:
        raise InvalidInputError(f"nan_policy {policy!r} must be one of {NAN_POLICIES}")
    if policy == "raise" and nan_features is not None and nan_features.any():
        raise InvalidInputError(
            f"{name} holds NaN in feature {int(np.argmax(nan_features))} (and {int(nan_features.sum()) - 1} "
            "more); clean it or use nan_policy='omit', which drops NaNs per feature"
        )
    if has_inf:
        raise InvalidInputError(f"{name} holds infinite values")


def sorted_columns(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature sorted values as a (features, rows) C-contiguous array with
    NaNs sorted last, and each feature's count of non-NaN values."""
    cols = np.sort(np.ascontiguousarray(arr.T), axis=1)
    return cols, (~np.isnan(cols)).sum(axis=1).astype(np.int64)


def as_codes(name: str, x, *, features: int | None = None) -> np.ndarray:
    """Categorical features as non-negative int64 codes (rows x features)."""
    arr = np.asarray(x)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] < 1:
        raise InvalidInputError(f"{name} must be 2-D (rows x features) with rows, got {list(arr.shape)}")
    if features is not None and arr.shape[1] != features:
        raise InvalidInputError(f"{name} has {arr.shape[1]} features; the reference has {features}")
    if arr.dtype.kind == "f":
        if np.isnan(arr).any():
            raise InvalidInputError(f"{name}: categorical codes cannot be NaN")
        if (arr != np.round(arr)).any():
            raise InvalidInputError(f"{name}: categorical codes must be integers")
    elif arr.dtype.kind not in "iub":
        raise InvalidInputError(f"{name}: categorical codes must be integers, got {arr.dtype}")
    codes = arr.astype(np.int64)
    if (codes < 0).any():
        raise InvalidInputError(f"{name}: categorical codes must be >= 0")
    return codes
