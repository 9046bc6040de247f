"""Small ONNX models whose signatures differ from _router_models.table_model's
(x: FP32 [batch, 4] -> y: FP32 [batch, 3]) in one chosen way: y = cast(x) @ W."""

from __future__ import annotations

import numpy as np


def matmul_model(path, *, x_type: str = "FLOAT", x_name: str = "x", y_name: str = "y", extra_output: str = "") -> str:
    """x (``x_type``, [batch, 4]) -> ``y_name`` FP32 [batch, 3]; with
    ``extra_output``, a second output of that name, FP32 [batch, 3]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    nodes = [helper.make_node("Cast", [x_name], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["xf", "w"], [y_name])]
    outputs = [helper.make_tensor_value_info(y_name, TensorProto.FLOAT, ["batch", 3])]
    if extra_output:
        nodes.append(helper.make_node("Identity", [y_name], [extra_output]))
        outputs.append(helper.make_tensor_value_info(extra_output, TensorProto.FLOAT, ["batch", 3]))
    graph = helper.make_graph(
        nodes, "matmul",
        [helper.make_tensor_value_info(x_name, getattr(TensorProto, x_type), ["batch", 4])],
        outputs, initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return str(path)
