"""Models trained here on the digits data, shared by the quantization and
edge-export tests (int8 agreement is only meaningful on a model that has
learned something: an untrained one has near-tied logits)."""

from __future__ import annotations

import pytest
from _trained import CNN, MLP, train_onnx


@pytest.fixture(scope="session")
def digits():
    from flywheel.training.digits import load_digits_split

    return load_digits_split(0)


@pytest.fixture(scope="session")
def digits_mlp(digits, tmp_path_factory) -> str:
    xtr, ytr, _, _ = digits
    path = str(tmp_path_factory.mktemp("q") / "mlp.onnx")
    return train_onnx("mlp", MLP, xtr, ytr, 10, path)


@pytest.fixture(scope="session")
def digits_cnn(digits, tmp_path_factory) -> str:
    xtr, ytr, _, _ = digits
    path = str(tmp_path_factory.mktemp("q") / "cnn.onnx")
    return train_onnx("small_cnn", CNN, xtr.reshape(-1, 1, 8, 8), ytr, 15, path)
