"""Router test variants: small ONNX graphs that share one signature (x: FP32
[batch, 4] -> y: FP32 [batch, 3]): y is row ``int(x[:, 0])`` of a table. The
healthy variants' tables have 100 rows; the faulty one's has 10, so ONNX
Runtime fails every request whose x[0] is 10 or more (a share of the inputs).
"""

from __future__ import annotations

import numpy as np


def table_model(path, rows: int, seed: int) -> str:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = np.random.default_rng(seed).normal(size=(rows, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["x", "zero"], ["first"], axis=1),
        helper.make_node("Cast", ["first"], ["idx"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "idx"], ["y"], axis=0),
    ]
    graph = helper.make_graph(
        nodes, "table",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array(0, np.int64), "zero")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return str(path)


def expected(path: str, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def rows(n: int, rng, high: int = 10) -> np.ndarray:
    x = rng.uniform(0, 1, size=(n, 4)).astype(np.float32)
    x[:, 0] = rng.integers(0, high, size=n)
    return x

