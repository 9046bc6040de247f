"""Post-training quantization of ONNX models, kept only past an accuracy gate.

Modes (ONNX Runtime's quantization tools):
- ``dynamic``: int8 weights, activations quantized on the fly per batch. Suits
  MLPs and transformers (MatMul/Gemm-heavy graphs).
- ``static``: QDQ format, uint8 activations and int8 per-channel weights,
  activation ranges calibrated (MinMax) on the model's reference sample.
  Convolutions need this: dynamic int8 convolutions measured several times
  *slower* than fp32 on ONNX Runtime's CPU provider.
- ``fp16``: float16 weights and arithmetic, inputs and outputs kept float32
  (the V2 signature does not change). For GPU targets; on the CPU provider it
  only halves the file.
- ``auto``: ``static`` when the graph has a convolution, else ``dynamic``.

The gate compares the quantized model with its fp32 parent on held-out rows
(never the calibration rows): top-1 agreement of the first output (a
classifier's scores) and, where labels are given, the drop in accuracy in
percentage points. A model that fails is deleted and the report says why.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Mapping

import msgspec
import numpy as np

from flywheel.protocol.errors import ConfigError, PreconditionFailedError

MODES = ("auto", "dynamic", "static", "fp16")
_CONV_OPS = frozenset({"Conv", "ConvTranspose", "QLinearConv", "ConvInteger"})

Feeds = Mapping[str, np.ndarray]


class QuantizeConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How to quantize and what the result must keep.

    mode: one of MODES. per_channel: per-output-channel weight scales.
    reduce_range: 7-bit int8 weights. On x86-64 without VNNI, ONNX Runtime's
        u8 x s8 kernels add pairs of products in int16 (VPMADDUBSW), which
        saturates with full-range weights: a small CNN here agreed with its
        fp32 parent on 98.3 % of rows with full range, 100 % with 7 bits.
        ARM and VNNI CPUs do not need it; it costs one bit of weight precision.
    calibration_rows: reference rows used to calibrate (static); the rest of
        the reference sample is the gate's held-out set.
    min_agreement: top-1 agreement with the fp32 parent on held-out rows.
    max_metric_drop: the largest drop in accuracy, in percentage points.
    latency_batches: batch sizes timed for the report.
    """

    mode: str = "auto"
    per_channel: bool = True
    reduce_range: bool = True
    calibration_rows: int = 128
    min_agreement: float = 0.99
    max_metric_drop: float = 1.0
    latency_batches: tuple[int, ...] = (1, 32)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"quantize.mode {self.mode!r} must be one of {MODES}")
        if self.calibration_rows < 1:
            raise ConfigError("quantize.calibration_rows must be >= 1")
        if not 0.0 <= self.min_agreement <= 1.0:
            raise ConfigError("quantize.min_agreement must lie in [0, 1]")
        if self.max_metric_drop < 0:
            raise ConfigError("quantize.max_metric_drop must be >= 0 (percentage points)")
        if not self.latency_batches or min(self.latency_batches) < 1:
            raise ConfigError("quantize.latency_batches must be batch sizes >= 1")


class GateReport(msgspec.Struct, frozen=True):
    """What the gate measured. Sizes in bytes, latencies in ms (median, one
    thread); metrics in percent; metric fields are None without labels."""

    mode: str
    kept: bool
    reasons: list[str]
    heldout_rows: int
    calibration_rows: int
    top1_agreement: float
    max_abs_diff: float
    parent_accuracy: float | None
    quantized_accuracy: float | None
    accuracy_drop: float | None
    parent_bytes: int
    quantized_bytes: int
    parent_latency_ms: dict[str, float]
    quantized_latency_ms: dict[str, float]


