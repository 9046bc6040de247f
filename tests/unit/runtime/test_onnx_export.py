"""runtime/export.py: any forward signature exports with a variable batch
axis, parity is checked at batch 1 and another size, and a module that
cannot export (or disagrees with its file) says which step failed and why."""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch

from flywheel.runtime.export import ExportError, check_parity, export_onnx
from flywheel.runtime.signature import Signature, TensorSpec


class OneInput(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x):  # not named like the signature's input
        return torch.tanh(self.lin(x))


class TwoInputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 3)
        self.b = torch.nn.Linear(2, 3)

    def forward(self, features, extra):
        return self.a(features) * self.b(extra)


class DataDependent(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x):
        if x.sum() > 0:  # Python control flow on values: no single graph
            return self.lin(x)
        return -self.lin(x)


class Noisy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x) + torch.rand_like(x[:, :3])


def _sig(*inputs: tuple[str, int], out: int = 3) -> Signature:
    return Signature(tuple(TensorSpec(n, "FP32", (-1, w)) for n, w in inputs), (TensorSpec("y", "FP32", (-1, out)),))


def _session(path: str) -> ort.InferenceSession:
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def test_a_forward_argument_named_x_exports_with_a_variable_batch(tmp_path):
    module = OneInput()
    path = export_onnx(module, _sig(("input", 4)), str(tmp_path / "one.onnx"))
    sess = _session(path)
    assert [(i.name, i.shape[1]) for i in sess.get_inputs()] == [("input", 4)]
    assert isinstance(sess.get_inputs()[0].shape[0], str)  # a named, variable axis
    x = np.random.default_rng(3).standard_normal((7, 4)).astype(np.float32)
    with torch.inference_mode():
        want = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(sess.run(None, {"input": x})[0], want, atol=1e-5)


def test_two_inputs_keep_the_signature_names_and_order(tmp_path):
    module = TwoInputs()
    path = export_onnx(module, _sig(("features", 4), ("extra", 2)), str(tmp_path / "two.onnx"))
    sess = _session(path)
    assert [i.name for i in sess.get_inputs()] == ["features", "extra"]
    assert [o.name for o in sess.get_outputs()] == ["y"]
    rng = np.random.default_rng(4)
    f, e = rng.standard_normal((1, 4)).astype(np.float32), rng.standard_normal((1, 2)).astype(np.float32)
    with torch.inference_mode():
        want = module(torch.from_numpy(f), torch.from_numpy(e)).numpy()
    np.testing.assert_allclose(sess.run(None, {"features": f, "extra": e})[0], want, atol=1e-5)


def test_data_dependent_control_flow_fails_at_the_export_step(tmp_path):
    with pytest.raises(ExportError, match=r"^ONNX export failed: torch could not capture DataDependent.forward") as info:
        export_onnx(DataDependent(), _sig(("input", 4)), str(tmp_path / "dd.onnx"))
    assert info.value.stage == "export"
    assert "data-dependent" in info.value.message


def test_a_file_that_disagrees_with_torch_fails_parity_with_the_difference(tmp_path):
    with pytest.raises(ExportError, match=r"^ONNX parity check failed at batch 1: output 'y' differs from torch "
                                          r"by up to [0-9.e-]+ \(tolerance 0.0001 \+ 0.0001 x \|torch value\|\)$") as info:
        export_onnx(Noisy(), _sig(("input", 4)), str(tmp_path / "noisy.onnx"))
    assert info.value.stage == "parity"


def test_a_batch_baked_into_the_file_is_caught_at_batch_1(tmp_path):
    module = OneInput().eval()
    path = str(tmp_path / "fixed.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # no dynamic axis: the graph only takes the traced batch of 2
        torch.onnx.export(module, (torch.randn(2, 4),), path, input_names=["input"], output_names=["y"],
                          dynamo=True, external_data=False, verbose=False)
    check_parity(module, _sig(("input", 4)), path, batches=(2,))  # the traced size alone passes
    with pytest.raises(ExportError, match=r"^ONNX parity check failed at batch 1: ONNX Runtime cannot run "):
        check_parity(module, _sig(("input", 4)), path)
