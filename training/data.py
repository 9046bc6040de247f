"""A job's data as NumPy arrays: loaded once, by the job's driver.

Every dataset kind ends as four arrays (train x/y, validation x/y) with a
fingerprint of exactly what was trained on, so that the registry's lineage
names the data, and the workers shard the same arrays deterministically
(see training/loop.py). Loading happens in the driver, once: the arrays go
to the workers through Ray's object store.

Kinds: ``digits`` (scikit-learn's bundled 8x8 digits, scaled to [0, 1]),
``parquet`` / ``csv`` (a file, a folder or a glob; every column but the
label is a feature unless ``features`` names them), ``ray`` (a Ray Data
Dataset handed to ``submit(..., dataset=ds)``, materialized here).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from flywheel.registry.lineage import fingerprint_arrays
from flywheel.protocol.errors import ConfigError, InvalidInputError


@dataclass(frozen=True)
class JobData:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    fingerprint: str
    description: str


def load_data(spec, *, seed: int, dataset: Any = None) -> JobData:
    """``spec``: a DatasetSpec. ``dataset``: the Ray Data Dataset of kind
    ``ray``. The validation split is a seeded permutation's tail."""
    kind = spec.kind
    if kind == "digits":
        from sklearn.datasets import load_digits

        raw = load_digits()
        x, y = (raw.data / 16.0).astype(np.float32), raw.target.astype(np.int64)
        what = "sklearn digits (8x8, /16)"
    elif kind in ("parquet", "csv"):
        x, y = _from_frame(_read_files(kind, spec.path), spec)
        what = f"{kind} {spec.path}"
    elif kind == "ray":
        if dataset is None:
            raise InvalidInputError(
                "dataset.kind 'ray' needs the Ray Data Dataset itself: submit(spec, dataset=ds) "
                "(it lives only in the process that submitted the job)"
            )
        x, y = _from_frame(dataset.to_pandas(), spec)
        what = f"ray dataset ({dataset.count()} rows)"
    else:
        raise ConfigError(f"dataset.kind {kind!r} unknown")
    if len(x) < 2:
        raise InvalidInputError(f"dataset {what} has {len(x)} rows; a job needs at least 2")
    idx = np.random.default_rng(seed).permutation(len(x))
    cut = len(x) - int(round(spec.validation_fraction * len(x)))
    tr, va = idx[:cut], idx[cut:]
    return JobData(x[tr], y[tr], x[va], y[va], fingerprint_arrays(x, y), what)


def _read_files(kind: str, path: str):
    import pandas as pd

    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, f"*.{kind}")))
    else:
        files = sorted(glob.glob(path)) or ([path] if os.path.exists(path) else [])
    if not files:
        raise InvalidInputError(f"dataset.path {path!r}: no {kind} files there")
    read = pd.read_parquet if kind == "parquet" else pd.read_csv
    return pd.concat([read(f) for f in files], ignore_index=True)


def _from_frame(frame, spec) -> tuple[np.ndarray, np.ndarray]:
    if spec.label not in frame.columns:
        raise InvalidInputError(f"dataset.label {spec.label!r} is not a column; columns: {list(frame.columns)}")
    features = list(spec.features) or [c for c in frame.columns if c != spec.label]
    missing = [c for c in features if c not in frame.columns]
    if missing:
        raise InvalidInputError(f"dataset.features {missing} are not columns; columns: {list(frame.columns)}")
    try:
        x = frame[features].to_numpy(dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"dataset.features must be numeric: {exc}") from None
    y = frame[spec.label].to_numpy()
    if not np.issubdtype(y.dtype, np.integer):
        raise InvalidInputError(f"dataset.label {spec.label!r} must hold integer class ids, not {y.dtype}")
    return x, y.astype(np.int64)
