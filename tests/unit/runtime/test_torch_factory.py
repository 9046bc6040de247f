"""The torch backend serving a user model built by ``torch.factory`` (the
model's folder holds the weights, torch_model.json and the code), the
errors of a factory that does not import or build a module, and the model
config's checks; a built-in architecture still loads from a registry
version's folder."""

from __future__ import annotations

import os
import textwrap
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from flywheel.protocol.errors import ConfigError
from flywheel.runtime.backends.torch_backend import MANIFEST, FactoryManifest, TorchBackend, TorchModelConfig
from flywheel.serving.config import ModelConfig, RegistryConfig
from flywheel.serving.model_server import make_backend

NETS = textwrap.dedent('''
    import torch

    class Gate(torch.nn.Module):
        def __init__(self, width=6):
            super().__init__()
            self.a = torch.nn.Linear(3, width)
            self.b = torch.nn.Linear(width, 2)

        def forward(self, rows):
            return self.b(torch.relu(self.a(rows)))

    def make(width=6):
        return Gate(width)

    def not_a_module(width=6):
        return [width]

    def raises(width=6):
        raise RuntimeError("needs a GPU")

    NOT_CALLABLE = 3

    class Doubles(Gate):
        def forward(self, rows):
            return super().forward(rows).double()

    class Pair(Gate):
        def forward(self, rows):
            y = super().forward(rows)
            return y, y

    def doubles(width=6):
        return Doubles(width)

    def pair(width=6):
        return Pair(width)
''')

SIGNATURE = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 3]}],
             "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 2]}]}


def _module_from(folder) -> torch.nn.Module:
    namespace: dict = {}
    exec(compile((folder / "fw_tf_nets.py").read_text(), "fw_tf_nets.py", "exec"), namespace)  # the test's own code
    torch.manual_seed(0)
    return namespace["make"](width=6).eval()