def graph_ops(path: str) -> set[str]:
    import onnx

    model = onnx.load(path, load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    for fn in model.functions:  # dynamo exports can wrap modules in local functions
        ops |= {n.op_type for n in fn.node}
    return ops


def choose_mode(path: str) -> str:
    """``static`` for graphs with convolutions, ``dynamic`` otherwise."""
    return "static" if graph_ops(path) & _CONV_OPS else "dynamic"


def ort_session(path: str):
    """A CPU session on one thread (latency figures comparable across models)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def as_feeds(path: str, data: np.ndarray | Feeds) -> dict[str, np.ndarray]:
    """Rows for every model input: a dict by input name, or one array for a
    single-input model. Each is cast to the input's element type."""
    from flywheel.protocol.datatypes import numpy_dtype
    from flywheel.runtime.backends.onnx_backend import _ORT_TO_V2

    inputs = ort_session(path).get_inputs()
    if not isinstance(data, Mapping):
        if len(inputs) != 1:
            raise ConfigError(f"the model has {len(inputs)} inputs: give the sample as a dict by input name")
        data = {inputs[0].name: data}
    feeds = {}
    for spec in inputs:
        if spec.name not in data:
            raise ConfigError(f"sample has no rows for model input {spec.name!r}")
        feeds[spec.name] = np.ascontiguousarray(data[spec.name], dtype=numpy_dtype(_ORT_TO_V2[spec.type]))
    rows = {len(a) for a in feeds.values()}
    if len(rows) != 1:
        raise ConfigError(f"sample inputs have different row counts {sorted(rows)}")
    return feeds


def _rows(feeds: Feeds, idx) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in feeds.items()}


def quantize_onnx(src: str, dst: str, mode: str, calibration: Feeds | None = None, *,
                  per_channel: bool = True, reduce_range: bool = True) -> str:
    """Write the quantized model to ``dst``; ``calibration`` (feeds) is needed
    for ``static``. Returns the mode used (``auto`` resolved)."""
    if mode == "auto":
        mode = choose_mode(src)
    if mode not in MODES:
        raise ConfigError(f"quantize.mode {mode!r} must be one of {MODES}")
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    if mode == "fp16":
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(onnx.load(src), keep_io_types=True)
        onnx.save(model, dst)
        return mode
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="fw-quant-") as tmp:
        # Shape inference and graph clean-up first, as ONNX Runtime advises:
        # without shapes some MatMuls are left in float.
        prepared = os.path.join(tmp, "prepared.onnx")
        quant_pre_process(src, prepared, skip_symbolic_shape=True)
        if mode == "dynamic":
            quantize_dynamic(prepared, dst, weight_type=QuantType.QInt8, per_channel=per_channel,
                             reduce_range=reduce_range)
        else:
            if not calibration:
                raise ConfigError("static quantization needs calibration rows (the model's reference sample)")
            quantize_static(prepared, dst, _Reader(calibration), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            per_channel=per_channel, reduce_range=reduce_range)
    return mode


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over feeds, in batches."""

    def __init__(self, feeds: Feeds, batch: int = 32) -> None:
        n = len(next(iter(feeds.values())))
        self._batches = iter([_rows(feeds, slice(i, i + batch)) for i in range(0, n, batch)])

    def get_next(self):
        return next(self._batches, None)

    def __iter__(self):  # newer ORT versions iterate the reader
        return iter(self.get_next, None)


def median_call_ms(fn, runs: int, warmup: int = 5) -> float:
    """Median wall time of ``fn()`` in ms, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def latency_ms(path: str, feeds: Feeds, batch: int, runs: int = 50) -> float:
    """Median latency of one call at ``batch`` rows, one thread."""
    sess = ort_session(path)
    n = len(next(iter(feeds.values())))
    x = _rows(feeds, np.arange(batch) % n)
    return median_call_ms(lambda: sess.run(None, x), runs)


