"""Custom Python models (``backend: python``) served like any other model.

A user class written into tmp_path as a module is configured by its import
path, colocated in a real ingress (no Ray) and called over HTTP with the V2
JSON protocol and with tritonclient; the config checks and the registry path
(a version whose artifacts hold the module) are tested without a server.
"""

from __future__ import annotations

import http.client
import json
import socket
import textwrap

import numpy as np
import pytest

from flywheel.common.settings import load_settings
from flywheel.protocol.errors import ConfigError
from flywheel.registry import Registry
from flywheel.serving.app import resolve_models
from flywheel.serving.config import RegistryConfig, ServerConfig, parse_config
from flywheel.serving.ingress import Ingress
from flywheel.serving.model_server import ModelServer, make_backend

LINEAR = """
import numpy as np

class ScaledLinear:
    def load(self, artifacts, config):
        self.w = np.load(artifacts["w.npy"])
        self.scale = np.float32(config["kwargs"]["scale"])

    def predict(self, inputs):
        x = inputs["x"]
        if (x < -1000).any():
            raise ValueError("x below -1000 is out of range")
        y = (x @ self.w) * self.scale
        if (x > 1000).any():
            y = y.astype(np.float64)  # a bug the server must report, not hide
        return {"y": y}
"""

ASYNC = """
import asyncio
import numpy as np

class Echo:
    signature = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
                 "outputs": [{"name": "sum", "datatype": "FP32", "shape": [-1]}]}

    async def predict(self, inputs):
        await asyncio.sleep(0)
        return {"sum": inputs["x"].sum(axis=1)}
"""

IO = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
      "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]}
