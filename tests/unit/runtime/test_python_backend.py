"""The python backend on its own: a user class written into tmp_path, loaded,
checked and called as the model server would (no server, no Ray)."""

from __future__ import annotations

import sys
import textwrap
import threading
from types import SimpleNamespace

import msgspec
import numpy as np
import pytest

from flywheel.protocol.errors import ConfigError, FlywheelError, InvalidInputError
from flywheel.runtime.backends import get_backend
from flywheel.runtime.backends.python_backend import PythonModelConfig, import_class

SCALED = """
import numpy as np

class Scaled:
    def load(self, artifacts, config):
        self.w = np.load(artifacts["w.npy"])
        self.scale = np.float32(config["kwargs"].get("scale", 1.0))
        self.seen = config

    def predict(self, inputs):
        return {"y": (inputs["x"] @ self.w) * self.scale}
"""

IO = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
      "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]}


def model_dir(tmp_path, source: str, module: str = "scaled", name: str = "m"):
    folder = tmp_path / name
    folder.mkdir()
    (folder / f"{module}.py").write_text(textwrap.dedent(source))
    np.save(folder / "w.npy", np.arange(6, dtype=np.float32).reshape(3, 2))
    return folder


def backend(folder, python: dict, name: str = "m"):
    cfg = msgspec.convert(python, PythonModelConfig)
    model = SimpleNamespace(name=name, version="1", python=cfg)
    return get_backend("python").create(str(folder), model)


def test_a_user_class_loads_its_artifacts_and_answers(tmp_path):
    folder = model_dir(tmp_path, SCALED)
    b = backend(folder, {"class": "scaled:Scaled", "kwargs": {"scale": 2.0}, "batched": True, **IO})
    b.load()
    b.warmup((1, 4))
    x = np.ones((2, 3), np.float32)
    out = b.infer({"x": x})
    assert out["y"].tolist() == [[12.0, 18.0], [12.0, 18.0]]
    assert b._model.seen == {"name": "m", "version": "1", "kwargs": {"scale": 2.0}, "batched": True}
    assert b.platform == "python"
    assert b.merges_requests is True
    b.close()


def test_the_signature_may_come_from_the_class(tmp_path):
    folder = model_dir(tmp_path, SCALED.replace("class Scaled:", f"class Scaled:\n    signature = {IO!r}"))
    b = backend(folder, {"class": "scaled:Scaled"})
    b.load()
    assert [(t.name, t.datatype, t.shape) for t in b.signature.outputs] == [("y", "FP32", (-1, 2))]
    assert b.merges_requests is False  # batched is off unless asked for


def test_a_class_without_any_signature_is_refused_naming_both_places(tmp_path):
    b = backend(model_dir(tmp_path, SCALED), {"class": "scaled:Scaled"})
    with pytest.raises(ConfigError, match=r"model 'm': python.class 'scaled:Scaled' declares no signature: give "
                                          r"python.inputs and python.outputs"):
        b.load()


def test_a_module_that_does_not_import_names_the_model_and_python_class(tmp_path):
    b = backend(model_dir(tmp_path, "import not_a_module_anywhere\n"), {"class": "scaled:Scaled", **IO})
    with pytest.raises(ConfigError, match=r"model 'm': python.class 'scaled:Scaled': cannot import module 'scaled' "
                                          r"from the model folder .*ModuleNotFoundError"):
        b.load()


def test_a_missing_module_or_class_is_refused(tmp_path):
    folder = model_dir(tmp_path, SCALED)
    with pytest.raises(ConfigError, match=r"cannot import module 'nowhere_pkg.mod' from the installed packages"):
        backend(folder, {"class": "nowhere_pkg.mod:Scaled", **IO}).load()
    with pytest.raises(ConfigError, match=r"model 'm': python.class 'scaled:Nope': module 'scaled' .* has no 'Nope'"):
        backend(folder, {"class": "scaled:Nope", **IO}).load()
    with pytest.raises(ConfigError, match=r"python.class 'scaled:np' is a module, not a class"):
        backend(folder, {"class": "scaled:np", **IO}).load()


def test_an_installed_module_is_found_when_the_folder_has_none(tmp_path):
    # collections imports (from the installed library); Counter then fails the class check
    with pytest.raises(ConfigError, match=r"python.class 'collections:Counter' has no predict\(self, inputs\) method"):
        import_class("collections:Counter", str(tmp_path))


