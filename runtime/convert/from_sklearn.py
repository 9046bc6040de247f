"""scikit-learn estimators, converted with skl2onnx (probabilities as a
plain tensor: ZipMap off).

scikit-learn saves only pickles (pickle, joblib), and a pickle runs whatever
code it holds when loaded, so no file is read here. An estimator arrives
either in memory (flywheel.runtime.convert.convert_sklearn, for notebooks) or
from a function the user names as ``module:function`` (the CLI's
``--from-sklearn``): the function is called with no arguments and returns the
fitted estimator, which it may build, fit or load however its author trusts.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import threading
from typing import Any

import numpy as np

from flywheel.protocol.errors import ConfigError
from flywheel.runtime.convert.common import INPUT_NAME, PICKLE_SUFFIXES, TARGET_OPSET, need

_TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_path_lock = threading.Lock()


def load_factory(target: str, flag: str = "--from-sklearn") -> tuple[Any, str]:
    """Call the function ``module:function`` (its module found in the current
    folder first, then among the installed packages) and return (the fitted
    estimator it returns, the module's file or ""). ConfigError naming
    ``flag`` for a pickle path, a malformed target or a failing function."""
    if target.lower().endswith(PICKLE_SUFFIXES):
        raise ConfigError(
            f"{flag} {target!r}: a pickle is never loaded: unpickling runs whatever code the file holds, and "
            "scikit-learn saves nothing else. Name a function instead (module:function, called with no "
            "arguments, returning the fitted estimator), or call convert_sklearn(estimator, rows) from Python")
    if not _TARGET.match(target):
        raise ConfigError(f"{flag} {target!r}: expected module:function (e.g. train_iris:build), a function "
                          "that returns the fitted estimator")
    module_name, _, func_name = target.partition(":")
    with _path_lock:
        here = os.getcwd()
        sys.path.insert(0, here)
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # noqa: BLE001 - user code: its own import errors alike
            raise ConfigError(
                f"{flag} {target!r}: cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
        finally:
            sys.path.remove(here)
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ConfigError(f"{flag} {target!r}: module {module_name!r} has no function {func_name!r}")
    try:
        estimator = func()
    except Exception as exc:  # noqa: BLE001 - user code
        raise ConfigError(f"{flag} {target!r}: the function raised {type(exc).__name__}: {exc}") from None
    return estimator, getattr(module, "__file__", None) or ""


class ScikitLearn:
    name = "sklearn"
    suffixes = ()  # no safe file format exists

    def load(self, path: str) -> Any:
        raise ConfigError("scikit-learn models are not read from files (pickles only); see load_factory")

    def task(self, estimator: Any) -> str:
        need(("sklearn",), "converting a scikit-learn model")
        import sklearn.base as sklearn_base

        if sklearn_base.is_classifier(estimator) and hasattr(estimator, "predict_proba"):
            return "classifier"
        if sklearn_base.is_regressor(estimator):
            return "regressor"
        raise ConfigError(f"scikit-learn model {type(estimator).__name__}: expected a fitted classifier with "
                          "predict_proba or a regressor (a Pipeline ending in one is fine)")

    def n_features(self, estimator: Any) -> int:
        n = getattr(estimator, "n_features_in_", None)
        if not isinstance(n, (int, np.integer)):
            raise ConfigError(f"scikit-learn model {type(estimator).__name__} is not fitted (no n_features_in_)")
        return int(n)

    def thresholds(self, estimator: Any) -> None:
        return None

    def reference(self, estimator: Any, rows: np.ndarray) -> np.ndarray:
        if self.task(estimator) == "classifier":
            return estimator.predict_proba(rows)
        return estimator.predict(rows)

    def to_onnx(self, estimator: Any, n_features: int) -> Any:
        skl2onnx, _ = need(("skl2onnx", "sklearn"), "converting a scikit-learn model")
        from skl2onnx.common.data_types import FloatTensorType

        options = {"zipmap": False} if self.task(estimator) == "classifier" else None
        return skl2onnx.to_onnx(estimator, initial_types=[(INPUT_NAME, FloatTensorType([None, n_features]))],
                                target_opset=TARGET_OPSET, options=options)

    def versions(self) -> tuple[str, str]:
        skl2onnx, sklearn = need(("skl2onnx", "sklearn"), "converting a scikit-learn model")
        return sklearn.__version__, f"skl2onnx {skl2onnx.__version__}"


FRAMEWORK = ScikitLearn()
