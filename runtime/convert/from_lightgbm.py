"""LightGBM models from LightGBM's text model file (``save_model`` to
``.txt``), converted with onnxmltools, probabilities as a plain tensor
(no ZipMap).

Classifiers are the ``binary`` and ``multiclass``/``multiclassova``
objectives; anything else converts as a regressor, and the parity check
judges the result.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flywheel.protocol.errors import ConfigError
from flywheel.runtime.convert.common import INPUT_NAME, TARGET_OPSET, need


class LightGBM:
    name = "lightgbm"
    suffixes = (".txt",)

    def load(self, path: str) -> Any:
        (lgb,) = need(("lightgbm",), "--from-lightgbm")
        try:
            return lgb.Booster(model_file=path)
        except Exception as exc:  # noqa: BLE001 - LightGBMError and its kin: the file is not a model
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"{path!r} is not a LightGBM text model LightGBM can read: {first}") from None

    def task(self, booster: Any) -> str:
        objective = str(booster.dump_model(num_iteration=0).get("objective", "")).split(" ")[0]
        return "classifier" if objective in ("binary", "multiclass", "multiclassova") else "regressor"

    def n_features(self, booster: Any) -> int:
        return int(booster.num_feature())

    def thresholds(self, booster: Any) -> list[list[float]] | None:
        cuts: list[list[float]] = [[] for _ in range(self.n_features(booster))]
        stack = [t["tree_structure"] for t in booster.dump_model()["tree_info"]]
        while stack:
            node = stack.pop()
            if "split_feature" not in node:
                continue  # a leaf
            if node.get("decision_type") == "<=":  # categorical splits list categories, not a number
                cuts[node["split_feature"]].append(float(node["threshold"]))
            stack += [node["left_child"], node["right_child"]]
        return cuts

    def reference(self, booster: Any, rows: np.ndarray) -> np.ndarray:
        return booster.predict(rows)

    def to_onnx(self, booster: Any, n_features: int) -> Any:
        onnxmltools, _ = need(("onnxmltools", "lightgbm"), "--from-lightgbm")
        from onnxmltools.convert.common.data_types import FloatTensorType

        if booster.pandas_categorical:
            raise ConfigError("LightGBM model with pandas categorical features: not supported (its ONNX input "
                              "is one FP32 tensor)")
        return onnxmltools.convert_lightgbm(booster, initial_types=[(INPUT_NAME, FloatTensorType([None, n_features]))],
                                            target_opset=TARGET_OPSET, zipmap=False)

    def versions(self) -> tuple[str, str]:
        onnxmltools, lgb = need(("onnxmltools", "lightgbm"), "--from-lightgbm")
        return lgb.__version__, f"onnxmltools {onnxmltools.__version__}"


FRAMEWORK = LightGBM()
