"""Pre/post steps (runtime/backends/steps.py) and pipelines
(runtime/backends/pipeline.py) around real ONNX Runtime models made here,
with user step classes written into tmp_path; no server, no Ray."""

from __future__ import annotations

import textwrap
from types import SimpleNamespace

import msgspec
import numpy as np
import pytest

from flywheel.protocol.errors import ConfigError, ErrorCode, FlywheelError
from flywheel.runtime.backends import get_backend
from flywheel.runtime.backends.onnx_backend import OnnxRuntimeConfig
from flywheel.runtime.backends.pipeline import PipelineBackend
from flywheel.runtime.backends.python_backend import PythonModelConfig
from flywheel.runtime.backends.steps import StepConfig, StepsBackend, check_steps

W = np.arange(12, dtype=np.float32).reshape(4, 3) / 10


def onnx_model(path, *, x: str = "x", y: str = "y", cols=(4, 3), w: np.ndarray = W, out_cols=None) -> str:
    """``y = x @ w``: x FP32 [batch, cols[0]] -> y FP32 [batch, out_cols or cols[1]]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", [x, "w"], [y])], "matmul",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", cols[0]])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["batch", out_cols or cols[1]])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return str(path)


def ort(path: str):
    return get_backend("onnxruntime").create(path, SimpleNamespace(onnxruntime=OnnxRuntimeConfig()))


STEPS = """
import numpy as np
from flywheel.protocol.errors import InvalidInputError

class Scale:                        # x FP64 [n, 4] -> x FP32 [n, 4], times kwargs.scale
    def load(self, artifacts, config):
        self.scale = config["kwargs"]["scale"]
        self.files = sorted(artifacts)
    def process(self, inputs):
        x = inputs["x"]
        if (x < -100).any():
            raise ValueError("x below -100")
        if (x > 100).any():
            raise InvalidInputError("x above 100 is not allowed")
        return {"x": (x * self.scale).astype(np.float32)}

class Names:                        # y FP32 [n, 3] -> label BYTES [n]
    def process(self, inputs):
        names = np.array([b"a", b"b", b"c"], dtype=object)
        return {"label": names[inputs["y"].argmax(axis=1)]}

class KeepsFloat64:
    def process(self, inputs):
        return {"x": inputs["x"]}

class WrongName:
    def process(self, inputs):
        return {"lbl": np.array([b""] * len(inputs["y"]), dtype=object)}

class OneRowShort:
    def process(self, inputs):
        return {"x": inputs["x"][1:].astype(np.float32)}
"""

PRE_IN = [{"name": "x", "datatype": "FP64", "shape": [-1, 4]}]
POST_OUT = [{"name": "label", "datatype": "BYTES", "shape": [-1]}]


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "steps.py").write_text(textwrap.dedent(STEPS))
    onnx_model(tmp_path / "model.onnx")
    return tmp_path


def step(doc: dict) -> StepConfig:
    return msgspec.convert(doc, StepConfig)


def wrapped(folder, pre: dict | None = None, post: dict | None = None) -> StepsBackend:
    b = StepsBackend(ort(str(folder / "model.onnx")), name="m", version="1", folder=str(folder),
                     preprocess=step(pre) if pre else None, postprocess=step(post) if post else None)
    b.load()
    return b


def test_steps_around_an_onnx_model_show_the_outer_signature_and_run_on_the_batch(folder):
    b = wrapped(folder, {"class": "steps:Scale", "kwargs": {"scale": 2.0}, "inputs": PRE_IN},
                {"class": "steps:Names", "outputs": POST_OUT})
    b.warmup((1, 3))
    assert [(t.name, t.datatype, t.shape) for t in b.signature.inputs] == [("x", "FP64", (-1, 4))]
    assert [(t.name, t.datatype, t.shape) for t in b.signature.outputs] == [("label", "BYTES", (-1,))]
    assert b.platform == "onnx_onnxv1"
    x = np.array([[1, 0, 0, 0], [0, 0, 0, -1]], np.float64)
    want = np.array([b"abc"[i:i + 1] for i in ((x * 2).astype(np.float32) @ W).argmax(axis=1)], dtype=object)
    assert b.infer({"x": x})["label"].tolist() == want.tolist()
    assert "model.onnx" in b._pre.obj.files  # load() got the model folder's files


def test_only_a_preprocess_step_keeps_the_models_outputs(folder):
    b = wrapped(folder, {"class": "steps:Scale", "kwargs": {"scale": 1.0}, "inputs": PRE_IN})
    b.warmup((2,))
    assert [t.name for t in b.signature.outputs] == ["y"]
    np.testing.assert_allclose(b.infer({"x": np.ones((1, 4))})["y"], np.ones((1, 4), np.float32) @ W)


@pytest.mark.parametrize("pre, post, expected", [
    ({"class": "steps:KeepsFloat64", "inputs": PRE_IN}, None,
     "model 'm': preprocess step 'steps:KeepsFloat64': output 'x' has datatype FP64 (numpy float64); "
     "expected FP32 (the model's inputs[0].datatype)"),
    (None, {"class": "steps:WrongName", "outputs": POST_OUT},
     "model 'm': postprocess step 'steps:WrongName': process returned the outputs ['lbl']; expected ['label'] "
     "(postprocess.outputs); missing ['label']; not declared ['lbl']"),
    ({"class": "steps:OneRowShort", "inputs": PRE_IN}, None,
     "model 'm': preprocess step 'steps:OneRowShort': output 'x' has 1 rows for 2 input rows"),
])
def test_a_step_answering_off_the_next_stage_fails_the_load_at_warm_up(folder, pre, post, expected):
    b = wrapped(folder, pre, post)
    with pytest.raises(ConfigError, match="at warm-up") as err:
        b.warmup((2,))
    assert err.value.message.startswith(expected)


def test_a_failing_step_fails_its_batch_only_and_keeps_its_error_kind(folder):
    b = wrapped(folder, {"class": "steps:Scale", "kwargs": {"scale": 1.0}, "inputs": PRE_IN},
                {"class": "steps:Names", "outputs": POST_OUT})
    with pytest.raises(FlywheelError) as err:
        b.infer({"x": np.full((1, 4), -500.0)})
    assert err.value.code == ErrorCode.INTERNAL
    assert err.value.message == "model 'm': preprocess step 'steps:Scale': process raised ValueError: x below -100"
    with pytest.raises(FlywheelError) as err:
        b.infer({"x": np.full((1, 4), 500.0)})
    assert err.value.code == ErrorCode.INVALID_ARGUMENT
    assert b.infer({"x": np.ones((1, 4))})["label"].shape == (1,)


def test_a_step_class_that_is_missing_fails_the_load_naming_the_field(folder):
    with pytest.raises(ConfigError, match=r"model 'm': preprocess.class 'steps:Nope': module 'steps' .* has no 'Nope'"):
        wrapped(folder, {"class": "steps:Nope", "inputs": PRE_IN})


@pytest.mark.parametrize("pre, post, expected", [
    ({"class": "steps:Scale"}, None, "preprocess.inputs is required"),
    ({"class": "steps:Scale", "inputs": PRE_IN, "outputs": POST_OUT}, None, "preprocess.outputs must not be given"),
    (None, {"class": "steps", "outputs": POST_OUT}, "postprocess.class 'steps' must be 'module:ClassName'"),
    (None, {"class": "s:C", "outputs": [{"name": "y", "datatype": "FP99", "shape": [-1]}]},
     r"postprocess.outputs\[0\].datatype 'FP99' unknown"),
])
def test_step_configs_are_checked_naming_the_field(pre, post, expected):
    with pytest.raises(ConfigError, match=expected):
        check_steps(step(pre) if pre else None, step(post) if post else None)


# --- pipelines ----------------------------------------------------------------------------

HEAD = """
import numpy as np

