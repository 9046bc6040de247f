"""Export a torch module to ONNX with a variable batch dimension, checked
against torch before the file is handed out."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from flywheel.protocol.errors import FlywheelError
from flywheel.runtime.signature import Signature

__all__ = ["ATOL", "PARITY_BATCHES", "RTOL", "ExportError", "check_parity", "export_onnx"]

# ONNX Runtime and torch reorder float sums differently; beyond this the
# graph computes something else
ATOL = 1e-4
RTOL = 1e-4
# 1 and a size other than the traced one: a batch baked into a reshape or a
# broadcast shows at one of them
PARITY_BATCHES = (1, 5)
_TRACE_ROWS = 2  # a batch of 1 lets the tracer treat the axis as a constant


class ExportError(FlywheelError):
    """A module did not export, or its ONNX file disagrees with it.

    ``stage``: ``"export"`` (torch could not capture the module as a graph)
    or ``"parity"`` (the file was written but ONNX Runtime does not run it
    or answers differently from torch). The message says which, and why.
    """

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage


def export_onnx(module: Any, signature: Signature, path: str, *, opset: int = 18,
                batches: Sequence[int] = PARITY_BATCHES) -> str:
    """Write ``module`` to ``path`` as a self-contained ONNX file (weights
    inside it, no side file) and return ``path``.

    ``module``'s forward takes the signature's inputs positionally, in
    order, whatever its parameters are called; the ONNX graph's inputs and
    outputs get the signature's names. The first dimension of every input
    and output is a variable batch axis. After writing, the file is run by
    ONNX Runtime at each of ``batches`` rows and compared with torch
    (:func:`check_parity`).

    Raises ExportError with ``stage`` ``"export"`` when torch cannot capture
    the module (data-dependent Python control flow, calls torch cannot
    trace...), ``"parity"`` when the file disagrees with the module. The
    module is put in eval mode.
    """
    import torch

    module.eval()
    rng = np.random.default_rng(0)
    examples = tuple(torch.from_numpy(_rows(spec, _TRACE_ROWS, rng)) for spec in signature.inputs)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    # by position, not by name: a user's forward may name its arguments
    # anything, and torch.export matches a dict of shapes to those names
    dynamic_shapes = tuple({0: batch} for _ in signature.inputs)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                examples,
                path,
                input_names=[s.name for s in signature.inputs],
                output_names=[s.name for s in signature.outputs],
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
    except Exception as exc:  # noqa: BLE001 - whatever the exporter raises, the caller gets one kind of error
        raise ExportError("export", f"ONNX export failed: torch could not capture {type(module).__name__}.forward "
                          f"as a graph with a variable batch axis: {_reason(exc)}") from exc
    check_parity(module, signature, path, batches)
    return path


def check_parity(module: Any, signature: Signature, path: str, batches: Sequence[int] = PARITY_BATCHES) -> None:
    """Run the ONNX file at ``path`` with ONNX Runtime at each of
    ``batches`` rows (random FP32 inputs) and compare with ``module``.
    ExportError (stage ``"parity"``) naming the batch size and the output
    when ONNX Runtime cannot run it, an output's shape differs, or a value
    differs by more than ``ATOL + RTOL * |torch value|`` (the message gives
    the largest absolute difference)."""
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    names = [s.name for s in signature.outputs]
    for rows in batches:
        feeds = {s.name: _rows(s, rows, rng) for s in signature.inputs}
        where = f"ONNX parity check failed at batch {rows}"
        try:
            got = sess.run(None, feeds)
        except Exception as exc:  # noqa: BLE001 - ORT's own error types; the message is what matters
            raise ExportError("parity", f"{where}: ONNX Runtime cannot run {path}: {_reason(exc)} "
                              "(a batch size baked into the graph?)") from exc
        with torch.inference_mode():
            want = module(*[torch.from_numpy(feeds[s.name]) for s in signature.inputs])
        want = want if isinstance(want, (tuple, list)) else (want,)
        if len(got) != len(want):
            raise ExportError("parity", f"{where}: the file has {len(got)} outputs, torch gives {len(want)}")
        for i, (g, w) in enumerate(zip(got, want)):
            w = w.detach().numpy()
            name = names[i] if i < len(names) else f"#{i}"
            if g.shape != w.shape:
                raise ExportError("parity", f"{where}: output {name!r} has shape {list(g.shape)}, "
                                  f"torch gives {list(w.shape)}")
            if not np.allclose(g, w, atol=ATOL, rtol=RTOL):
                diff = float(np.max(np.abs(g.astype(np.float64) - w.astype(np.float64))))
                raise ExportError("parity", f"{where}: output {name!r} differs from torch by up to {diff:.3g} "
                                  f"(tolerance {ATOL:g} + {RTOL:g} x |torch value|)")


def _rows(spec, rows: int, rng: np.random.Generator) -> np.ndarray:
    shape = tuple(rows if d == -1 else d for d in spec.shape)
    return rng.standard_normal(shape).astype(np.float32)


def _reason(exc: BaseException) -> str:
    """The first line of the deepest cause: the exporter wraps the error
    that says what in the module could not be captured in pages of advice."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else 'no message'}"
