"""A signature read from an ONNX file's graph equals the one ONNX Runtime
gives once the model is loaded."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from flywheel.protocol.errors import ConfigError
from flywheel.runtime.backends.onnx_backend import OnnxRuntimeBackend
from flywheel.runtime.onnx_signature import read_onnx_signature

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "integration"))
from _signature_models import matmul_model  # noqa: E402


@pytest.mark.parametrize("kwargs", [{}, {"x_type": "DOUBLE"}, {"x_type": "INT64", "x_name": "features"},
                                    {"extra_output": "p"}])
def test_the_graph_signature_is_onnx_runtimes(tmp_path, kwargs):
    path = matmul_model(tmp_path / "m.onnx", **kwargs)
    loaded = OnnxRuntimeBackend(path)
    loaded.load()
    assert read_onnx_signature(path) == loaded.signature


def test_a_file_that_is_not_onnx_is_a_config_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="not a readable ONNX model"):
        read_onnx_signature(str(bad))
