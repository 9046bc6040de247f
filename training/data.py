"""A job's data as NumPy arrays: loaded once, by the job's driver.

Every dataset kind ends as four arrays (train x/y, validation x/y) with a
fingerprint of exactly what was trained on, so that the registry's lineage
names the data, and the workers shard the same arrays deterministically
(see training/loop.py). Loading happens in the driver, once: the arrays go
to the workers through Ray's object store.

Data that does not fit in the driver (kinds npy and images, parquet/csv
with ``stream: true``) never comes here: training/streamed.py.

Kinds: ``digits`` (scikit-learn's bundled 8x8 digits, scaled to [0, 1]),
``parquet`` / ``csv`` (a file, a folder or a glob; every column but the
label is a feature unless ``features`` names them), ``ray`` (a Ray Data
Dataset handed to ``submit(..., dataset=ds)``, materialized here),
``captured`` (labelled inference captures of an endpoint, optionally mixed
with original data at a stated share: see DatasetSpec and
:func:`_captured`).
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
    """A job's rows. In memory: the four arrays hold every row. Streamed
    (training/streamed.py): ``datasets`` holds the Ray Data ``train`` and
    ``validation`` datasets, ``x_train``/``y_train`` only a bounded sample
    (rows flattened), the validation arrays are empty, and ``train_rows``,
    ``val_rows``, ``classes`` and ``row_shape`` come from metadata."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    fingerprint: str
    description: str
    train_rows: int = -1  # -1: len(x_train)
    val_rows: int = -1  # -1: len(x_val)
    classes: int = 0  # 0: from the labels at hand
    row_shape: tuple[int, ...] = ()  # () : x_train's
    datasets: dict[str, Any] | None = None

    @property
    def streamed(self) -> bool:
        return self.datasets is not None

    @property
    def n_train(self) -> int:
        return self.train_rows if self.train_rows >= 0 else len(self.x_train)

    @property
    def n_val(self) -> int:
        return self.val_rows if self.val_rows >= 0 else len(self.x_val)

    @property
    def n_classes(self) -> int:
        """Class ids 0 .. n-1 (classification)."""
        if self.classes:
            return self.classes
        return int(max(self.y_train.max(), self.y_val.max() if len(self.y_val) else 0)) + 1


def load_data(spec, *, seed: int, dataset: Any = None, regression: bool = False) -> JobData:
    """``spec``: a DatasetSpec. ``dataset``: the Ray Data Dataset of kind
    ``ray``. The validation split is a seeded permutation's tail.
    ``regression`` (the job's task): labels are any numbers, returned as
    float32 (MSE compares them with float outputs); otherwise integer class
    ids as int64. Kinds npy and images are streamed only (InvalidInputError:
    see training/streamed.py); parquet/csv with ``stream`` are read here in
    full all the same (a caller that wants arrays gets them)."""
    if spec.kind in ("npy", "images"):
        raise InvalidInputError(f"dataset.kind {spec.kind!r} is streamed to the training workers "
                                "(training/streamed.py), never loaded into one process's memory")
    x, y, what = _arrays(spec, seed, dataset, regression)
    if regression:
        y = y.astype(np.float32)
        if not np.isfinite(y).all():
            raise InvalidInputError(f"dataset {what}: regression labels must be finite numbers")
    if len(x) < 2:
        raise InvalidInputError(f"dataset {what} has {len(x)} rows; a job needs at least 2")
    idx = np.random.default_rng(seed).permutation(len(x))
    cut = len(x) - int(round(spec.validation_fraction * len(x)))
    tr, va = idx[:cut], idx[cut:]
    return JobData(x[tr], y[tr], x[va], y[va], fingerprint_arrays(x, y), what)


