"""A backend from a plug-in package, configured by name and served over HTTP.

The toy package (tests/plugins/) registers ``doubler`` through the
``flywheel.backends`` entry point group; nothing is installed, the folder is
only put on sys.path. The model is colocated in a real ingress (no Ray), so
the request goes through the same config, registry and data path as any.
"""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path

import numpy as np
import pytest

from flywheel.protocol.errors import ConfigError
from flywheel.runtime.backends import registry
from flywheel.serving.config import ModelConfig, ServerConfig, parse_config
from flywheel.serving.ingress import Ingress

PLUGINS = Path(__file__).resolve().parents[2] / "plugins"


@pytest.fixture(scope="module")
def toy_plugin():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(PLUGINS))
        yield
    # the registry caches what it loaded for the life of the process
    registry._loaded.pop("doubler", None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(toy_plugin, tmp_path_factory):
    model_file = tmp_path_factory.mktemp("toy") / "weights.bin"
    model_file.write_bytes(b"the doubler reads no weights")
    cfg = parse_config({
        "server": {"port": free_port(), "grpc_port": -1},
        "models": [{"name": "twice", "version": "1", "path": str(model_file), "backend": "doubler",
                    "settings": {"width": 3}}],
    })
    ingress = Ingress(cfg.server, [], colocated=cfg.models)
    yield cfg.server.port
    ingress.close()


def post(port: int, path: str, body: dict) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_a_plug_in_backend_answers_a_v2_infer_request(server):
    x = [[1.0, -2.0, 0.5], [3.0, 0.0, -1.5]]
    status, body = post(server, "/v2/models/twice/infer",
                        {"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": x}]})
    assert status == 200, body
    (out,) = body["outputs"]
    assert (out["name"], out["shape"], out["datatype"]) == ("y", [2, 3], "FP32")
    assert np.array(out["data"], np.float32).reshape(2, 3).tolist() == (2 * np.array(x, np.float32)).tolist()


def test_a_plug_in_backend_reports_its_platform_and_signature(server):
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    try:
        conn.request("GET", "/v2/models/twice")
        resp = conn.getresponse()
        meta = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 200
    assert meta["platform"] == "toy_doubler"
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]


# --- the model config, checked through the registry ---------------------------------------


def test_an_unknown_backend_names_the_field_and_every_available_backend(toy_plugin):
    with pytest.raises(ConfigError) as info:
        parse_config({"models": [{"name": "m", "path": "m.onnx", "backend": "tensorflow"}]})
    message = info.value.message
    assert "model 'm': backend 'tensorflow' unknown" in message
    assert "allowed: onnxruntime, torch, tensorrt, python, broken, doubler, not-a-spec" in message


def test_a_plug_in_setting_that_does_not_fit_names_the_setting(toy_plugin):
    with pytest.raises(ConfigError, match=r"model 'm': settings of backend 'doubler': settings\.width 0 must be >= 1"):
        ModelConfig(name="m", path="w.bin", backend="doubler", settings={"width": 0})


def test_tensorrt_settings_given_for_a_plug_in_backend_are_refused(toy_plugin):
    with pytest.raises(ConfigError, match=r"model 'm': tensorrt settings are given but backend is 'doubler'"):
        parse_config({"models": [{"name": "m", "path": "w.bin", "backend": "doubler",
                                  "tensorrt": {"precision": "fp32"}}]})


def test_tensorrt_settings_given_for_onnxruntime_are_refused():
    with pytest.raises(ConfigError, match=r"model 'm': tensorrt settings are given but backend is 'onnxruntime'; "
                                          r"set backend: tensorrt or drop them"):
        parse_config({"models": [{"name": "m", "path": "m.onnx", "tensorrt": {"precision": "fp32"}}]})


def test_onnxruntime_settings_given_for_tensorrt_are_ignored_as_before():
    (m,) = parse_config({"models": [{"name": "m", "path": "m.onnx", "backend": "tensorrt",
                                     "onnxruntime": {"intra_op_threads": 2}}]}).models
    assert m.onnxruntime.intra_op_threads == 2


def test_a_settings_mapping_for_a_built_in_backend_is_refused():
    with pytest.raises(ConfigError, match=r"model 'm': settings: backend 'onnxruntime' takes none"):
        ModelConfig(name="m", path="m.onnx", settings={"width": 3})


def test_the_torch_backend_still_needs_an_architecture():
    with pytest.raises(ConfigError, match=r"model 'm': backend torch needs 'architecture'"):
        ModelConfig(name="m", path="w.safetensors", backend="torch")