@pytest.fixture()
def folder(tmp_path):
    """A model folder: the weights, the manifest, and the code beside them."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "fw_tf_nets.py").write_text(NETS)
    module = _module_from(folder)
    save_file(module.state_dict(), str(folder / "model.safetensors"))
    manifest = FactoryManifest(factory="fw_tf_nets:make", kwargs={"width": 6}, input_shape=[3], signature=SIGNATURE)
    (folder / MANIFEST).write_bytes(manifest.encode())
    return folder


def _config(**over) -> ModelConfig:
    fields = {"name": "gate", "path": "", "backend": "torch", "torch": TorchModelConfig(factory="fw_tf_nets:make")}
    fields.update(over)
    return ModelConfig(**fields)


def _loaded(folder, **over) -> TorchBackend:
    backend = make_backend(_config(path=str(folder), **over))
    backend.load()
    return backend


def test_a_factory_model_answers_as_its_module_with_the_recorded_signature(folder):
    backend = _loaded(folder)
    assert [(t.name, t.shape) for t in backend.signature.inputs] == [("input", (-1, 3))]
    assert [(t.name, t.shape) for t in backend.signature.outputs] == [("output", (-1, 2))]
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    with torch.inference_mode():
        want = _module_from(folder)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(backend.infer({"input": x})["output"], want, atol=1e-6)
    backend.close()


def test_the_factory_module_is_not_left_imported(folder):
    import sys

    _loaded(folder).close()
    assert "fw_tf_nets" not in sys.modules


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("fw_tf_missing:make", r"model 'gate': torch.factory 'fw_tf_missing:make': cannot import module "
                               r"'fw_tf_missing' from the installed packages: ModuleNotFoundError"),
        ("fw_tf_nets:nothing", r"model 'gate': torch.factory 'fw_tf_nets:nothing': module 'fw_tf_nets' \(.*fw_tf_nets.py\) "
                               r"has no 'nothing'; expected a function"),
        ("fw_tf_nets:NOT_CALLABLE", r"model 'gate': torch.factory 'fw_tf_nets:NOT_CALLABLE' is a int; expected a "
                                    r"function that returns a torch.nn.Module"),
        ("fw_tf_nets:not_a_module", r"model 'gate': torch.factory 'fw_tf_nets:not_a_module' returned a list; "
                                    r"expected a torch.nn.Module"),
        ("fw_tf_nets:raises", r"model 'gate': torch.factory 'fw_tf_nets:raises' with torch.kwargs \{'width': 6\} "
                              r"raised RuntimeError: needs a GPU"),
    ],
)
def test_a_factory_that_does_not_build_a_module_fails_the_load_naming_model_and_field(folder, factory, message):
    backend = make_backend(_config(path=str(folder), torch=TorchModelConfig(factory=factory)))
    with pytest.raises(ConfigError, match=message):
        backend.load()


def test_kwargs_given_in_the_deploy_config_replace_the_recorded_ones(folder):
    backend = make_backend(_config(path=str(folder), torch=TorchModelConfig(factory="fw_tf_nets:make",
                                                                           kwargs={"width": 4})))
    with pytest.raises(ConfigError, match=r"model 'gate': torch.factory 'fw_tf_nets:make' with torch.kwargs "
                                          r"\{'width': 4\} builds a module the weights model.safetensors do not fit"):
        backend.load()


def test_a_factory_model_without_its_manifest_is_refused(folder):
    os.remove(folder / MANIFEST)
    with pytest.raises(ConfigError, match=r"model 'gate': torch.factory needs torch_model.json beside the weights"):
        _loaded(folder)


def test_a_code_zip_reaching_outside_its_folder_is_refused(folder):
    with zipfile.ZipFile(folder / "code.zip", "w") as z:
        z.writestr("../escaped.py", "X = 1\n")
    doc = FactoryManifest(factory="fw_tf_nets:make", kwargs={}, input_shape=[3], signature=SIGNATURE, code="code.zip")
    (folder / MANIFEST).write_bytes(doc.encode())
    with pytest.raises(ConfigError, match=r"holds '../escaped.py', outside its own folder; refused"):
        _loaded(folder)
    assert not (folder.parent / "escaped.py").exists()


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"torch": TorchModelConfig()}, r"model 'gate': backend torch needs 'architecture' .* or torch.factory"),
        ({"architecture": "mlp"}, r"model 'gate': give 'architecture' .* or torch.factory .*, not both"),
        ({"torch": TorchModelConfig(factory="fw_tf_nets.make")},
         r"model 'gate': torch.factory 'fw_tf_nets.make' must be an import path 'module:function'"),
        ({"path": "", "ref": "gate/1"},
         r"model 'gate': artifact 'model.onnx': backend torch loads safetensors weights; set artifact: model.safetensors"),
        ({"backend": "onnxruntime"}, r"model 'gate': torch settings are given but backend is 'onnxruntime'"),
    ],
)
def test_the_model_config_checks_the_torch_fields(over, message):
    with pytest.raises(ConfigError, match=message):
        _config(**{"path": "model", **over})


def test_a_built_in_architecture_loads_from_a_registry_version_folder(tmp_path, monkeypatch):
    from flywheel.registry import Registry
    from flywheel.runtime.architectures import build

    monkeypatch.setenv("HOME", str(tmp_path))  # the registry's download cache
    hparams = {"in_features": 8, "hidden": [4], "out_features": 2}
    torch.manual_seed(1)
    module, _ = build("mlp", hparams)
    weights = tmp_path / "model.safetensors"
    save_file(module.state_dict(), str(weights))
    uri, artifacts = f"sqlite:///{tmp_path}/reg.db", str(tmp_path / "artifacts")
    reg = Registry.open(uri, artifacts)
    try:
        reg.register_version("mlp", {"model.safetensors": str(weights), "notes.txt": b"x"}, actor="test")
    finally:
        reg.close()
    model = ModelConfig(name="mlp", ref="mlp/1", artifact="model.safetensors", backend="torch", architecture="mlp",
                        hparams=hparams)
    backend = make_backend(model, RegistryConfig(uri=uri, artifacts=artifacts))
    backend.load()
    x = np.random.default_rng(2).standard_normal((3, 8)).astype(np.float32)
    with torch.inference_mode():
        want = module.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(backend.infer({"input": x})["logits"], want, atol=1e-6)


@pytest.mark.parametrize("factory, message", [
    ("fw_tf_nets:doubles", r"model 'gate'.*output.*FP32"),
    ("fw_tf_nets:pair", r"model 'gate': torch.factory 'fw_tf_nets:pair': forward returned 2 tensor\(s\); expected 1"),
])
def test_a_factory_model_answering_off_its_signature_fails_at_warm_up(folder, factory, message):
    backend = make_backend(_config(path=str(folder), torch=TorchModelConfig(factory=factory)))
    backend.load()
    with pytest.raises(ConfigError, match=message):
        backend.warmup((1, 4))
