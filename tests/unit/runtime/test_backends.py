from __future__ import annotations

import logging
import pickle

import numpy as np
import onnxruntime as ort
import pytest

from flywheel.protocol.errors import ConfigError, IntegrityError
from flywheel.runtime.backends.onnx_backend import OnnxRuntimeBackend, OnnxRuntimeConfig
from flywheel.runtime.signature import TensorSpec
from flywheel.runtime.backends.torch_backend import TorchBackend


def test_onnx_backend_signature_and_outputs_match_onnxruntime(mlp_onnx, rng):
    b = OnnxRuntimeBackend(mlp_onnx)
    b.load()
    assert b.signature.inputs == (TensorSpec("input", "FP32", (-1, 64)),)
    assert b.signature.outputs == (TensorSpec("logits", "FP32", (-1, 10)),)
    assert b.signature.batchable
    x = rng.standard_normal((5, 64)).astype(np.float32)
    want = ort.InferenceSession(mlp_onnx, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(b.infer({"input": x})["logits"], want, atol=1e-6)


def test_missing_providers_fall_back_to_cpu_with_a_logged_reason(mlp_onnx, caplog):
    b = OnnxRuntimeBackend(mlp_onnx, OnnxRuntimeConfig(providers=("tensorrt", "cuda", "cpu")))
    with caplog.at_level(logging.WARNING):
        b.load()
    assert b.providers == ["CPUExecutionProvider"]
    assert "CUDAExecutionProvider unavailable" in caplog.text


def test_onnx_config_rejects_unknown_provider():
    with pytest.raises(ConfigError, match="rocm"):
        OnnxRuntimeConfig(providers=("rocm",))


def test_missing_model_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        OnnxRuntimeBackend(str(tmp_path / "nope.onnx"))


def test_warmup_runs_every_batch_size(mlp_onnx):
    b = OnnxRuntimeBackend(mlp_onnx)
    b.load()
    b.warmup((1, 7))
    assert b.example_inputs(7)["input"].shape == (7, 64)


def test_string_tensors_reach_onnx_as_text(multi_type_onnx):
    b = OnnxRuntimeBackend(multi_type_onnx)
    b.load()
    arr = np.array([[b"a", b"b"]], dtype=object)
    inputs = b.example_inputs(1)
    inputs["in_BYTES"] = arr
    out = b.infer(inputs)
    assert list(out["out_BYTES"].ravel()) == ["a", "b"]


def _trained_mlp_weights(tmp_path, fmt):
    import torch
    from safetensors.torch import save_file

    from flywheel.runtime.architectures import build

    torch.manual_seed(3)
    module, _ = build("mlp", {"in_features": 8, "hidden": [4], "out_features": 2})
    sd = module.state_dict()
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, str(path))
    return module, str(path)


def test_torch_backend_rebuilds_the_architecture_and_matches(tmp_path):
    import torch

    module, path = _trained_mlp_weights(tmp_path, "safetensors")
    b = TorchBackend(path, "mlp", {"in_features": 8, "hidden": [4], "out_features": 2})
    b.load()
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    with torch.inference_mode():
        want = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(b.infer({"input": x})["logits"], want, atol=1e-6)


class _Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_torch_save_files_are_refused_even_when_harmless(tmp_path):
    _, path = _trained_mlp_weights(tmp_path, "pt")
    b = TorchBackend(path, "mlp", {"in_features": 8, "hidden": [4], "out_features": 2})
    with pytest.raises(IntegrityError, match="pickle-based file"):
        b.load()


@pytest.mark.parametrize("name", ["evil.pt", "evil.safetensors", "evil.onnx"])
def test_pickled_artifacts_are_refused_by_content_and_never_run(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / name
    path.write_bytes(pickle.dumps({"weight": _Evil()}))
    if name.endswith(".onnx"):
        b = OnnxRuntimeBackend(str(path))
    else:
        b = TorchBackend(str(path), "mlp", {"in_features": 8, "hidden": [], "out_features": 2})
    with pytest.raises(IntegrityError, match="can run code when loaded; refused"):
        b.load()
    assert not (tmp_path / "PWNED").exists()


def test_unknown_architecture_is_a_config_error(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"")
    with pytest.raises(ConfigError, match="unknown architecture"):
        TorchBackend(str(path), "resnet9000").load()