class Head:
    def predict(self, inputs):
        h = inputs["h"]
        if (h > 1e6).any():
            raise ValueError("h too large")
        return {"label": np.where(h.sum(axis=1) > 0, b"up", b"down").astype(object)}
"""
HEAD_IO = {"inputs": [{"name": "h", "datatype": "FP32", "shape": [-1, 3]}],
           "outputs": [{"name": "label", "datatype": "BYTES", "shape": [-1]}]}


def python_stage(folder, name="head"):
    folder.mkdir()
    (folder / "head.py").write_text(textwrap.dedent(HEAD))
    cfg = msgspec.convert({"class": "head:Head", "batched": True, **HEAD_IO}, PythonModelConfig)
    return get_backend("python").create(str(folder), SimpleNamespace(name=name, version="1", python=cfg))


def test_two_onnx_stages_chain_by_name_inside_one_backend(tmp_path):
    w2 = np.eye(3, 2, dtype=np.float32)
    p = PipelineBackend("p", [("a", ort(onnx_model(tmp_path / "a.onnx", y="h"))),
                              ("b", ort(onnx_model(tmp_path / "b.onnx", x="h", cols=(3, 2), w=w2)))])
    p.load()
    p.warmup((1, 4))
    assert p.platform == "pipeline"
    assert [t.name for t in p.signature.inputs] == ["x"] and [t.name for t in p.signature.outputs] == ["y"]
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    np.testing.assert_allclose(p.infer({"x": x})["y"], (x @ W) @ w2, rtol=1e-5)


def test_an_onnx_stage_then_a_python_stage_give_bytes_labels(tmp_path):
    p = PipelineBackend("p", [("embed", ort(onnx_model(tmp_path / "a.onnx", y="h"))),
                              ("head", python_stage(tmp_path / "head"))])
    p.load()
    p.warmup((2,))
    x = np.array([[1, 1, 1, 1], [-1, -1, -1, -1]], np.float32)
    assert p.infer({"x": x})["label"].tolist() == [b"up", b"down"]
    with pytest.raises(FlywheelError, match=r"^model 'p': pipeline\[1\] \('head'\): model 'head': predict raised "
                                             "ValueError: h too large$"):
        p.infer({"x": np.full((1, 4), 1e7, np.float32)})
    assert p.infer({"x": x[:1]})["label"].tolist() == [b"up"]  # the next batch still runs


def test_a_stage_input_that_no_output_feeds_fails_the_load_naming_both_stages(tmp_path):
    p = PipelineBackend("p", [("embed", ort(onnx_model(tmp_path / "a.onnx", y="z"))),
                              ("head", python_stage(tmp_path / "head"))])
    with pytest.raises(ConfigError, match=r"model 'p': pipeline\[1\] \('head'\): input 'h' \(inputs\[0\]\) is no "
                                          r"output of the stage before \('embed'\), whose outputs are \['z'\]"):
        p.load()


def test_a_stage_output_of_the_wrong_width_fails_the_load(tmp_path):
    p = PipelineBackend("p", [("embed", ort(onnx_model(tmp_path / "a.onnx", y="h", cols=(4, 2), w=W[:, :2]))),
                              ("head", python_stage(tmp_path / "head"))])
    with pytest.raises(ConfigError, match=r"input 'h' is fed by output 'h' of 'embed' with shape \[-1, 2\], "
                                          r"expected \[-1, 3\]"):
        p.load()