W = np.arange(6, dtype=np.float32).reshape(3, 2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_model(folder, source: str, module: str):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{module}.py").write_text(textwrap.dedent(source))
    np.save(folder / "w.npy", W)
    return folder


def linear_model(folder, **extra) -> dict:
    return {"name": "linear", "version": "1", "path": str(folder), "backend": "python",
            "python": {"class": "linear_model:ScaledLinear", "batched": True, "kwargs": {"scale": 2.0}, **IO},
            **extra}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("python_models")
    cfg = parse_config({
        "server": {"port": free_port(), "grpc_port": -1},
        "models": [
            linear_model(write_model(root / "linear", LINEAR, "linear_model")),
            {"name": "echo", "version": "1", "path": str(write_model(root / "echo", ASYNC, "echo_model")),
             "backend": "python", "python": {"class": "echo_model:Echo"}},
        ],
    })
    ingress = Ingress(cfg.server, [], colocated=cfg.models)
    yield cfg.server.port
    ingress.close()


def request(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def infer(port: int, model: str, x: np.ndarray) -> tuple[int, dict]:
    return request(port, "POST", f"/v2/models/{model}/infer", {
        "inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]})


def test_a_user_class_answers_a_v2_json_request(server):
    x = np.array([[1, 2, 3], [0, -1, 0.5]], np.float32)
    status, body = infer(server, "linear", x)
    assert status == 200, body
    (out,) = body["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == ("y", "FP32", [2, 2])
    assert np.array(out["data"], np.float32).reshape(2, 2).tolist() == ((x @ W) * 2).tolist()


def test_metadata_shows_the_declared_signature(server):
    status, meta = request(server, "GET", "/v2/models/linear")
    assert status == 200
    assert meta["platform"] == "python"
    assert meta["inputs"] == IO["inputs"]
    assert meta["outputs"] == IO["outputs"]


def test_tritonclient_http_reads_the_signature_and_infers(server):
    tritonclient_http = pytest.importorskip("tritonclient.http")
    client = tritonclient_http.InferenceServerClient(url=f"127.0.0.1:{server}")
    try:
        assert client.is_model_ready("echo")
        meta = client.get_model_metadata("echo")
        assert meta["outputs"] == [{"name": "sum", "datatype": "FP32", "shape": [-1]}]
        x = np.array([[1, 2, 3], [4, 5, 6]], np.float32)
        for binary in (False, True):
            inp = tritonclient_http.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            result = client.infer("linear", [inp], outputs=[tritonclient_http.InferRequestedOutput("y", binary_data=binary)])
            np.testing.assert_allclose(result.as_numpy("y"), (x @ W) * 2)
            result = client.infer("echo", [inp])
            np.testing.assert_allclose(result.as_numpy("sum"), [6, 15])
    finally:
        client.close()


def test_a_predict_that_raises_fails_its_request_and_the_model_keeps_answering(server):
    status, body = infer(server, "linear", np.full((1, 3), -5000, np.float32))
    assert status == 500
    assert body["error"] == "model 'linear': predict raised ValueError: x below -1000 is out of range"
    status, _ = infer(server, "linear", np.ones((1, 3), np.float32))
    assert status == 200


def test_a_predict_returning_the_wrong_dtype_gets_an_error_saying_what_was_expected(server):
    status, body = infer(server, "linear", np.full((1, 3), 5000, np.float32))
    assert status == 500
    assert body["error"] == ("model 'linear': output 'y' has datatype FP64 (numpy float64); expected FP32 "
                             "(python.outputs[0].datatype)")
    assert infer(server, "linear", np.ones((1, 3), np.float32))[0] == 200


def test_inputs_are_validated_against_the_declared_signature(server):
    status, body = infer(server, "linear", np.ones((1, 4), np.float32))
    assert status == 400
    assert "input 'x': shape [1, 4] does not match the model's [-1, 3]" in body["error"]


def test_an_async_model_runs_on_a_worker_thread(server):
    status, meta = request(server, "GET", "/v2/models/echo")
    assert status == 200
    assert meta["parameters"]["execution"] == "worker_thread"
    assert meta["parameters"]["execution_chosen_by"] == "backend: waits on its own event loop"


# --- config and load errors, no server ------------------------------------------------------


def test_backend_python_needs_a_class_path():
    with pytest.raises(ConfigError, match=r"model 'm': backend python needs python.class \('module:ClassName'\)"):
        parse_config({"models": [{"name": "m", "path": "d", "backend": "python"}]})
    with pytest.raises(ConfigError, match=r"model 'm': python.class 'pkg.mod.Cls' must be 'module:ClassName'"):
        parse_config({"models": [{"name": "m", "path": "d", "backend": "python", "python": {"class": "pkg.mod.Cls"}}]})


def test_a_declared_signature_is_checked_naming_the_field():
    bad_type = {"class": "m:C", "inputs": [{"name": "x", "datatype": "FLOAT", "shape": [-1]}], "outputs": IO["outputs"]}
    with pytest.raises(ConfigError, match=r"model 'm': python.inputs\[0\].datatype 'FLOAT' unknown; allowed: BOOL"):
        parse_config({"models": [{"name": "m", "path": "d", "backend": "python", "python": bad_type}]})
    half = {"class": "m:C", "inputs": IO["inputs"]}
    with pytest.raises(ConfigError, match=r"model 'm': python.inputs and python.outputs go together"):
        parse_config({"models": [{"name": "m", "path": "d", "backend": "python", "python": half}]})
    fixed = {"class": "m:C", "batched": True, "inputs": [{"name": "x", "datatype": "FP32", "shape": [3]}],
             "outputs": IO["outputs"]}
    with pytest.raises(ConfigError, match=r"model 'm': python.batched is true but python.inputs\[0\] 'x' has "
                                          r"shape \[3\]; a batched model needs -1"):
        parse_config({"models": [{"name": "m", "path": "d", "backend": "python", "python": fixed}]})


def test_python_settings_for_another_backend_are_refused():
    with pytest.raises(ConfigError, match=r"model 'm': python settings are given but backend is 'onnxruntime'"):
        parse_config({"models": [{"name": "m", "path": "m.onnx", "python": {"class": "m:C"}}]})


def test_a_class_that_does_not_import_fails_the_load_naming_the_model_and_python_class(tmp_path):
    folder = write_model(tmp_path / "broken", "import numpy as np\nclass ScaledLinear:\n    def predict(self, inputs) ->\n",
                         "linear_model")
    (model,) = parse_config({"models": [linear_model(folder)]}).models
    with pytest.raises(ConfigError, match=r"model 'linear': python.class 'linear_model:ScaledLinear': cannot import "
                                          r"module 'linear_model' from the model folder .*: SyntaxError"):
        ModelServer(model, ServerConfig().request_limits())


def test_wrong_outputs_at_warm_up_fail_the_load_saying_what_was_expected(tmp_path):
    source = LINEAR.replace('return {"y": y}', 'return {"y": y[:, :1]}')
    (model,) = parse_config({"models": [linear_model(write_model(tmp_path / "narrow", source, "linear_model"))]}).models
    with pytest.raises(ConfigError, match=r"model 'linear': output 'y' has shape \[1, 1\]; expected \[-1, 2\] "
                                          r"\(-1 = any size\) \(python.outputs\[0\].shape\) \(at warm-up"):
        ModelServer(model, ServerConfig().request_limits())


def test_a_registered_version_serves_the_module_among_its_artifacts(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # the registry's local cache of version folders
    src = write_model(tmp_path / "src", LINEAR, "linear_model")
    reg_cfg = RegistryConfig(uri=f"sqlite:///{tmp_path}/r.db", artifacts=str(tmp_path / "artifacts"))
    reg = Registry.open(reg_cfg.uri, reg_cfg.artifacts)
    try:
        reg.register_version("linear", {"linear_model.py": src / "linear_model.py", "w.npy": src / "w.npy"}, actor="t")
    finally:
        reg.close()
    entry = linear_model("", artifact="linear_model.py")
    del entry["path"], entry["version"]
    cfg = resolve_models(parse_config({"registry": {"uri": reg_cfg.uri, "artifacts": reg_cfg.artifacts},
                                       "models": [{**entry, "ref": "linear"}]}),
                         load_settings({}))
    (model,) = cfg.models
    assert (model.ref, model.version) == ("linear/1", "1")
    backend = make_backend(model, cfg.registry)
    backend.load()
    x = np.ones((2, 3), np.float32)
    np.testing.assert_allclose(backend.infer({"x": x})["y"], (x @ W) * 2)
    backend.close()
