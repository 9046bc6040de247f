"""Write the example's tiny sentiment model (model.onnx) and its vocabulary
(vocab.txt) next to this file.

The model sums one embedding row per word id: ids (INT64 [batch, 8]) ->
scores (FP32 [batch, 3]) over negative / neutral / positive. Its weights
are set by hand (no training): each known word votes for one class, and
id 0 (padding, unknown words) leans slightly to neutral.
"""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
WORDS = {  # word -> the class it votes for
    "bad": 0, "awful": 0, "boring": 0, "terrible": 0, "hate": 0,
    "fine": 1, "okay": 1,
    "good": 2, "great": 2, "fun": 2, "love": 2, "wonderful": 2,
}


def build(folder: Path = HERE) -> Path:
    """Write model.onnx and vocab.txt into ``folder``; returns the model's path."""
    vocab = list(WORDS)
    table = np.zeros((len(vocab) + 1, 3), np.float32)
    table[0, 1] = 0.01
    for i, word in enumerate(vocab):
        table[i + 1, WORDS[word]] = 1.0
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["per_word"], axis=0),
         helper.make_node("ReduceSum", ["per_word", "axis"], ["scores"], keepdims=0)],
        "bag_of_words",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 8])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(table, "table"),
                     numpy_helper.from_array(np.array([1], np.int64), "axis")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    (folder / "vocab.txt").write_text("".join(f"{w}\n" for w in vocab), encoding="utf-8")
    path = folder / "model.onnx"
    onnx.save(model, str(path))
    return path


if __name__ == "__main__":
    print(f"wrote {build()}")
