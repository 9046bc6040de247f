"""Shared fixtures: small real ONNX models built once per test session."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="session")
def mlp_onnx(tmp_path_factory) -> str:
    """An untrained MLP 64 -> 32 -> 10 exported to ONNX (variable batch)."""
    import torch

    from flywheel.runtime.architectures import build
    from flywheel.runtime.export import export_onnx

    torch.manual_seed(0)
    module, sig = build("mlp", {"in_features": 64, "hidden": [32], "out_features": 10})
    path = tmp_path_factory.mktemp("models") / "mlp.onnx"
    return export_onnx(module, sig, str(path))


@pytest.fixture(scope="session")
def multi_type_onnx(tmp_path_factory) -> str:
    """An ONNX model with one input and one identity-like output per datatype,
    built with onnx.helper (each output = input, so values round-trip)."""
    import onnx
    from onnx import TensorProto, helper

    types = {
        "BOOL": TensorProto.BOOL, "UINT8": TensorProto.UINT8, "UINT16": TensorProto.UINT16,
        "UINT32": TensorProto.UINT32, "UINT64": TensorProto.UINT64, "INT8": TensorProto.INT8,
        "INT16": TensorProto.INT16, "INT32": TensorProto.INT32, "INT64": TensorProto.INT64,
        "FP16": TensorProto.FLOAT16, "FP32": TensorProto.FLOAT, "FP64": TensorProto.DOUBLE,
        "BYTES": TensorProto.STRING,
    }
    inputs, outputs, nodes = [], [], []
    for name, t in types.items():
        inputs.append(helper.make_tensor_value_info(f"in_{name}", t, ["batch", 2]))
        outputs.append(helper.make_tensor_value_info(f"out_{name}", t, ["batch", 2]))
        nodes.append(helper.make_node("Identity", [f"in_{name}"], [f"out_{name}"]))
    graph = helper.make_graph(nodes, "types", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("models") / "types.onnx"
    onnx.save(model, str(path))
    return str(path)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the session (skipped, with the reason,
    only where none can be started)."""
    from pg import PostgresServer  # tests/pg.py (tests/ is on sys.path via this conftest)

    server = PostgresServer()
    try:
        server.start()
    except RuntimeError as exc:
        server.stop()
        pytest.skip(f"PostgreSQL unavailable: {exc}")
    yield server
    server.stop()
