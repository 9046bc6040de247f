"""What happens to one batch of streamed rows: pure NumPy (and Pillow)
functions that Ray Data runs on the cluster, and that tests and the driver
call directly on small samples. No Ray here.

Every function returns a batch ``{"x": FP32 [n, *row_shape], "y": labels}``
(int64 class ids, or float32 values for task regression), already cut to
one split (``"train"`` or ``"validation"``).

The split is decided row by row with no global view of the data, so that
nothing has to be materialised: every row has a 64-bit key (its index in
its file, its file's path, or its values: see the callers), mixed with the
job's seed; a row whose mixed key falls below ``fraction`` of the 64-bit
range is held out. The same rows are held out on every pass and every
attempt, and about ``fraction`` of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from flywheel.protocol.errors import ConfigError, InvalidInputError

SPLITS = ("train", "validation")
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, elementwise on uint64 (wrap-around is the point)."""
    with np.errstate(over="ignore"):
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))


def held_out(keys: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """Boolean mask: True where the row of that key is a validation row."""
    with np.errstate(over="ignore"):
        salt = _mix(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) + _GOLDEN)
        mixed = _mix(np.asarray(keys, dtype=np.uint64) ^ salt)
    # the top 53 bits as a uniform number in [0, 1)
    return (mixed >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


def index_keys(file_index: int, start: int, n: int) -> np.ndarray:
    """Keys of rows ``start .. start+n`` of file number ``file_index``."""
    return (np.uint64(file_index) << np.uint64(40)) | np.arange(start, start + n, dtype=np.uint64)


def path_keys(paths: Sequence[str]) -> np.ndarray:
    """Keys of files by their path (as the driver lists them)."""
    return np.array([int.from_bytes(hashlib.blake2b(p.encode(), digest_size=8).digest(), "little")
                     for p in paths], dtype=np.uint64)


def value_keys(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Keys of rows by their values (features and label): equal rows get
    equal keys, so a duplicated row never lands in both splits."""
    n = len(x)
    words = np.ascontiguousarray(x, dtype=np.float32).reshape(n, -1).view(np.uint32)
    h = np.full(n, _GOLDEN, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for column in words.T:
            h = _mix(h ^ column.astype(np.uint64))
        label = np.ascontiguousarray(y, dtype=np.float64).view(np.uint64)
        return _mix(h ^ label)


def _labels(y: np.ndarray, regression: bool, where: str) -> np.ndarray:
    if regression:
        if y.dtype.kind not in "iuf":
            raise InvalidInputError(f"{where} must hold numbers for task regression, not {y.dtype}")
        y = y.astype(np.float32)
        if not np.isfinite(y).all():
            raise InvalidInputError(f"{where}: regression labels must be finite numbers")
        return y
    if y.dtype.kind not in "iu":
        raise InvalidInputError(f"{where} must hold integer class ids, not {y.dtype} "
                                "(task: regression takes real-valued labels)")
    y = y.astype(np.int64)
    if len(y) and y.min() < 0:
        raise InvalidInputError(f"{where}: class ids must be >= 0")
    return y


def _cut(x: np.ndarray, y: np.ndarray, keys: np.ndarray, split: str, seed: int, fraction: float) -> dict:
    val = held_out(keys, seed, fraction)
    keep = val if split == "validation" else ~val
    return {"x": x[keep], "y": y[keep]}


def table_rows(batch: Mapping[str, np.ndarray], *, features: Sequence[str], label: str, regression: bool,
               split: str, seed: int, fraction: float) -> dict:
    """A batch of Parquet/CSV columns -> that split's rows (row shape
    ``[len(features)]``), keyed by their values."""
    columns = list(batch)
    if label not in batch:
        raise InvalidInputError(f"dataset.label {label!r} is not a column; columns: {columns}")
    missing = [c for c in features if c not in batch]
    if missing:
        raise InvalidInputError(f"dataset.features {missing} are not columns; columns: {columns}")
    try:
        x = np.stack([np.asarray(batch[c], dtype=np.float32) for c in features], axis=1)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"dataset.features must be numeric: {exc}") from None
    y = _labels(np.asarray(batch[label]), regression, f"dataset.label {label!r}")
    return _cut(x, y, value_keys(x, y), split, seed, fraction)


def npy_rows(batch: Mapping[str, np.ndarray], *, regression: bool, split: str, seed: int,
             fraction: float) -> dict:
    """A batch of chunk descriptions (``features``, ``labels``: paths;
    ``file``: the pair's number; ``start``/``stop``: its rows) -> that
    split's rows, read through a memory map (only the chunk is read)."""
    xs, ys = [], []
    for f, lab, i, a, b in zip(batch["features"], batch["labels"], batch["file"], batch["start"], batch["stop"]):
        a, b = int(a), int(b)
        x = np.asarray(np.load(str(f), mmap_mode="r")[a:b], dtype=np.float32)
        y = _labels(np.asarray(np.load(str(lab), mmap_mode="r")[a:b]), regression, f"dataset.labels_path {lab}")
        cut = _cut(x, y, index_keys(int(i), a, b - a), split, seed, fraction)
        xs.append(cut["x"])
        ys.append(cut["y"])
    return {"x": np.concatenate(xs), "y": np.concatenate(ys)}


def image_rows(batch: Mapping[str, np.ndarray], *, size: Sequence[int], mode: str) -> dict:
    """A batch of ``path``/``label`` items (already one split: the driver
    splits the file listing) -> decoded images, FP32 ``[C, H, W]`` in
    [0, 1], resized to ``size`` = (height, width)."""
    from PIL import Image, UnidentifiedImageError

    height, width = (int(d) for d in size)
    out = []
    for path in batch["path"]:
        try:
            with Image.open(str(path)) as img:
                img = img.convert("L" if mode == "grayscale" else "RGB").resize((width, height), Image.BILINEAR)
                pixels = np.asarray(img, dtype=np.float32) / 255.0
        except (OSError, UnidentifiedImageError) as exc:
            raise InvalidInputError(f"dataset: cannot decode image {path}: {exc}") from None
        out.append(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1))
    return {"x": np.stack(out).astype(np.float32), "y": np.asarray(batch["label"], dtype=np.int64)}


def split_counts(batch: Mapping[str, np.ndarray], **kwargs) -> dict:
    """Rows per split and the largest label of a batch of Parquet/CSV
    columns (``kwargs`` as :func:`table_rows`'s, without ``split``): the
    only numbers the driver gathers from a whole streamed pass."""
    counts = {}
    top = -1.0
    for split in SPLITS:
        rows = table_rows(batch, split=split, **kwargs)
        counts[split] = [len(rows["y"])]
        if len(rows["y"]):
            top = max(top, float(rows["y"].max()))
    return {**counts, "max_label": [top]}


def apply_transform(fn: Callable, x: np.ndarray, field: str = "dataset.transform") -> np.ndarray:
    """``fn(x)`` checked: an array of x's shape (cast to FP32)."""
    out = fn(x)
    if not isinstance(out, np.ndarray) or out.shape != x.shape:
        got = getattr(out, "shape", type(out).__name__)
        raise ConfigError(f"{field} must return a NumPy array of the batch's shape {x.shape}; it returned {got}")
    return np.ascontiguousarray(out, dtype=np.float32)