def _arrays(spec, seed: int, dataset: Any, regression: bool = False) -> tuple[np.ndarray, np.ndarray, str]:
    """(features float32, labels int64 (any numeric dtype for regression),
    description) of one dataset spec."""
    kind = spec.kind
    if kind == "digits":
        from sklearn.datasets import load_digits

        raw = load_digits()
        x, y = (raw.data / 16.0).astype(np.float32), raw.target.astype(np.int64)
        what = "sklearn digits (8x8, /16)"
    elif kind in ("parquet", "csv"):
        x, y = _from_frame(_read_files(kind, spec.path), spec, regression)
        what = f"{kind} {spec.path}"
    elif kind == "ray":
        if dataset is None:
            raise InvalidInputError(
                "dataset.kind 'ray' needs the Ray Data Dataset itself: submit(spec, dataset=ds) "
                "(it lives only in the process that submitted the job)"
            )
        x, y = _from_frame(dataset.to_pandas(), spec, regression)
        what = f"ray dataset ({dataset.count()} rows)"
    elif kind == "captured":
        return _captured(spec, seed)
    else:
        raise ConfigError(f"dataset.kind {kind!r} unknown")
    return x, y, what


def _captured(spec, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """The labelled captures of ``spec.endpoint`` (features: the captured
    input ``spec.input``, flattened per row), mixed with ``spec.mix`` so that
    captured rows make ``spec.captured_fraction`` of the result: all captured
    rows and a seeded sample of the original ones, or, when the original has
    too few rows for that share, all of it and a seeded sample of the
    captured rows. Captured rows come first, each part in its files' order.

    InvalidInputError: no labelled captured rows, an unknown input tensor,
    non-integer labels, or a feature width other than the original data's."""
    from flywheel.common.capture_files import read_captured

    cap = read_captured(spec.path, spec.endpoint, since=spec.since, until=spec.until or None, labelled=True)
    where = f"endpoint {spec.endpoint!r} under {spec.path!r} since {spec.since:g}"
    if len(cap) == 0:
        raise InvalidInputError(f"dataset: no labelled captured rows of {where} (labels arrive through "
                                "POST /v2/models/{name}/feedback with a label, or label files)")
    name = spec.input or (next(iter(cap.inputs)) if len(cap.inputs) == 1 else "")
    if name not in cap.inputs:
        raise InvalidInputError(f"dataset.input {spec.input!r}: choose one of the captured inputs "
                                f"{sorted(cap.inputs)}")
    feats = cap.inputs[name]
    if feats.dtype == object or feats.dtype.kind not in "biuf":
        raise InvalidInputError(f"dataset.input {name!r}: captured rows must be numeric tensors of one shape")
    if cap.labels.dtype != np.int64:
        raise InvalidInputError(f"dataset: the labels of {where} must be integer class ids")
    xc, yc = feats.reshape(len(cap), -1).astype(np.float32), cap.labels
    what = f"captured {spec.endpoint} since {spec.since:g} ({len(xc)} labelled rows"
    if spec.mix is None:
        return xc, yc, what + ")"
    xo, yo, orig = _arrays(spec.mix, seed, None)
    if xo.shape[1:] != xc.shape[1:]:
        raise InvalidInputError(f"dataset: captured input {name!r} has {xc.shape[1]} features per row, the "
                                f"original data ({orig}) {xo.shape[1]}")
    f = spec.captured_fraction
    want_orig = int(round(len(xc) * (1 - f) / f))
    rng = np.random.default_rng(seed)
    if want_orig <= len(xo):
        keep_c, keep_o = np.arange(len(xc)), np.sort(rng.choice(len(xo), want_orig, replace=False))
    else:
        n_c = max(1, int(round(len(xo) * f / (1 - f))))
        keep_c, keep_o = np.sort(rng.choice(len(xc), n_c, replace=False)), np.arange(len(xo))
    x = np.concatenate([xc[keep_c], xo[keep_o]])
    y = np.concatenate([yc[keep_c], yo[keep_o].astype(np.int64)])
    return x, y, f"{what}: {len(keep_c)} used) + {len(keep_o)} rows of {orig}"


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


def _from_frame(frame, spec, regression: bool = False) -> tuple[np.ndarray, np.ndarray]:
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
    if regression:
        if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
            raise InvalidInputError(f"dataset.label {spec.label!r} must hold numbers for task regression, "
                                    f"not {y.dtype}")
        return x, y.astype(np.float32)
    if not np.issubdtype(y.dtype, np.integer):
        raise InvalidInputError(f"dataset.label {spec.label!r} must hold integer class ids, not {y.dtype} "
                                "(task: regression takes real-valued labels)")
    return x, y.astype(np.int64)
