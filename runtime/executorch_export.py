"""Export a torch module to an ExecuTorch program (.pte) for edge devices, and run one.

The program is captured with ``torch.export``, lowered to the XNNPACK delegate
(CPU kernels for x86-64 and Arm) and serialized as a .pte file, which the
ExecuTorch runtime (the C++ ``flywheel-edge-run`` built by the repository's
CMakeLists.txt, or the Python runtime here) loads without torch.

Batch dimension. A batchable signature is exported with a dynamic first
dimension taking 1..``max_batch`` rows; ExecuTorch plans memory for
``max_batch`` rows, and a call with more is refused. We trace with
``min(max_batch, 16)`` rows, not 2, and this is why: when the edge lowering
re-traces a convolution, torch's fake-tensor convolution asks which CPU
convolution backend it would pick, a choice that compares the batch with 16.
That comparison narrows the batch symbol's range to the side the example
batch lies on, and memory planning then sizes every buffer for the narrowed
upper bound: traced with fewer than 16 rows, a convolution model silently
takes at most 15 rows whatever ``max_batch`` says (this is the "15-row cap"
of convolution models; XNNPACK is not the cause, an unlowered program has it
too). Traced with 16 rows the range narrows to 16..max_batch instead; the
graph is identical either way (the choice only affects a memory-format hint)
and the runtime enforces only the upper bound, so the program takes 1..max_batch
rows. Rather than trust that, every export runs the written program at 1 and
at ``max_batch`` rows before returning and compares fp32 programs with torch.

Quantization (``quantize="int8"``): torchao's pt2e flow with ExecuTorch's
XNNPACK quantizer: int8 symmetric per-output-channel weights and int8
activations with static (calibrated) ranges, from the rows of
``calibration``. Linear and convolution layers run as int8 XNNPACK kernels.

ExecuTorch and torchao are imported inside the functions: importing this
module needs neither, and without them every call raises
:class:`UnavailableError` with the install hint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from flywheel.protocol.errors import ConfigError, InvalidInputError, UnavailableError
from flywheel.runtime.signature import Signature

INSTALL_HINT = "pip install 'flywheel-ml[edge]'"
QUANTIZE_MODES = ("int8",)
MAX_BATCH_LIMIT = 1 << 16
# See the module docstring: tracing with at least 16 rows keeps convolution
# models from being planned for 15 rows.
_TRACE_ROWS = 16
_DATATYPES = ("FP32", "INT64")
# ExecuTorch ScalarType codes of the datatypes above (scalar_type.h).
_SCALAR_TYPES = {6: np.dtype(np.float32), 4: np.dtype(np.int64)}


def _unavailable(exc: BaseException) -> UnavailableError:
    return UnavailableError(f"ExecuTorch is not installed or unusable ({exc}); {INSTALL_HINT}")


def executorch_version() -> str:
    """The installed ExecuTorch version (e.g. ``1.5.1+cpu``), for artifact
    metadata; UnavailableError if ExecuTorch is missing."""
    try:
        from executorch.version import __version__
    except ImportError as exc:
        raise _unavailable(exc) from None
    return str(__version__)


def _check_signature(signature: Any) -> None:
    if not isinstance(signature, Signature):
        raise ConfigError(f"signature must be a Signature, got {type(signature).__name__}")
    for spec in (*signature.inputs, *signature.outputs):
        if spec.datatype not in _DATATYPES:
            raise ConfigError(
                f"signature: tensor {spec.name!r} is {spec.datatype}; "
                f"ExecuTorch export supports {_DATATYPES}"
            )
        if any(d == -1 for d in spec.shape[1:]):
            raise ConfigError(
                f"signature: tensor {spec.name!r} has shape {list(spec.shape)}; "
                "only the first (batch) dimension may be variable"
            )
    if not signature.batchable:
        for spec in signature.inputs:
            if any(d == -1 for d in spec.shape):
                raise ConfigError(
                    f"signature: input {spec.name!r} has a variable first dimension "
                    "but the signature is not batchable (every input and output needs one)"
                )


def _check_arguments(
    signature: Any, path: Any, quantize: Any, calibration: Any, max_batch: Any
) -> np.ndarray | None:
    """Validate what needs no torch; returns the calibration rows as float32."""
    _check_signature(signature)
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ConfigError(f"path must be a non-empty file path, got {path!r}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, (int, np.integer)):
        raise ConfigError(f"max_batch must be an integer, got {max_batch!r}")
    if not 1 <= max_batch <= MAX_BATCH_LIMIT:
        raise ConfigError(f"max_batch must be in [1, {MAX_BATCH_LIMIT}], got {max_batch}")
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ConfigError(f"quantize must be None or one of {QUANTIZE_MODES}, got {quantize!r}")
    if quantize is None:
        if calibration is not None:
            raise ConfigError("calibration is only used with quantize='int8'; pass quantize='int8'")
        return None
    if calibration is None:
        raise ConfigError("calibration rows are required with quantize='int8'")
    if len(signature.inputs) != 1:
        raise ConfigError(
            f"calibration: int8 export takes one calibration array, so the model must have "
            f"one input; it has {len(signature.inputs)}"
        )
    spec = signature.inputs[0]
    if spec.datatype != "FP32":
        raise ConfigError(f"calibration: int8 export needs an FP32 input, {spec.name!r} is {spec.datatype}")
    if not isinstance(calibration, np.ndarray) or calibration.dtype.kind != "f":
        raise ConfigError(
            f"calibration must be a floating-point numpy array, got "
            f"{getattr(calibration, 'dtype', type(calibration).__name__)}"
        )
    want = list(spec.shape[1:])
    if calibration.ndim != len(spec.shape) or list(calibration.shape[1:]) != want:
        raise ConfigError(
            f"calibration has shape {list(calibration.shape)}; input {spec.name!r} "
            f"needs [rows, {', '.join(map(str, want))}]"
        )
    rows_needed = 1 if signature.batchable else spec.shape[0]
    if calibration.shape[0] < rows_needed:
        raise ConfigError(f"calibration needs at least {rows_needed} row(s), got {calibration.shape[0]}")
    if not np.isfinite(calibration).all():
        raise ConfigError("calibration holds NaN or infinite values")
    return np.ascontiguousarray(calibration, dtype=np.float32)


def _example(spec: Any, rows: int, rng: np.random.Generator) -> np.ndarray:
    shape = tuple(rows if d == -1 else d for d in spec.shape)
    if spec.datatype == "FP32":
        return rng.standard_normal(shape).astype(np.float32)
    # Zeros are a valid index for any embedding-like input.
    return np.zeros(shape, dtype=np.int64)


def export_executorch(
    module: Any,
    signature: Signature,
    path: str,
    *,
    quantize: str | None = None,
    calibration: np.ndarray | None = None,
    max_batch: int = 64,
) -> str:
    """Write ``module`` to ``path`` as an ExecuTorch program lowered to XNNPACK.

    module: a ``torch.nn.Module`` whose inputs and outputs follow ``signature``
        (FP32 or INT64 tensors; only the first dimension may be variable). It
        is put in eval mode.
    path: the .pte file to write (its folder is created; the file is replaced
        atomically, so a reader never sees half a program).
    quantize: None (fp32) or ``"int8"`` (see the module docstring).
    calibration: for int8, representative input rows ``[rows, *input dims]``
        (a few hundred is plenty); rejected without ``quantize``.
    max_batch: the most rows one call may carry (a batchable signature); the
        program takes 1..max_batch rows and memory is planned for max_batch.
        1 exports a fixed batch of one row. Ignored for a signature without a
        variable batch dimension.

    Returns ``path``. Raises ConfigError naming the bad argument,
    UnavailableError (with the install hint) without ExecuTorch, and
    RuntimeError if the written program fails its check against torch.
    """
    calib = _check_arguments(signature, path, quantize, calibration, max_batch)
    import torch

    if not isinstance(module, torch.nn.Module):
        raise ConfigError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    try:
        # torchao, imported on the way, logs missing GPU kernels at WARNING
        with _quiet_loggers("torchao"):
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
            from executorch.exir import to_edge_transform_and_lower
    except ImportError as exc:
        raise _unavailable(exc) from None

    path = os.fspath(path)
    max_batch = int(max_batch)
    module.eval()
    dynamic = signature.batchable and max_batch > 1
    rows = min(max_batch, _TRACE_ROWS) if dynamic else 1
    rng = np.random.default_rng(0)
    examples = tuple(torch.from_numpy(_example(s, rows, rng)) for s in signature.inputs)
    dynamic_shapes = None
    if dynamic:
        batch = torch.export.Dim("batch", min=1, max=max_batch)
        dynamic_shapes = tuple({0: batch} for _ in signature.inputs)

    # torch.export and torchao warn about their own deprecations and missing
    # GPU kernels on every export; none of it is actionable here.
    with torch.no_grad(), warnings.catch_warnings(), _quiet_loggers("torchao"):
        warnings.simplefilter("ignore")
        graph = module
        if quantize == "int8":
            chunk = max_batch if dynamic else examples[0].shape[0]
            graph = _quantize_int8(module, examples, dynamic_shapes, calib, chunk)
        exported = torch.export.export(graph, examples, dynamic_shapes=dynamic_shapes)
        program = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()]).to_executorch()

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            program.write_to_file(f)
        # Checked before it takes the final name, so a program that fails
        # never replaces a good one.
        batches = sorted({1, max_batch}) if dynamic else [1]
        _check(module, signature, tmp, batches, exact=quantize is None, name=path)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _quantize_int8(
    module: Any, examples: tuple, dynamic_shapes: Any, calibration: np.ndarray, chunk: int
) -> Any:
    """The pt2e-quantized graph of ``module``, calibrated on ``calibration``."""
    import torch

    try:
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError as exc:
        raise _unavailable(exc) from None

    captured = torch.export.export(module, examples, dynamic_shapes=dynamic_shapes).module()
    quantizer_cls = XNNPACKQuantizer
    if not any("batch_norm" in str(n.target) for n in captured.graph.nodes):
        # The convolution + batch-norm patterns are traced with torch.export
        # on every annotation (about 3 s here) and cannot match a graph
        # without batch norm; skipping them changes nothing else.
        class _NoBatchNormQuantizer(XNNPACKQuantizer):
            SUPPORTED_PATTERNS = [p for p in XNNPACKQuantizer.SUPPORTED_PATTERNS if "_bn" not in p.name]

        quantizer_cls = _NoBatchNormQuantizer
    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)
    prepared = prepare_pt2e(captured, quantizer_cls().set_global(config))
    # A fixed-batch graph only takes whole chunks; _check_arguments ensured
    # there is at least one.
    usable = len(calibration) if dynamic_shapes else len(calibration) // chunk * chunk
    for start in range(0, usable, chunk):
        prepared(torch.from_numpy(calibration[start : start + chunk]))
    return convert_pt2e(prepared)


def _check(
    module: Any, signature: Signature, program_file: str, batches: list[int], *, exact: bool, name: str
) -> None:
    """Run ``program_file`` at each batch size: outputs must have torch's
    shapes and be finite, and for fp32 match torch. Errors call it ``name``."""
    import torch

    program = load_executorch(program_file)
    rng = np.random.default_rng(1)
    for rows in batches:
        feeds = [_example(s, rows, rng) for s in signature.inputs]
        try:
            got = program(feeds)
        except InvalidInputError as exc:
            raise RuntimeError(f"ExecuTorch export {name} does not take {rows} rows: {exc}") from None
        with torch.no_grad():
            want = module(*[torch.from_numpy(a) for a in feeds])
        want = want if isinstance(want, (tuple, list)) else (want,)
        if len(got) != len(want):
            raise RuntimeError(f"ExecuTorch export {name}: {len(got)} outputs, torch gives {len(want)}")
        for i, (g, w) in enumerate(zip(got, want)):
            w = w.numpy()
            if g.shape != w.shape:
                raise RuntimeError(
                    f"ExecuTorch export {name}: output {i} has shape {g.shape} at {rows} rows, "
                    f"torch gives {w.shape}"
                )
            if not np.isfinite(g).all():
                raise RuntimeError(f"ExecuTorch export {name}: output {i} is not finite at {rows} rows")
            if exact and not np.allclose(g, w, atol=1e-4, rtol=1e-4):
                raise RuntimeError(f"ExecuTorch export {name}: output {i} disagrees with torch at {rows} rows")


class ExecuTorchProgram:
    """The ``forward`` method of a .pte file, loaded once through
    ExecuTorch's Python runtime. Not thread-safe: one call at a time."""

    def __init__(self, path: str) -> None:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ConfigError(f"path {path!r} is not a file")
        try:
            from executorch.runtime import Runtime
        except ImportError as exc:
            raise _unavailable(exc) from None
        try:
            with _native_stderr_captured() as native_log:
                program = Runtime.get().load_program(path)
                self._method = program.load_method("forward")
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(f"path {path!r} is not a loadable ExecuTorch program: {exc}"
                              f"{': ' + native_log.text.strip() if native_log.text.strip() else ''}") from None
        if self._method is None:
            raise ConfigError(f"path {path!r}: the program has no 'forward' method")
        meta = self._method.metadata
        self.path = path
        self.input_bounds: list[tuple[int, ...]] = []
        self.input_dtypes: list[np.dtype | None] = []
        for i in range(meta.num_inputs()):
            info = meta.input_tensor_meta(i)
            self.input_bounds.append(tuple(info.sizes()))
            self.input_dtypes.append(_SCALAR_TYPES.get(info.dtype()))

    def __call__(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run ``forward``; InvalidInputError names an input that does not fit
        (count, dtype, rank, or a dimension above the program's bound)."""
        import torch

        if len(inputs) != len(self.input_bounds):
            raise InvalidInputError(
                f"the program takes {len(self.input_bounds)} input(s), got {len(inputs)}"
            )
        tensors = []
        for i, (arr, bound, dtype) in enumerate(zip(inputs, self.input_bounds, self.input_dtypes)):
            if not isinstance(arr, np.ndarray):
                raise InvalidInputError(f"input {i} must be a numpy array, got {type(arr).__name__}")
            if dtype is not None and arr.dtype != dtype:
                raise InvalidInputError(f"input {i}: the program wants {dtype}, got {arr.dtype}")
            if arr.ndim != len(bound) or any(g > b for g, b in zip(arr.shape, bound)):
                raise InvalidInputError(
                    f"input {i}: shape {list(arr.shape)} does not fit the program's input, "
                    f"at most {list(bound)}"
                )
            tensors.append(torch.from_numpy(np.ascontiguousarray(arr)))
        outputs = self._method.execute(tensors)
        # Outputs may alias the method's planned memory, which the next call
        # overwrites.
        return [
            o.detach().numpy().copy() if isinstance(o, torch.Tensor) else np.asarray(o)
            for o in outputs
        ]


class _Captured:
    text = ""


_STDERR_LOCK = threading.Lock()  # fd 2 is process-wide: one capture at a time


@contextlib.contextmanager
def _native_stderr_captured():
    """Collect what native code writes to fd 2 meanwhile: ExecuTorch's
    XNNPACK set-up logs CPU probing lines ("Failed to open midr file ...") at
    every program load, which would bury a CLI's output. The text is kept
    for an error message and written back to stderr if the block fails."""
    captured = _Captured()
    with _STDERR_LOCK, tempfile.TemporaryFile() as sink:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        failed = True
        try:
            yield captured
            failed = False
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.text = sink.read().decode(errors="replace")[-4000:]
            if failed and captured.text:
                sys.stderr.write(captured.text)


def load_executorch(path: str) -> ExecuTorchProgram:
    """Load ``path`` once for repeated calls (latency measurements); ConfigError
    if it is not a loadable program, UnavailableError without ExecuTorch."""
    return ExecuTorchProgram(path)


def run_executorch(path: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Run the program at ``path`` once on ``inputs`` (in the program's input
    order) with ExecuTorch's Python runtime; returns its outputs as new arrays.
    For parity checks; use :func:`load_executorch` to call a program many times."""
    return load_executorch(path)(inputs)
