"""Quantization (dynamic / static QDQ / fp16) and its accuracy gate, on real
ONNX Runtime sessions and models trained here on the digits data."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from flywheel.protocol.errors import ConfigError, PreconditionFailedError
from flywheel.runtime.quantize import (
    QuantizeConfig,
    choose_mode,
    graph_ops,
    quantize_with_gate,
    require_kept,
    split_reference,
)


def test_mode_is_chosen_by_the_graphs_operators(digits_mlp, digits_cnn):
    assert choose_mode(digits_mlp) == "dynamic"
    assert "Conv" in graph_ops(digits_cnn)
    assert choose_mode(digits_cnn) == "static"


def test_dynamic_int8_mlp_passes_the_gate_and_shrinks(digits, digits_mlp, tmp_path):
    _, _, xva, yva = digits
    dst = str(tmp_path / "mlp-int8.onnx")
    report = quantize_with_gate(digits_mlp, dst, xva, labels=yva)
    assert report.mode == "dynamic"
    assert report.kept
    assert report.reasons == []
    assert report.top1_agreement >= 0.99
    assert report.accuracy_drop <= 1.0
    assert report.quantized_bytes == os.path.getsize(dst) < report.parent_bytes / 2
    assert "MatMulInteger" in graph_ops(dst)  # really int8 arithmetic
    assert set(report.parent_latency_ms) == set(report.quantized_latency_ms) == {"1", "32"}


def test_static_qdq_cnn_is_per_channel_and_calibrated_on_disjoint_rows(digits, digits_cnn, tmp_path):
    _, _, xva, yva = digits
    dst = str(tmp_path / "cnn-int8.onnx")
    report = require_kept(quantize_with_gate(digits_cnn, dst, xva.reshape(-1, 1, 8, 8), labels=yva))
    assert report.mode == "static"
    assert report.calibration_rows == 128
    assert report.heldout_rows == len(xva) - 128
    calib, held = split_reference(len(xva), 128)
    assert not set(calib) & set(held)
    assert len(calib) + len(held) == len(xva)
    model = onnx.load(dst)
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops
    assert "DequantizeLinear" in ops
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    int8_weights = [a for a in inits.values() if a.dtype == np.int8 and a.ndim == 4]
    assert int8_weights, "conv weights stored as int8"
    # per-channel: a conv weight's DequantizeLinear has one scale per output channel
    scales = [inits[n.input[1]] for n in model.graph.node
              if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None and inits[n.input[0]].ndim == 4]
    assert scales
    for s in scales:
        assert s.ndim == 1
        assert s.size > 1
    assert {inits[n.input[2]].dtype for n in model.graph.node
            if n.op_type == "QuantizeLinear" and len(n.input) > 2} == {np.dtype(np.uint8)}  # uint8 activations


def test_fp16_keeps_the_float32_signature(digits, digits_mlp, tmp_path):
    _, _, xva, yva = digits
    dst = str(tmp_path / "mlp-fp16.onnx")
    report = quantize_with_gate(digits_mlp, dst, xva, labels=yva, config=QuantizeConfig(mode="fp16"))
    assert report.kept
    assert report.max_abs_diff < 0.05
    model = onnx.load(dst)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    assert report.quantized_bytes < 0.6 * report.parent_bytes


def test_a_model_that_fails_the_gate_is_not_kept(digits, digits_mlp, tmp_path):
    _, _, xva, yva = digits
    dst = tmp_path / "strict.onnx"
    # No int8 model agrees on every row and gains accuracy: the strictest gate.
    strict = QuantizeConfig(mode="dynamic", min_agreement=1.0, max_metric_drop=0.0)
    shuffled = np.random.default_rng(0).permutation(yva)  # labels the parent gets mostly wrong
    report = quantize_with_gate(digits_mlp, str(dst), xva + np.float32(0.35), labels=shuffled, config=strict)
    if report.kept:  # pragma: no cover - would mean int8 matched fp32 exactly
        pytest.fail(f"expected a rejection: {report}")
    assert not dst.exists()
    assert report.reasons
    assert any("top-1 agreement" in r or "accuracy drop" in r for r in report.reasons)
    with pytest.raises(PreconditionFailedError, match="failed its accuracy gate"):
        require_kept(report)


def test_bad_settings_name_the_field(digits_mlp, tmp_path):
    with pytest.raises(ConfigError, match="quantize.mode"):
        QuantizeConfig(mode="int4")
    with pytest.raises(ConfigError, match="min_agreement"):
        QuantizeConfig(min_agreement=1.5)
    with pytest.raises(ConfigError, match="labels has 3 rows"):
        quantize_with_gate(digits_mlp, str(tmp_path / "x.onnx"), np.zeros((10, 64), np.float32),
                           labels=np.zeros(3))
    with pytest.raises(ConfigError, match="at least 2 rows"):
        quantize_with_gate(digits_mlp, str(tmp_path / "x.onnx"), np.zeros((1, 64), np.float32))
