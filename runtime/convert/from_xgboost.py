"""XGBoost models from the files XGBoost saves natively (``save_model`` to
``.json`` or ``.ubj``), converted with onnxmltools.

Supported objectives: ``binary:logistic`` and ``multi:softprob``
(classifiers; XGBClassifier's defaults) and ``reg:*`` (regressors). Others
(``multi:softmax`` gives class ids, not probabilities) are refused by name.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from flywheel.protocol.errors import ConfigError
from flywheel.runtime.convert.common import INPUT_NAME, TARGET_OPSET, need

_CLASSIFIERS = ("binary:logistic", "multi:softprob")


class XGBoost:
    name = "xgboost"
    suffixes = (".json", ".ubj")

    def load(self, path: str) -> Any:
        (xgb,) = need(("xgboost",), "--from-xgboost")
        booster = xgb.Booster()
        try:
            booster.load_model(path)
        except Exception as exc:  # noqa: BLE001 - XGBoostError and its kin: the file is not a model
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"{path!r} is not an XGBoost model XGBoost can read: {first}") from None
        # onnxmltools reads splits by index ("f3"); names given at training
        # (a DataFrame's columns) would not parse, and the ONNX input is one tensor
        booster.feature_names = None
        booster.feature_types = None
        return booster

    def _objective(self, booster: Any) -> str:
        return json.loads(booster.save_config())["learner"]["objective"]["name"]

    def task(self, booster: Any) -> str:
        objective = self._objective(booster)
        if objective in _CLASSIFIERS:
            return "classifier"
        if objective.startswith("reg:"):
            return "regressor"
        raise ConfigError(f"XGBoost objective {objective!r} is not supported; supported: "
                          f"{', '.join(_CLASSIFIERS)}, reg:* (multi:softmax: train with multi:softprob, whose "
                          "argmax is the same class)")

    def n_features(self, booster: Any) -> int:
        return int(booster.num_features())

    def thresholds(self, booster: Any) -> list[list[float]] | None:
        raw = json.loads(bytes(booster.save_raw("json")))
        gb = raw["learner"]["gradient_booster"]
        trees = (gb.get("model") or gb.get("gbtree", {}).get("model") or {}).get("trees")
        if not trees:
            return None
        cuts: list[list[float]] = [[] for _ in range(self.n_features(booster))]
        for tree in trees:
            for feature, cond, left in zip(tree["split_indices"], tree["split_conditions"], tree["left_children"]):
                if left != -1:  # an inner node; a leaf's "condition" is its value
                    cuts[feature].append(float(cond))
        return cuts

    def reference(self, booster: Any, rows: np.ndarray) -> np.ndarray:
        (xgb,) = need(("xgboost",), "--from-xgboost")
        return booster.predict(xgb.DMatrix(rows))

    def to_onnx(self, booster: Any, n_features: int) -> Any:
        onnxmltools, _ = need(("onnxmltools", "xgboost"), "--from-xgboost")
        from onnxmltools.convert.common.data_types import FloatTensorType

        return onnxmltools.convert_xgboost(booster, initial_types=[(INPUT_NAME, FloatTensorType([None, n_features]))],
                                           target_opset=TARGET_OPSET)

    def versions(self) -> tuple[str, str]:
        onnxmltools, xgb = need(("onnxmltools", "xgboost"), "--from-xgboost")
        return xgb.__version__, f"onnxmltools {onnxmltools.__version__}"


FRAMEWORK = XGBoost()
