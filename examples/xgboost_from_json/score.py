"""Score the held-out rows through the latest registered version of a model
(its model.onnx, with ONNX Runtime), and compare with XGBoost itself.

    python score.py MODEL_NAME
"""

import sys

import numpy as np
import onnxruntime as ort
import xgboost as xgb

from flywheel.common.settings import load_settings
from flywheel.registry import Registry

if len(sys.argv) != 2:
    sys.exit("usage: python score.py MODEL_NAME")
settings = load_settings()
registry = Registry.open(settings.registry_uri, settings.artifacts_uri)
try:
    latest = registry.list_versions(sys.argv[1])[-1]
    _, onnx_path = registry.artifact_path(latest.ref, "model.onnx")
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
finally:
    registry.close()
holdout = np.load("holdout.npz")
labels, probabilities = session.run(["label", "probabilities"], {"input": holdout["x"]})
booster = xgb.Booster(model_file="model.json")
agree = np.abs(probabilities[:, 1] - booster.predict(xgb.DMatrix(holdout["x"]))).max()
print(f"{latest.ref}: accuracy {np.mean(labels == holdout['y']):.3f} on {len(labels)} held-out rows; "
      f"largest difference from XGBoost {agree:.2g}")
