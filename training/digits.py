"""The demo model: an MLP on scikit-learn's bundled digits (8x8 images).

Plain PyTorch for now (Ray Train jobs arrive with the training issue). Writes
the weights (safetensors), the ONNX export, a held-out reference sample and a
ready-to-send V2 request into one folder, and registers them with lineage.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import TextIO

import msgspec
import numpy as np

from flywheel.runtime.architectures import build
from flywheel.runtime.export import export_onnx

HPARAMS = {"in_features": 64, "hidden": [128, 64], "out_features": 10}
# What a client does to a raw image before sending it (recorded with exports).
PREPROCESSING = {"input": "8x8 grayscale digit, 16 levels (sklearn digits), flattened row-major to 64 values",
                 "scale": "pixel / 16.0 -> [0, 1]", "dtype": "float32"}


@dataclass(frozen=True)
class DigitsResult:
    onnx_path: str
    weights_path: str
    example_path: str
    val_accuracy: float


def load_digits_split(seed: int = 0):
    """Digits scaled to [0, 1], split 80/20 with a fixed seed."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    idx = np.random.default_rng(seed).permutation(len(x))
    cut = int(0.8 * len(x))
    return x[idx[:cut]], y[idx[:cut]], x[idx[cut:]], y[idx[cut:]]


def train_digits(
    out_dir: str,
    *,
    epochs: int = 15,
    batch_size: int = 64,
    lr: float = 1e-2,
    seed: int = 0,
    progress: TextIO | None = sys.stdout,
) -> DigitsResult:
    """Train, export and write the artifacts to ``out_dir``; prints one
    progress line per epoch to ``progress`` (None for silence)."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    xtr, ytr, xva, yva = load_digits_split(seed)
    model, signature = build("mlp", HPARAMS)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    loss_fn = torch.nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(xtr), torch.from_numpy(ytr)
    xv, yv = torch.from_numpy(xva), torch.from_numpy(yva)
    gen = torch.Generator().manual_seed(seed)
    acc = 0.0
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), batch_size):
            b = order[i : i + batch_size]
            opt.zero_grad()
            loss = loss_fn(model(xt[b]), yt[b])
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
        sched.step()
        model.eval()
        with torch.inference_mode():
            acc = float((model(xv).argmax(1) == yv).float().mean())
        if progress is not None:
            bar = "#" * epoch + "." * (epochs - epoch)
            print(
                f"  epoch {epoch:>3}/{epochs} [{bar}] loss {total / len(xt):.4f} "
                f"val acc {acc:.3f} ({time.perf_counter() - started:.2f}s)",
                file=progress, flush=True,
            )
    os.makedirs(out_dir, exist_ok=True)
    weights = os.path.join(out_dir, "model.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    if progress is not None:
        print("  exporting to ONNX ...", file=progress, flush=True)
    onnx_path = export_onnx(model, signature, os.path.join(out_dir, "model.onnx"))
    np.save(os.path.join(out_dir, "reference.npy"), xva)
    np.save(os.path.join(out_dir, "reference_labels.npy"), yva)
    example = os.path.join(out_dir, "example_request.json")
    with open(example, "w") as f:
        json.dump(
            {
                "id": "demo-1",
                "inputs": [
                    {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": xva[0].tolist()}
                ],
            },
            f,
        )
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump({"val_accuracy": acc, "epochs": epochs, "label_of_example": int(yva[0])}, f)
    return DigitsResult(onnx_path, weights, example, acc)


def train_classifier(arch: str, hparams: dict, x: np.ndarray, y: np.ndarray, epochs: int, path: str,
                     *, lr: float = 1e-2, batch_size: int = 64, seed: int = 0):
    """Train any registered architecture as a classifier (Adam, cross
    entropy) on ``x``/``y``; write the ONNX export to ``path`` and the
    safetensors weights beside it (``.safetensors``). Returns (path,
    signature). For benchmarks and tests that need a model that has learned
    something (int8 agreement means little on near-tied logits)."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: threads only add sync cost (10x slower on a busy 2-core box)
    try:
        model, sig = build(arch, hparams)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        for _ in range(epochs):
            for i in range(0, len(xt), batch_size):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(xt[i:i + batch_size]), yt[i:i + batch_size]).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path.replace(".onnx", ".safetensors"))
    return export_onnx(model.eval(), sig, path), sig


def register_digits(registry, result: DigitsResult, *, actor: str, epochs: int, seed: int = 0):
    """Register a trained digits model with its lineage: the ONNX export, the
    safetensors weights and the held-out reference sample, the data's
    fingerprint, the code version and the training config. Returns the
    ModelVersion."""
    from flywheel.registry import Lineage, code_version, fingerprint_arrays

    out_dir = os.path.dirname(result.onnx_path)
    xtr, ytr, _, _ = load_digits_split(seed)
    commit, dirty = code_version(os.path.dirname(os.path.abspath(__file__)))
    _, sig = build("mlp", HPARAMS)  # the signature the export was made with
    return registry.register_version(
        "digits",
        {
            "model.onnx": result.onnx_path,
            "model.safetensors": result.weights_path,
            "reference.npy": os.path.join(out_dir, "reference.npy"),
            # labels of the reference rows: the int8 accuracy gate's task metric
            "reference_labels.npy": os.path.join(out_dir, "reference_labels.npy"),
        },
        actor=actor,
        signature=msgspec.to_builtins(sig),
        metrics={"val_accuracy": result.val_accuracy},
        params={"architecture": "mlp", **HPARAMS},
        tags={"preprocessing": json.dumps(PREPROCESSING)},
        lineage=Lineage(
            data_fingerprint=fingerprint_arrays(xtr, ytr),
            code_commit=commit,
            code_dirty=dirty,
            training_config={"dataset": "sklearn digits", "epochs": epochs, "batch_size": 64, "lr": 1e-2,
                             "seed": seed, "optimizer": "adam", "schedule": "cosine"},
            job_id=f"demo-{int(time.time())}",
        ),
    )
