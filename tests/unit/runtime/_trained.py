"""Digits models trained for the quantization and edge-export tests."""

from __future__ import annotations

import numpy as np

MLP = {"in_features": 64, "hidden": [128, 64], "out_features": 10}
CNN = {"channels": 1, "size": 8, "classes": 10}


def train_onnx(arch: str, hparams: dict, x: np.ndarray, y: np.ndarray, epochs: int, path: str) -> str:
    """Train, write the ONNX export to ``path`` and the weights beside it
    (``.safetensors``); returns ``path``."""
    import torch
    from safetensors.torch import save_file

    from flywheel.runtime.architectures import build
    from flywheel.runtime.export import export_onnx

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: threads only add sync cost (10x slower on a busy 2-core box)
    model, sig = build(arch, hparams)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        for i in range(0, len(xt), 64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[i:i + 64]), yt[i:i + 64]).backward()
            opt.step()
    torch.set_num_threads(threads)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path.replace(".onnx", ".safetensors"))
    return export_onnx(model.eval(), sig, path)