def test_a_folder_module_leaves_no_trace_and_two_models_keep_their_own(tmp_path):
    a = model_dir(tmp_path, SCALED, module="model", name="a")
    b = model_dir(tmp_path, SCALED.replace("* self.scale", "* self.scale * 10"), module="model", name="b")
    ba, bb = backend(a, {"class": "model:Scaled", **IO}), backend(b, {"class": "model:Scaled", **IO})
    ba.load()
    bb.load()
    x = np.ones((1, 3), np.float32)
    assert np.array_equal(bb.infer({"x": x})["y"], ba.infer({"x": x})["y"] * 10)
    assert "model" not in sys.modules
    assert str(a) not in sys.path and str(b) not in sys.path


def test_load_failure_names_the_model_and_the_error(tmp_path):
    folder = model_dir(tmp_path, SCALED.replace('artifacts["w.npy"]', 'artifacts["missing.npy"]'))
    with pytest.raises(ConfigError, match=r"model 'm': python.class 'scaled:Scaled': load\(\) raised KeyError"):
        backend(folder, {"class": "scaled:Scaled", **IO}).load()


@pytest.mark.parametrize(("body", "expected"), [
    ('return {"y": (inputs["x"] @ self.w).astype(np.float64)}',
     r"model 'm': output 'y' has datatype FP64 \(numpy float64\); expected FP32 \(python.outputs\[0\].datatype\)"),
    ('return {"z": inputs["x"] @ self.w}',
     r"model 'm': predict returned the outputs \['z'\]; expected \['y'\] \(python.outputs\); missing \['y'\]; "
     r"not declared \['z'\]"),
    ('return {"y": inputs["x"]}',
     r"model 'm': output 'y' has shape \[\d, 3\]; expected \[-1, 2\] \(-1 = any size\) \(python.outputs\[0\].shape\)"),
    ('return {"y": (inputs["x"] @ self.w)[:1]}', r"output 'y' has 1 rows for \d input rows; expected one output row"),
    ('return [inputs["x"] @ self.w]', r"predict returned a list; expected a dict of output name -> numpy array"),
    ('return {"y": (inputs["x"] @ self.w).tolist()}', r"output 'y' is a list; expected a numpy array of FP32"),
])
def test_outputs_off_the_signature_fail_the_load_at_warm_up(tmp_path, body, expected):
    source = SCALED.replace('return {"y": (inputs["x"] @ self.w) * self.scale}', body)
    b = backend(model_dir(tmp_path, source), {"class": "scaled:Scaled", "batched": True, **IO})
    b.load()
    with pytest.raises(ConfigError, match=expected) as info:
        b.warmup((2,))
    assert "at warm-up" in info.value.message


def test_a_failing_predict_fails_its_call_only(tmp_path):
    source = SCALED.replace("def predict(self, inputs):", "def predict(self, inputs):\n"
                            "        if inputs['x'][0, 0] < 0: raise ValueError('negative input')\n"
                            "        if inputs['x'][0, 0] > 100:\n"
                            "            from flywheel.protocol.errors import InvalidInputError\n"
                            "            raise InvalidInputError('x too large')")
    b = backend(model_dir(tmp_path, source), {"class": "scaled:Scaled", **IO})
    b.load()
    with pytest.raises(FlywheelError, match=r"model 'm': predict raised ValueError: negative input"):
        b.infer({"x": -np.ones((1, 3), np.float32)})
    with pytest.raises(InvalidInputError, match="x too large"):  # the class's own error passes as it is
        b.infer({"x": np.full((1, 3), 1000, np.float32)})
    assert b.infer({"x": np.ones((1, 3), np.float32)})["y"].shape == (1, 2)


ASYNC = """
import asyncio, threading
import numpy as np

class Slow:
    async def load(self, artifacts, config):
        self.loop_thread = threading.current_thread().name

    async def predict(self, inputs):
        await asyncio.sleep(0)
        self.predict_thread = threading.current_thread().name
        return {"y": inputs["x"][:, :2] * 2}

    def close(self):
        self.closed = True
"""


def test_an_async_predict_runs_on_the_models_own_loop_and_never_inline(tmp_path):
    b = backend(model_dir(tmp_path, ASYNC), {"class": "scaled:Slow", "batched": True, **IO})
    b.load()
    model = b._model
    assert b.infer({"x": np.ones((2, 3), np.float32)})["y"].tolist() == [[2, 2], [2, 2]]
    assert model.loop_thread == model.predict_thread == "flywheel-python-m"
    assert b.may_run_inline is False
    b.close()
    assert model.closed
    assert not any(t.name == "flywheel-python-m" for t in threading.enumerate())


def test_a_path_that_is_not_a_folder_is_refused(tmp_path):
    f = tmp_path / "model.py"
    f.write_text(SCALED)
    with pytest.raises(ConfigError, match=r"model 'm': path .* must be a folder"):
        backend(f, {"class": "model:Scaled", **IO})
