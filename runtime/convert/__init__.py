"""Models of other frameworks, converted to ONNX and checked for parity.

Each framework is one module of this package, registered by name in
:data:`FRAMEWORKS` (import path of its converter object, loaded on first use):

- ``xgboost``: XGBoost's own ``.json`` / ``.ubj`` model files;
- ``lightgbm``: LightGBM's text model file (``.txt``);
- ``sklearn``: an estimator in memory, or returned by a ``module:function``
  the user names (scikit-learn saves only pickles, which are never loaded).

The converted model takes ``input`` (FP32 [-1, n_features]) and gives
``label`` (INT64) and ``probabilities`` (FP32 [-1, classes]) for a
classifier, ``predictions`` (FP32 [-1, 1]) for a regressor, so the
onnxruntime backend serves it as it is. Before a result is returned the
original and the ONNX model are run on sample rows (a .npy/.csv file, or
rows generated from the model's own split thresholds) and must agree within a
tolerance; ``Converted.register`` then records it in a registry.

Needs the convert extra: pip install 'flywheel-ml[convert]'.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from flywheel.protocol.errors import ConfigError
from flywheel.runtime.convert.common import DEFAULT_TOLERANCE, Converted, Framework, Parity, check_source, convert

__all__ = ["DEFAULT_TOLERANCE", "FRAMEWORKS", "Converted", "Parity", "convert_file", "convert_sklearn",
           "convert_sklearn_factory", "get_framework"]

# name -> "module:attribute" of its converter; a new framework is one module plus one line here
FRAMEWORKS: dict[str, str] = {
    "sklearn": "flywheel.runtime.convert.from_sklearn:FRAMEWORK",
    "xgboost": "flywheel.runtime.convert.from_xgboost:FRAMEWORK",
    "lightgbm": "flywheel.runtime.convert.from_lightgbm:FRAMEWORK",
}


def get_framework(name: str) -> Framework:
    """The converter registered as ``name``; ConfigError listing the known ones."""
    if name not in FRAMEWORKS:
        raise ConfigError(f"framework {name!r} unknown; allowed: {', '.join(FRAMEWORKS)}")
    module, _, attr = FRAMEWORKS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def convert_file(framework: str, path: str, *, sample: str | None = None,
                 tolerance: float = DEFAULT_TOLERANCE, flag: str | None = None) -> Converted:
    """Convert the model file at ``path``, saved natively by ``framework``
    (xgboost: .json/.ubj, lightgbm: .txt), after checking parity on
    ``sample`` (a .npy or .csv file of rows) or on generated rows.

    Raises ConfigError (naming ``flag``, default ``--from-<framework>``) for a
    pickle, a missing or unreadable file or an unsupported model, and
    PreconditionFailedError when the ONNX model disagrees with the original by
    more than ``tolerance``. Thread-safe as far as the libraries are."""
    fw = get_framework(framework)
    flag = flag or f"--from-{framework}"
    if not fw.suffixes:
        raise ConfigError(f"{flag}: {framework} models are not read from files")
    check_source(path, fw, flag)
    model = fw.load(path)
    return convert(fw, model, sample=sample, tolerance=tolerance, source_path=path,
                   source_file=path.replace("\\", "/").rsplit("/", 1)[-1])


def convert_sklearn(estimator: Any, sample_rows: np.ndarray | None = None, *,
                    tolerance: float = DEFAULT_TOLERANCE, source: str = "") -> Converted:
    """Convert a fitted scikit-learn classifier or regressor (or a Pipeline
    ending in one) held in memory, checking parity on ``sample_rows`` (an
    array [N, n_features]; standard normal rows when None: pass real rows
    where the features are far from that scale). ``source`` is recorded as
    the source_file tag. Errors as :func:`convert_file`."""
    fw = get_framework("sklearn")
    if sample_rows is None:
        return convert(fw, estimator, sample=None, tolerance=tolerance, source_file=source)
    rows = np.asarray(sample_rows)
    n = fw.n_features(estimator)
    if rows.ndim != 2 or rows.shape[0] == 0 or rows.shape[1] != n or not np.issubdtype(rows.dtype, np.number):
        raise ConfigError(f"sample_rows: expected numbers of shape [N, {n}], N >= 1; got {rows.dtype} "
                          f"{list(rows.shape)}")
    return convert(fw, estimator, sample=None, rows=rows.astype(np.float32), tolerance=tolerance,
                   source_file=source)


def convert_sklearn_factory(target: str, *, sample: str | None = None, tolerance: float = DEFAULT_TOLERANCE,
                            flag: str = "--from-sklearn") -> Converted:
    """Call ``module:function`` (see from_sklearn.load_factory) for the fitted
    estimator and convert it as :func:`convert_sklearn`, with rows from the
    ``sample`` file when given; the module file's sha256 is recorded as the
    source's."""
    from flywheel.runtime.convert.from_sklearn import load_factory

    estimator, module_file = load_factory(target, flag)
    return convert(get_framework("sklearn"), estimator, sample=sample, tolerance=tolerance, source_file=target,
                   source_sha256_of=module_file)
