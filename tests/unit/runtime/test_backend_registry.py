"""The backend registry: built-in names, plug-ins by entry point, clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from flywheel.protocol.errors import ConfigError
from flywheel.runtime.backends import BackendSpec, available_backends, get_backend
from flywheel.runtime.backends import registry
from flywheel.runtime.backends.onnx_backend import OnnxRuntimeBackend
from flywheel.runtime.backends.tensorrt_backend import TensorRTBackend
from flywheel.runtime.backends.torch_backend import TorchBackend

# a test-only package with a `flywheel.backends` entry point (not installed)
PLUGINS = Path(__file__).resolve().parents[2] / "plugins"


@pytest.fixture
def toy_plugin(monkeypatch):
    """tests/plugins on sys.path, the registry forgetting the plug-ins it
    loaded when the test ends (its cache lives as long as the process)."""
    monkeypatch.syspath_prepend(str(PLUGINS))
    yield
    for name in ("doubler", "not-a-spec", "broken"):
        registry._loaded.pop(name, None)


def test_the_built_in_backends_come_first_in_registration_order():
    assert available_backends()[:4] == ["onnxruntime", "torch", "tensorrt", "python"]


@pytest.mark.parametrize(
    "name, cls", [("onnxruntime", OnnxRuntimeBackend), ("torch", TorchBackend), ("tensorrt", TensorRTBackend)]
)
def test_each_built_in_backend_has_a_spec_of_its_own_name(name, cls):
    spec = get_backend(name)
    assert isinstance(spec, BackendSpec)
    assert spec.name == name
    assert spec.create.__module__ == cls.__module__


def test_tensorrt_and_onnxruntime_with_a_gpu_provider_ask_for_a_gpu():
    from flywheel.serving.config import ModelConfig

    def model(backend, **kw):
        return msgspec.convert({"name": "m", "path": "x", "backend": backend, **kw}, ModelConfig)

    extra = {"torch": {"architecture": "mlp"}}
    assert {name: get_backend(name).gpus_for(model(name, **extra.get(name, {})))
            for name in ("onnxruntime", "torch", "tensorrt")} == {
        "onnxruntime": 0, "torch": 0, "tensorrt": 1,
    }
    cuda = model("onnxruntime", onnxruntime={"providers": ["cuda", "cpu"]})
    assert get_backend("onnxruntime").gpus_for(cuda) == 1


def test_an_unknown_backend_names_itself_and_the_installed_choices():
    with pytest.raises(ConfigError, match=r"backend 'tensorflow' unknown; allowed: onnxruntime, torch, tensorrt"):
        get_backend("tensorflow")


def test_a_plug_in_is_found_through_its_entry_point(toy_plugin):
    assert "doubler" in available_backends()
    spec = get_backend("doubler")
    assert spec.name == "doubler"
    assert spec.create.__module__ == "flywheel_toy_backend"


def test_the_unknown_backend_error_lists_installed_plug_ins(toy_plugin):
    with pytest.raises(ConfigError, match=r"allowed: onnxruntime, torch, tensorrt, python, broken, doubler, not-a-spec"):
        get_backend("tensorflow")


def test_a_plug_in_cannot_take_over_a_built_in_name(toy_plugin):
    # the test package also declares `torch = flywheel_toy_backend:NOT_A_SPEC`
    assert get_backend("torch").create.__module__ == TorchBackend.__module__
    assert available_backends().count("torch") == 1


def test_an_entry_point_that_holds_no_spec_is_refused_by_name(toy_plugin):
    with pytest.raises(ConfigError, match=r"backend 'not-a-spec': entry point .* is a object, not a BackendSpec"):
        get_backend("not-a-spec")


def test_an_entry_point_that_cannot_be_imported_names_the_backend_and_the_cause(toy_plugin):
    with pytest.raises(ConfigError, match=r"backend 'broken': cannot load entry point .*ModuleNotFoundError"):
        get_backend("broken")


def test_a_plug_in_checks_its_settings_with_its_own_type(toy_plugin):
    spec = get_backend("doubler")
    assert spec.parse_settings({"width": 3}).width == 3
    with pytest.raises(ConfigError, match=r"settings of backend 'doubler': Object contains unknown field `wdith`"):
        spec.parse_settings({"wdith": 3})


def test_a_built_in_backend_takes_no_settings_mapping():
    with pytest.raises(ConfigError, match=r"settings: backend 'onnxruntime' takes none"):
        get_backend("onnxruntime").parse_settings({"width": 3})


def test_importing_the_registry_and_the_config_imports_no_backend_runtime():
    code = (
        "import sys, flywheel.runtime.backends, flywheel.serving.config;"
        "print(*(m in sys.modules for m in ('torch', 'tensorrt', 'cupy', 'onnxruntime')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "False", "False"]
