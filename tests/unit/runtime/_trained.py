"""Digits models trained for the quantization and edge-export tests."""

from __future__ import annotations

import numpy as np

MLP = {"in_features": 64, "hidden": [128, 64], "out_features": 10}
CNN = {"channels": 1, "size": 8, "classes": 10}


def train_onnx(arch: str, hparams: dict, x: np.ndarray, y: np.ndarray, epochs: int, path: str) -> str:
    """Train, write the ONNX export to ``path`` and the weights beside it
    (``.safetensors``); returns ``path``."""
    from flywheel.training.digits import train_classifier

    return train_classifier(arch, hparams, x, y, epochs, path)[0]
