"""The candidate and production judged on the same held-out rows (loops/evaluate.py):
real ONNX Runtime, a real SQLite registry, the digits data."""

from __future__ import annotations

import numpy as np

from flywheel.loops.evaluate import evaluate_on_heldout, onnx_accuracy
from flywheel.registry import Registry

JOB = {"name": "digits", "model": {"architecture": "mlp", "hparams": {}}, "dataset": {"kind": "digits"}, "seed": 3}


def test_both_versions_are_recorded_on_one_fingerprint(tmp_path, mlp_onnx):
    reg = Registry.open(f"sqlite:///{tmp_path}/reg.db", str(tmp_path / "a"))
    try:
        for _ in range(2):
            reg.register_version("digits", {"model.onnx": mlp_onnx}, actor="t")
        out = evaluate_on_heldout(reg, "digits", 2, 1, JOB, "run-1")
        cand, prod = reg.evaluations("digits", 2), reg.evaluations("digits", 1)
        assert cand[0].fingerprint == prod[0].fingerprint == out["fingerprint"]
        assert cand[0].rows == out["rows"] == 359  # the 20 % held out of 1,797 digits
        assert cand[0].metrics["val_accuracy"] == out["candidate_val_accuracy"]
        assert out["production_val_accuracy"] == out["candidate_val_accuracy"]  # the same weights
        assert evaluate_on_heldout(reg, "digits", 2, None, JOB, "run-2").keys() >= {"candidate_val_accuracy"}
    finally:
        reg.close()


def test_accuracy_is_top1_against_the_labels(mlp_onnx):
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((50, 64)).astype(np.float32)
    session = ort.InferenceSession(mlp_onnx, providers=["CPUExecutionProvider"])
    predicted = session.run(None, {session.get_inputs()[0].name: x})[0].argmax(axis=1)
    assert onnx_accuracy(mlp_onnx, x, predicted) == 1.0
    assert onnx_accuracy(mlp_onnx, x, (predicted + 1) % 10) == 0.0