def compare(parent: str, child: str, feeds: Feeds, labels: np.ndarray | None = None) -> dict:
    """Top-1 agreement, max |diff| of the first output, and accuracies (%)."""
    want = ort_session(parent).run(None, dict(feeds))[0]
    got = ort_session(child).run(None, dict(feeds))[0]
    if want.ndim < 2 or want.shape[-1] < 2:
        raise ConfigError("the accuracy gate needs a classifier: the first output must be [rows, classes]")
    top_w, top_g = want.argmax(-1), got.argmax(-1)
    out = {"top1_agreement": float((top_w == top_g).mean()),
           "max_abs_diff": float(np.max(np.abs(got.astype(np.float64) - want))),
           "parent_accuracy": None, "quantized_accuracy": None, "accuracy_drop": None}
    if labels is not None:
        labels = np.asarray(labels).reshape(top_w.shape)
        out["parent_accuracy"] = 100.0 * float((top_w == labels).mean())
        out["quantized_accuracy"] = 100.0 * float((top_g == labels).mean())
        out["accuracy_drop"] = out["parent_accuracy"] - out["quantized_accuracy"]
    return out


def split_reference(rows: int, calibration_rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint calibration and held-out row indices from one reference
    sample (at least a quarter of it, and one row, held out)."""
    if rows < 2:
        raise ConfigError("the reference sample needs at least 2 rows (calibration and held-out)")
    order = np.random.default_rng(seed).permutation(rows)
    cut = min(calibration_rows, rows - max(1, rows // 4))
    return np.sort(order[:cut]), np.sort(order[cut:])


def quantize_with_gate(src: str, dst: str, reference: np.ndarray | Feeds, *, labels: np.ndarray | None = None,
                       config: QuantizeConfig | None = None) -> GateReport:
    """Quantize ``src`` into ``dst`` and keep it only if it passes the gate.

    ``reference`` is the model's reference sample (rows per input): the
    calibration rows and the held-out rows are drawn from it, disjoint;
    ``labels`` (one per reference row) enable the accuracy-drop check. The
    report is returned either way; ``dst`` exists only when ``kept``.
    """
    cfg = config or QuantizeConfig()
    feeds = as_feeds(src, reference)
    n = len(next(iter(feeds.values())))
    if labels is not None and len(labels) != n:
        raise ConfigError(f"labels has {len(labels)} rows, the reference sample {n}")
    calib_idx, held_idx = split_reference(n, cfg.calibration_rows)
    held = _rows(feeds, held_idx)
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix="fw-quant-", dir=parent)
    try:
        candidate = os.path.join(tmp_dir, "model.onnx")
        mode = quantize_onnx(src, candidate, cfg.mode, _rows(feeds, calib_idx), per_channel=cfg.per_channel,
                             reduce_range=cfg.reduce_range)
        cmp = compare(src, candidate, held, None if labels is None else np.asarray(labels)[held_idx])
        reasons = []
        if cmp["top1_agreement"] < cfg.min_agreement:
            reasons.append(f"top-1 agreement {cmp['top1_agreement']:.4f} < min_agreement {cfg.min_agreement}")
        if cmp["accuracy_drop"] is not None and cmp["accuracy_drop"] > cfg.max_metric_drop:
            reasons.append(f"accuracy drop {cmp['accuracy_drop']:.2f} points > max_metric_drop {cfg.max_metric_drop}")
        lat = lambda p: {str(b): latency_ms(p, held, b) for b in cfg.latency_batches}  # noqa: E731
        report = GateReport(
            mode=mode, kept=not reasons, reasons=reasons, heldout_rows=len(held_idx),
            calibration_rows=len(calib_idx) if mode == "static" else 0,
            parent_bytes=os.path.getsize(src), quantized_bytes=os.path.getsize(candidate),
            parent_latency_ms=lat(src), quantized_latency_ms=lat(candidate), **cmp,
        )
        if report.kept:
            os.replace(candidate, dst)
        return report
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def require_kept(report: GateReport) -> GateReport:
    """Raise PreconditionFailedError (with the reasons) for a rejected model."""
    if not report.kept:
        raise PreconditionFailedError(f"the {report.mode} quantized model failed its accuracy gate: "
                                      + "; ".join(report.reasons))
    return report
