"""Models and data sets the batch inference tests make for themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def linear_onnx(path: Path, features: int = 8, classes: int = 3, seed: int = 0, layers: int = 0,
                hidden: int = 256) -> np.ndarray:
    """A classifier ``logits = x @ W`` (with ``layers`` hidden ReLU layers of
    ``hidden`` units before it, to make it slow on purpose); returns W."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((features, classes)).astype(np.float32)
    nodes, inits, last, width = [], [], "x", features
    for i in range(layers):
        h = (rng.standard_normal((width, hidden)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(h, f"H{i}"))
        nodes += [helper.make_node("MatMul", [last, f"H{i}"], [f"m{i}"]), helper.make_node("Relu", [f"m{i}"], [f"r{i}"])]
        last, width = f"r{i}", hidden
    if layers:
        w = rng.standard_normal((width, classes)).astype(np.float32)
    inits.append(numpy_helper.from_array(w, "W"))
    nodes.append(helper.make_node("MatMul", [last, "W"], ["logits"]))
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return w


def image_onnx(path: Path, channels: int = 3, size: int = 8, classes: int = 2) -> None:
    """An image classifier over [-1, C, H, W]: the mean of each channel,
    mapped to ``classes`` logits (channel 0's mean -> class 0, ...)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.zeros((channels, classes), dtype=np.float32)
    for c in range(min(channels, classes)):
        w[c, c] = 1.0
    nodes = [helper.make_node("ReduceMean", ["image", "axes"], ["m"], keepdims=0),
             helper.make_node("MatMul", ["m", "W"], ["logits"])]
    graph = helper.make_graph(
        nodes, "img", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", channels, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(path))


def parquet_files(folder: Path, w: np.ndarray, files: int = 3, rows: int = 1000, row_group: int = 250,
                  seed: int = 1, features: int | None = None) -> dict[int, int]:
    """Parquet files with ``id``, ``f0..`` and a label ``y`` = argmax(x @ W);
    returns id -> label."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    k = features or w.shape[0]
    labels = {}
    for i in range(files):
        x = rng.standard_normal((rows, k)).astype(np.float32)
        y = np.argmax(x[:, :w.shape[0]] @ w, axis=1) if features is None else rng.integers(0, w.shape[1], rows)
        ids = np.arange(i * rows, (i + 1) * rows, dtype=np.int64)
        table = pa.table({"id": ids, **{f"f{j}": x[:, j] for j in range(k)}, "y": y.astype(np.int64)})
        pq.write_table(table, folder / f"part-{i}.parquet", row_group_size=row_group)
        labels.update(zip(ids.tolist(), y.tolist()))
    return labels


def features_of(table, k: int) -> np.ndarray:
    return np.column_stack([table.column(f"f{j}").to_numpy() for j in range(k)]).astype(np.float32)
