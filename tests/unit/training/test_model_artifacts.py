"""training/model_artifacts.py: a factory model that does not export to ONNX
is registered with its weights, its code and its manifest, and a deploy
config ``{backend: torch, ref: name/1, torch: {factory}}`` serves it from a
real SQLite registry, answering as the trained module does."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from flywheel.protocol.errors import ConfigError
from flywheel.registry import Registry
from flywheel.runtime.backends.torch_backend import TorchModelConfig
from flywheel.runtime.export import ExportError, export_onnx
from flywheel.runtime.signature import Signature, TensorSpec
from flywheel.serving.config import ModelConfig, RegistryConfig
from flywheel.serving.model_server import make_backend
from flywheel.training.model_artifacts import factory_model_artifacts
from flywheel.training.spec import ModelSpec
from flywheel.training.user_code import build_model, shipped

MODELS = textwrap.dedent('''
    import torch

    class Clipped(torch.nn.Module):
        """Branches on the values of its input: no single ONNX graph."""

        def __init__(self, width):
            super().__init__()
            self.lin = torch.nn.Linear(4, width)

        def forward(self, x):
            if x.abs().max() > 100:
                return self.lin(x.clamp(-100, 100))
            return self.lin(x)

    def make(width=3):
        return Clipped(width)
''')

SIG = Signature((TensorSpec("input", "FP32", (-1, 4)),), (TensorSpec("output", "FP32", (-1, 3)),))


@pytest.fixture()
def trained(tmp_path):
    """(model spec, module, weights, code folder) of a factory model whose
    code lives in a package of the job's code folder."""
    code = tmp_path / "code"
    (code / "fw_ma_pkg").mkdir(parents=True)
    (code / "fw_ma_pkg" / "__init__.py").write_text("")
    (code / "fw_ma_pkg" / "models.py").write_text(MODELS)
    spec = ModelSpec(factory="fw_ma_pkg.models:make", kwargs={"width": 3})
    torch.manual_seed(0)
    with shipped(str(code)):
        module = build_model(spec).eval()
    weights = tmp_path / "out" / "model.safetensors"
    weights.parent.mkdir()
    save_file(module.state_dict(), str(weights))
    return spec, module, str(weights), str(code)


def test_a_factory_model_that_does_not_export_is_registered_and_served_by_torch(trained, tmp_path, monkeypatch):
    spec, module, weights, code = trained
    monkeypatch.setenv("HOME", str(tmp_path))  # the registry's download cache
    with pytest.raises(ExportError) as info:
        export_onnx(module, SIG, str(tmp_path / "out" / "model.onnx"))
    assert info.value.stage == "export"

    packed = factory_model_artifacts(spec, SIG, weights, code=code, pack_dir=str(tmp_path / "job" / "code"),
                                     task="regression")
    assert sorted(packed.artifacts) == ["code.zip", "model.safetensors", "torch_model.json"]
    assert packed.params == {"factory": "fw_ma_pkg.models:make", "kwargs": {"width": 3}, "input_shape": [4],
                             "task": "regression"}
    uri, store = f"sqlite:///{tmp_path}/reg.db", str(tmp_path / "artifacts")
    reg = Registry.open(uri, store)
    try:
        mv = reg.register_version("clipped", packed.artifacts, actor="test", params=packed.params,
                                  signature=json.loads(packed.artifacts["torch_model.json"])["signature"])
    finally:
        reg.close()
    shutil.rmtree(code)  # what serves is the registered code, not the job's folder

    model = ModelConfig(name="clipped", ref=mv.ref, artifact="model.safetensors", backend="torch",
                        torch=TorchModelConfig(factory="fw_ma_pkg.models:make"))
    backend = make_backend(model, RegistryConfig(uri=uri, artifacts=store))
    backend.load()
    try:
        assert [(t.name, t.shape) for t in backend.signature.inputs] == [("input", (-1, 4))]
        assert [(t.name, t.shape) for t in backend.signature.outputs] == [("output", (-1, 3))]
        x = np.random.default_rng(5).standard_normal((6, 4)).astype(np.float32) * 200  # both branches
        with torch.inference_mode():
            want = module(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(backend.infer({"input": x})["output"], want, atol=1e-5)
        assert not any(name.startswith("fw_ma_pkg") for name in sys.modules)
    finally:
        backend.close()


def test_the_code_zip_is_the_job_pack_of_the_code_folder(trained, tmp_path):
    spec, _, weights, code = trained
    packed = factory_model_artifacts(spec, SIG, weights, code=code, pack_dir=str(tmp_path / "pack"),
                                     onnx=str(tmp_path / "model.onnx"))
    with zipfile.ZipFile(packed.artifacts["code.zip"]) as z:
        assert sorted(z.namelist()) == ["code/fw_ma_pkg/__init__.py", "code/fw_ma_pkg/models.py"]
    assert packed.artifacts["model.onnx"] == str(tmp_path / "model.onnx")
    manifest = json.loads(packed.artifacts["torch_model.json"])
    assert manifest["factory"] == "fw_ma_pkg.models:make"
    assert manifest["code"] == "code.zip"


def test_an_installed_factory_ships_no_code(trained):
    spec, _, weights, _ = trained
    packed = factory_model_artifacts(spec, SIG, weights)
    assert "code.zip" not in packed.artifacts
    assert json.loads(packed.artifacts["torch_model.json"])["code"] == ""


def test_a_built_in_architecture_is_not_a_factory_model(tmp_path):
    with pytest.raises(ConfigError, match=r"^model.factory: not a factory model"):
        factory_model_artifacts(ModelSpec(architecture="mlp"), SIG, str(tmp_path / "w.safetensors"))
