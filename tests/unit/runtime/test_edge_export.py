"""Edge bundles (onnx, ort-mobile) written from real models, loaded back in
ONNX Runtime and checked against their source."""

from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import pytest
from _trained import CNN, MLP

from flywheel.runtime.architectures import build
from flywheel.runtime.edge_export import ExportSource, export_bundle, read_bundle, sha256_file
from flywheel.protocol.errors import ConfigError, PreconditionFailedError


def _source(onnx_path: str, arch: str, hparams: dict, reference=None, labels=None) -> ExportSource:
    _, sig = build(arch, hparams)
    return ExportSource(onnx_path=onnx_path, signature=sig, ref="digits/7", reference=reference, labels=labels,
                        architecture=arch, hparams=hparams, weights_path=onnx_path.replace(".onnx", ".safetensors"),
                        preprocessing={"scale": "pixel / 16"})


def _run(path: str, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_onnx_bundle_describes_and_hashes_its_files(digits, digits_mlp, tmp_path):
    _, _, xva, yva = digits
    out = tmp_path / "b"
    report = export_bundle(_source(digits_mlp, "mlp", MLP, xva, yva), "onnx", str(out), progress=None)
    assert sorted(os.listdir(out)) == ["metadata.json", "model.onnx", "report.json"]
    meta, rep = read_bundle(str(out))
    assert meta["target"] == "onnx"
    assert meta["model_file"] == "model.onnx"
    assert meta["quantize"] is None
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert meta["source"]["ref"] == "digits/7"
    assert meta["source"]["onnx_sha256"] == sha256_file(digits_mlp)
    assert meta["preprocessing"] == {"scale": "pixel / 16"}
    assert rep["parity"]["passed"]
    assert rep["parity"]["max_abs_diff"] <= 1e-5
    assert rep["parity"]["rows"] == 256
    assert rep["size_bytes"] == os.path.getsize(out / "model.onnx") == report.size_bytes
    assert 0 < rep["latency_ms_batch1"] < 100


def test_ort_mobile_bundle_runs_like_its_source_and_lists_its_operators(digits, digits_mlp, tmp_path):
    _, _, xva, _ = digits
    out = tmp_path / "m"
    export_bundle(_source(digits_mlp, "mlp", MLP, xva), "ort-mobile", str(out), progress=None)
    assert sorted(os.listdir(out)) == ["metadata.json", "model.ort", "report.json", "required_operators.config"]
    x = np.random.default_rng(3).random((5, 64), dtype=np.float32)
    for rows in (1, 5):  # the batch dimension stayed variable
        np.testing.assert_allclose(_run(str(out / "model.ort"), x[:rows]), _run(digits_mlp, x[:rows]), atol=1e-5)
    ops = (out / "required_operators.config").read_text()
    assert "ai.onnx;" in ops
    assert "Gemm" in ops or "MatMul" in ops


def test_int8_cnn_ort_mobile_bundle_is_static_qdq_and_agrees(digits, digits_cnn, tmp_path):
    _, _, xva, yva = digits
    out = tmp_path / "q"
    report = export_bundle(_source(digits_cnn, "small_cnn", CNN, xva.reshape(-1, 1, 8, 8), yva), "ort-mobile",
                           str(out), quantize="int8", progress=None)
    assert report.quantization["mode"] == "static"
    assert report.quantization["kept"]
    assert report.parity["top1_agreement"] >= 0.98
    assert report.parity["passed"]
    assert report.parity["rows"] == len(xva) - 128  # held-out rows only: calibration never saw them
    rep = json.loads((out / "report.json").read_text())
    assert rep["quantization"]["calibration_rows"] == 128
    assert "QLinearConv" in (out / "required_operators.config").read_text() or \
        "QuantizeLinear" in (out / "required_operators.config").read_text()


def test_refusals_name_what_is_wrong(digits_mlp, tmp_path):
    src = _source(digits_mlp, "mlp", MLP)
    with pytest.raises(ConfigError, match="target 'tflite'"):
        export_bundle(src, "tflite", str(tmp_path / "a"), progress=None)
    with pytest.raises(ConfigError, match="int8 export needs the model's reference sample"):
        export_bundle(src, "onnx", str(tmp_path / "b"), quantize="int8", progress=None)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        export_bundle(src, "onnx", str(tmp_path / "full"), progress=None)
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".fw-bundle-")]  # no half-written bundle left


def test_a_tampered_bundle_is_detected(digits_mlp, tmp_path):
    out = tmp_path / "t"
    export_bundle(_source(digits_mlp, "mlp", MLP), "onnx", str(out), progress=None)
    with open(out / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(PreconditionFailedError, match="model.onnx has sha256"):
        read_bundle(str(out))


def test_executorch_bundle_rebuilds_the_module_from_its_weights(digits, digits_mlp, tmp_path):
    pytest.importorskip("executorch", reason="ExecuTorch is the 'edge' extra: pip install 'flywheel-ml[edge]'")
    from flywheel.runtime.executorch_export import load_executorch

    _, _, xva, yva = digits
    out = tmp_path / "e"
    report = export_bundle(_source(digits_mlp, "mlp", MLP, xva, yva), "executorch", str(out), progress=None)
    assert sorted(os.listdir(out)) == ["metadata.json", "model.pte", "report.json"]
    assert report.parity["passed"]
    assert report.parity["max_abs_diff"] <= 1e-5
    meta, _ = read_bundle(str(out))
    assert meta["runtime"]["executorch"].startswith("1.5")
    assert meta["source"]["weights_sha256"]
    x = np.random.default_rng(5).random((3, 64), dtype=np.float32)
    np.testing.assert_allclose(load_executorch(str(out / "model.pte"))([x])[0], _run(digits_mlp, x), atol=1e-5)


def test_a_failed_parity_check_leaves_nothing_behind(digits, digits_mlp, tmp_path, monkeypatch):
    import flywheel.runtime.edge_export as edge

    real = edge.parity
    monkeypatch.setattr(edge, "parity", lambda *a, **k: {**real(*a, **k), "passed": False})
    _, _, xva, _ = digits
    with pytest.raises(PreconditionFailedError, match="ort-mobile export failed its parity check"):
        export_bundle(_source(digits_mlp, "mlp", MLP, xva), "ort-mobile", str(tmp_path / "b"), progress=None)
    assert os.listdir(tmp_path) == []  # neither the bundle nor its temporary folder


def test_overwrite_replaces_only_a_bundle(digits_mlp, tmp_path):
    out = tmp_path / "b"
    src = _source(digits_mlp, "mlp", MLP)
    export_bundle(src, "onnx", str(out), progress=None)
    first = json.loads((out / "metadata.json").read_text())["created_at"]
    with pytest.raises(ConfigError, match="--force replaces an earlier bundle"):
        export_bundle(src, "ort-mobile", str(out), progress=None)
    export_bundle(src, "ort-mobile", str(out), progress=None, overwrite=True)
    meta, _ = read_bundle(str(out))
    assert meta["target"] == "ort-mobile"
    assert not (out / "model.onnx").exists()
    assert first
    assert sorted(p for p in os.listdir(tmp_path)) == ["b"]  # no temp or old folders left
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a Flywheel bundle"):
        export_bundle(src, "onnx", str(tmp_path / "notes"), progress=None, overwrite=True)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
