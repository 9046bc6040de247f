"""Judge a candidate beside production on the same held-out rows.

The rows are the run's own validation split, rebuilt from the job spec it
submitted (the split is a seeded permutation, so it is exactly the rows the
candidate never trained on; with captured data they include what production
saw lately). Both versions' ONNX files score them through ONNX Runtime and
each result is recorded as a registry evaluation on the same fingerprint,
which is what ``not_worse_than_production`` then compares.
"""

from __future__ import annotations

import numpy as np

from flywheel.registry import fingerprint_arrays


def onnx_accuracy(path: str, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of an ONNX classifier whose first input takes ``x``'s rows."""
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    correct = 0
    for start in range(0, len(x), 1024):
        logits = session.run(None, {name: x[start:start + 1024].astype(np.float32)})[0]
        correct += int((np.asarray(logits).argmax(axis=1) == y[start:start + 1024]).sum())
    return correct / len(y)


def evaluate_on_heldout(registry, model: str, candidate: int, production: int | None, job: dict,
                        run_id: str) -> dict:
    """Score ``candidate`` and ``production`` (None: nothing in production)
    on the held-out split of ``job``'s dataset; record both evaluations.
    Returns the dataset name, fingerprint, rows and each version's
    ``val_accuracy``."""
    from flywheel.training.data import load_data
    from flywheel.training.spec import parse_spec

    spec = parse_spec(job)
    data = load_data(spec.dataset, seed=spec.seed)
    x, y = data.x_val, data.y_val
    if len(y) == 0:
        x, y = data.x_train, data.y_train  # validation_fraction 0: the training rows are all there is
    fp = fingerprint_arrays(x, y)
    dataset = f"loop-heldout:{run_id}"
    out: dict = {"dataset": dataset, "fingerprint": fp, "rows": int(len(y))}
    for role, version in (("candidate", candidate), ("production", production)):
        if version is None:
            continue
        _, path = registry.artifact_path(f"{model}/{version}", "model.onnx")
        acc = onnx_accuracy(path, x, y)
        registry.add_evaluation(model, version, dataset=dataset, fingerprint=fp, metrics={"val_accuracy": acc},
                                rows=int(len(y)), run_id=run_id, actor=f"loop-run:{run_id}")
        out[f"{role}_val_accuracy"] = acc
    return out
