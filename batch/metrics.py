"""Evaluation metrics over a run's output files (evaluation mode).

They are computed from what was written, not from the actors, so a resumed
run's metrics cover the partitions scored before the crash too. The labels
and the scored output of every row are held at once (AUC ranks them all):
a few bytes per row and class.
"""

from __future__ import annotations

import math

import numpy as np

from flywheel.protocol.errors import InvalidInputError


def _scores(col) -> np.ndarray:
    import pyarrow.types as pt

    if pt.is_fixed_size_list(col.type):
        return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
    if pt.is_list(col.type) or pt.is_large_list(col.type):
        return np.array(col.to_pylist(), dtype=np.float64)
    return col.to_numpy(zero_copy_only=False)


def read_columns(fs, paths: list[str], label: str, score: str) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    labels, scores = [], []
    for path in paths:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=[label, score])
        if table.num_rows == 0:
            continue
        lab = table.column(label).combine_chunks()
        if pa.types.is_dictionary(lab.type):
            lab = lab.dictionary_decode()
        labels.append(lab.to_numpy(zero_copy_only=False))
        scores.append(_scores(table.column(score).combine_chunks()))
    if not labels:
        return np.empty(0), np.empty(0)
    return np.concatenate(labels), np.concatenate(scores)


def class_indices(labels: np.ndarray, classes: list[str], k: int = 0) -> np.ndarray:
    """Labels as class indices: integer labels as they are; others by their
    position in ``classes``. Without ``classes``, string labels take the
    sorted order only when every one of the model's ``k`` classes occurs
    (with one missing, every later index would shift silently)."""
    if labels.dtype.kind in "iu":
        return labels.astype(np.int64)
    if labels.dtype.kind == "f":
        if np.isnan(labels).any():
            raise InvalidInputError(f"label: {int(np.isnan(labels).sum())} row(s) have no label (null)")
        if not np.all(labels == np.round(labels)):
            raise InvalidInputError("label: classification needs integer or string labels; got fractional values")
        return labels.astype(np.int64)
    if any(v is None for v in labels):
        raise InvalidInputError(f"label: {sum(v is None for v in labels)} row(s) have no label (null)")
    text = np.array([v.decode() if isinstance(v, bytes) else str(v) for v in labels], dtype=object)
    seen = sorted(set(text))
    if not classes and k and len(seen) != k:
        raise InvalidInputError(
            f"label: {len(seen)} distinct labels {seen[:10]} for a model with {k} classes; give classes "
            "(--classes) in the model's class-index order"
        )
    names = list(classes) or seen
    index = {c: i for i, c in enumerate(names)}
    unknown = sorted(set(text) - set(index))
    if unknown:
        raise InvalidInputError(f"label: value {unknown[0]!r} is not among classes {names[:10]}")
    return np.array([index[v] for v in text], dtype=np.int64)


def auc(positive: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties averaged); NaN when
    one class is absent."""
    from scipy.stats import rankdata

    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def probabilities(scores: np.ndarray) -> np.ndarray:
    """Rows that are not already probabilities (non-negative, summing to 1)
    through a softmax: one-vs-rest AUC compares one class's score across
    rows, which raw logits do not make comparable."""
    s = scores.astype(np.float64)
    if np.all(s >= 0) and np.allclose(s.sum(axis=1), 1.0, atol=1e-3):
        return s
    e = np.exp(s - s.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def classification(labels: np.ndarray, scores: np.ndarray, classes: list[str]) -> dict[str, float]:
    """Accuracy and AUC. Scores are a column per class (argmax; AUC one vs
    rest, macro), one column (a binary model: the positive class's
    probability, thresholded at 0.5, or its logit, at 0), or integer class
    ids (accuracy only)."""
    flat = scores.reshape(len(scores), -1) if scores.ndim > 1 else scores[:, None]
    k = flat.shape[1]
    if scores.dtype.kind in "iu" and k == 1:  # the model outputs a class id per row
        y = class_indices(labels, classes)
        return {"accuracy": float(np.mean(flat[:, 0].astype(np.int64) == y)), "rows": float(len(y))}
    y = class_indices(labels, classes, max(k, 2))
    if y.size and (y.min() < 0 or y.max() >= max(k, 2)):
        raise InvalidInputError(f"label: class {int(y.max())} is outside the model's {max(k, 2)} classes")
    if k == 1:
        p = flat[:, 0].astype(np.float64)
        threshold = 0.5 if p.size and p.min() >= 0 and p.max() <= 1 else 0.0
        out = {"accuracy": float(np.mean((p > threshold) == (y == 1))), "auc": auc(y == 1, p)}
    else:
        out = {"accuracy": float(np.mean(np.argmax(flat, axis=1) == y))}
        probs = probabilities(flat)
        if k == 2:
            out["auc"] = auc(y == 1, probs[:, 1])
        else:
            per_class = [auc(y == c, probs[:, c]) for c in range(k)]
            present = [a for a in per_class if not math.isnan(a)]
            if present:
                out["auc"] = float(np.mean(present))  # macro, one-vs-rest, over the classes seen
    out["rows"] = float(len(y))
    return {k_: v for k_, v in out.items() if not math.isnan(v)}


def regression(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    if labels.dtype.kind not in "iuf":
        raise InvalidInputError(f"label: regression needs numeric labels, got {labels.dtype}")
    if labels.dtype.kind == "f" and np.isnan(labels).any():
        raise InvalidInputError(f"label: {int(np.isnan(labels).sum())} row(s) have no label (null)")
    pred = scores.reshape(len(scores), -1)
    if pred.shape[1] != 1:
        raise InvalidInputError(f"score_output: regression needs one value per row, got {pred.shape[1]}")
    err = pred[:, 0].astype(np.float64) - labels.astype(np.float64)
    var = float(np.var(labels.astype(np.float64)))
    out = {"rmse": float(np.sqrt(np.mean(err**2))), "mae": float(np.mean(np.abs(err))), "rows": float(len(err))}
    if var > 0:
        out["r2"] = 1.0 - float(np.mean(err**2)) / var
    return out


def evaluate(labels: np.ndarray, scores: np.ndarray, task: str, classes: list[str]) -> dict[str, float]:
    """Metrics for ``task`` (auto: classification when the scored output has
    a column per class or is an integer class id; a single float column is
    taken for regression: say classification for a binary model)."""
    if len(labels) == 0:
        return {"rows": 0.0}
    if task == "auto":
        task = "classification" if (scores.ndim == 2 and scores.shape[1] > 1) or scores.dtype.kind in "iu" \
            else "regression"
    return classification(labels, scores, classes) if task == "classification" else regression(labels, scores)
