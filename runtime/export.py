"""Export a torch module to ONNX with a variable batch dimension."""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np

from flywheel.runtime.signature import Signature


def export_onnx(module: Any, signature: Signature, path: str, *, opset: int = 18) -> str:
    """Write ``module`` to ``path`` as a self-contained ONNX file.

    The first dimension of every input and output is exported as a variable
    batch axis. We trace with a batch of 2 (a batch of 1 can bake a constant
    into reshapes) and check the file with ONNX Runtime at batch 3 against
    torch before returning. Weights are stored inside the file (no side file).
    """
    import torch

    module.eval()
    rows = 2
    examples = []
    for spec in signature.inputs:
        shape = tuple(rows if d == -1 else d for d in spec.shape)
        examples.append(torch.randn(shape))
    in_names = [s.name for s in signature.inputs]
    out_names = [s.name for s in signature.outputs]
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    dynamic_shapes = {name: {0: batch} for name in in_names}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            tuple(examples),
            path,
            input_names=in_names,
            output_names=out_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    _check(module, signature, path)
    return path


def _check(module: Any, signature: Signature, path: str, rows: int = 3) -> None:
    import onnxruntime as ort
    import torch

    feeds = {}
    for spec in signature.inputs:
        shape = tuple(rows if d == -1 else d for d in spec.shape)
        feeds[spec.name] = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = sess.run(None, feeds)
    with torch.inference_mode():
        want = module(*[torch.from_numpy(feeds[s.name]) for s in signature.inputs])
    want = want if isinstance(want, (tuple, list)) else (want,)
    for g, w in zip(got, want):
        if not np.allclose(g, w.numpy(), atol=1e-4, rtol=1e-4):
            raise RuntimeError(f"ONNX export of {path} disagrees with torch")
