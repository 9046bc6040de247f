"""Edge export: a model as a self-describing bundle for a mobile/edge runtime.

A bundle is one folder:
- the model file(s): ``model.onnx`` (target ``onnx``), ``model.ort`` (target
  ``ort-mobile``, ONNX Runtime's mobile format) or ``model.pte`` (target
  ``executorch``, XNNPACK-delegated);
- ``required_operators.config`` for ``ort-mobile``: the reduced-operator
  config an ONNX Runtime minimal build takes (``--include_ops_by_config``);
- ``metadata.json``: inputs and outputs (V2 datatypes, -1 = variable),
  preprocessing, the source version and every file's sha256;
- ``report.json``: size, parity against the source model on a sample (fp32:
  max |diff| <= 1e-5; int8: top-1 agreement >= 98 %, plus the quantization
  gate's figures) and CPU latency at batch 1.

A bundle whose parity check fails is not written (PreconditionFailedError).
No registry here: the CLI (``flywheel export``) resolves registry references
and registers bundles as derivatives of their source version.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from flywheel.protocol.errors import ConfigError, PreconditionFailedError
from flywheel.runtime.signature import Signature

TARGETS = ("onnx", "ort-mobile", "executorch")
QUANTIZE = (None, "int8")
BUNDLE_FORMAT = "flywheel-edge-bundle/1"
FP32_MAX_ABS_DIFF = 1e-5
INT8_MIN_AGREEMENT = 0.98
SAMPLE_ROWS = 256
EXECUTORCH_MAX_BATCH = 64  # rows one call of an exported .pte may carry (memory is planned for it)

_MODEL_FILE = {"onnx": "model.onnx", "ort-mobile": "model.ort", "executorch": "model.pte"}


@dataclass
class ExportSource:
    """What a bundle is made from. ``onnx_path`` is the fp32 source of truth
    (parity is measured against it); ``architecture``/``hparams``/
    ``weights_path`` rebuild the torch module for ExecuTorch; ``reference``
    (rows of the single input) calibrates int8 and is the parity sample;
    ``labels`` (one per reference row) add the accuracy check."""

    onnx_path: str
    signature: Signature
    ref: str = ""
    reference: np.ndarray | None = None
    labels: np.ndarray | None = None
    architecture: str = ""
    hparams: Mapping[str, Any] = field(default_factory=dict)
    weights_path: str = ""
    preprocessing: Mapping[str, Any] = field(default_factory=dict)


class BundleReport(msgspec.Struct, frozen=True):
    target: str
    quantize: str | None
    path: str
    model_file: str
    size_bytes: int
    parity: dict[str, Any]
    latency_ms_batch1: float
    quantization: dict[str, Any] | None
    seconds: float


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _samples(source: ExportSource, quantized: bool):
    """(parity rows, their labels, calibration rows). fp32: reference rows (at
    most SAMPLE_ROWS), or seeded standard-normal rows where the source has no
    reference sample. int8: the reference split as the quantization gate
    splits it, so parity is measured on rows calibration never saw."""
    from flywheel.protocol.datatypes import numpy_dtype
    from flywheel.runtime.quantize import QuantizeConfig, split_reference

    (spec,) = source.signature.inputs
    if source.reference is None:
        if quantized:
            raise ConfigError("int8 export needs the model's reference sample (calibration and held-out rows)")
        shape = tuple(SAMPLE_ROWS if d == -1 else d for d in spec.shape)
        return np.random.default_rng(0).standard_normal(shape).astype(numpy_dtype(spec.datatype)), None, None
    ref = np.ascontiguousarray(source.reference, dtype=numpy_dtype(spec.datatype))
    labels = None if source.labels is None else np.asarray(source.labels)
    if labels is not None and len(labels) != len(ref):
        raise ConfigError(f"labels has {len(labels)} rows, the reference sample {len(ref)}")
    if not quantized:
        return ref[:SAMPLE_ROWS], None if labels is None else labels[:SAMPLE_ROWS], None
    calib, held = split_reference(len(ref), QuantizeConfig().calibration_rows)
    held = held[:SAMPLE_ROWS]
    return ref[held], None if labels is None else labels[held], ref[calib]


def _ort_runner(path: str) -> Callable[[np.ndarray], np.ndarray]:
    from flywheel.runtime.quantize import ort_session

    sess = ort_session(path)
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def _executorch_runner(path: str) -> Callable[[np.ndarray], np.ndarray]:
    from flywheel.runtime.executorch_export import load_executorch

    program = load_executorch(path)  # loaded once: the latency is of calls, not loads
    return lambda x: program([x])[0]


def _batch1_latency_ms(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, runs: int = 200) -> float:
    from flywheel.runtime.quantize import median_call_ms

    one = np.ascontiguousarray(x[:1])
    return median_call_ms(lambda: run(one), runs, warmup=10)


def _outputs_by_rows(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, max_batch: int) -> np.ndarray:
    return np.concatenate([np.asarray(run(x[i:i + max_batch])) for i in range(0, len(x), max_batch)])


def parity(want: np.ndarray, got: np.ndarray, quantized: bool, labels: np.ndarray | None = None,
           max_metric_drop: float = 1.0) -> dict[str, Any]:
    """fp32: max |diff| <= 1e-5. int8: top-1 agreement >= 98 % (and, with
    labels, an accuracy drop of at most max_metric_drop points)."""
    diff = float(np.max(np.abs(got.astype(np.float64) - want))) if want.size else 0.0
    out: dict[str, Any] = {"rows": int(len(want)), "max_abs_diff": diff}
    if want.ndim >= 2 and want.shape[-1] >= 2:
        out["top1_agreement"] = float((want.argmax(-1) == got.argmax(-1)).mean())
    if quantized:
        if "top1_agreement" not in out:
            raise ConfigError("int8 export needs a classifier output ([rows, classes]) for its parity check")
        out["threshold"] = {"top1_agreement": INT8_MIN_AGREEMENT}
        out["passed"] = out["top1_agreement"] >= INT8_MIN_AGREEMENT
        if labels is not None:
            drop = 100.0 * float((want.argmax(-1) == labels).mean() - (got.argmax(-1) == labels).mean())
            out["accuracy_drop_points"] = drop
            out["threshold"]["accuracy_drop_points"] = max_metric_drop
            out["passed"] = out["passed"] and drop <= max_metric_drop
    else:
        out["threshold"] = {"max_abs_diff": FP32_MAX_ABS_DIFF}
        out["passed"] = diff <= FP32_MAX_ABS_DIFF
    return out


def _quantized_onnx(source: ExportSource, dst: str, progress: Callable[[str], None]) -> dict[str, Any]:
    from flywheel.runtime.quantize import QuantizeConfig, quantize_with_gate, require_kept

    progress("quantizing to int8 (mode chosen by the graph's operators) and checking the accuracy gate ...")
    report = require_kept(quantize_with_gate(source.onnx_path, dst, source.reference, labels=source.labels,
                                             config=QuantizeConfig()))
    progress(f"  {report.mode} int8 kept: top-1 agreement {report.top1_agreement:.4f} on "
             f"{report.heldout_rows} held-out rows, {report.parent_bytes:,} -> {report.quantized_bytes:,} bytes")
    return msgspec.to_builtins(report)


def _to_ort(onnx_path: str, out_dir: str, platform: str) -> tuple[str, str]:
    """ONNX -> ORT format (fixed optimizations) plus its operator config."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    with tempfile.TemporaryDirectory(prefix="fw-ort-") as tmp:
        src = Path(tmp) / "model.onnx"
        shutil.copyfile(onnx_path, src)
        # The tool prints its progress and logs at INFO through its own logger.
        tool_log = logging.getLogger("ort_format_model.utils")
        level = tool_log.level
        tool_log.setLevel(logging.WARNING)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.ExitStack() as undo:
            undo.callback(tool_log.setLevel, level)
            convert_onnx_models_to_ort(src, output_dir=Path(tmp) / "out", target_platform=platform,
                                       optimization_styles=[OptimizationStyle.Fixed])
        out = Path(tmp) / "out"
        model = out / "model.ort"
        config = next(out.glob("*.config"), None)
        if config is None or not model.is_file():
            raise PreconditionFailedError(f"ONNX Runtime's converter wrote no .ort model or operator config "
                                          f"for {onnx_path}")
        shutil.copyfile(model, os.path.join(out_dir, "model.ort"))
        shutil.copyfile(config, os.path.join(out_dir, "required_operators.config"))
    return "model.ort", "required_operators.config"


def _torch_module(source: ExportSource):
    from safetensors.torch import load_file

    from flywheel.runtime.architectures import build

    if not (source.architecture and source.weights_path):
        raise ConfigError("executorch export needs the model's architecture and safetensors weights "
                          "(registered as params.architecture and the model.safetensors artifact)")
    module, _ = build(source.architecture, dict(source.hparams))
    module.load_state_dict(load_file(source.weights_path))
    return module.eval()


def export_bundle(source: ExportSource, target: str, out_dir: str, *, quantize: str | None = None,
                  platform: str = "arm", progress: Callable[[str], None] | None = None,
                  overwrite: bool = False) -> BundleReport:
    """Write the bundle for ``target`` into ``out_dir`` (which must not exist
    or be empty). ``platform`` (ort-mobile): the CPU the mobile build
    targets, ``arm`` or ``amd64`` (int8 QDQ fusions differ). ``progress``
    receives one line per step. ``overwrite`` replaces an earlier bundle
    in ``out_dir`` (only a bundle: any other non-empty folder is refused),
    once the new one is complete."""
    if target not in TARGETS:
        raise ConfigError(f"target {target!r} must be one of {TARGETS}")
    if quantize not in QUANTIZE:
        raise ConfigError(f"quantize {quantize!r} must be one of {QUANTIZE[1:]} or omitted")
    if platform not in ("arm", "amd64"):
        raise ConfigError(f"platform {platform!r} must be 'arm' or 'amd64'")
    if len(source.signature.inputs) != 1:
        raise ConfigError("edge export handles single-input models")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise ConfigError(f"output folder {out_dir!r} exists and is not empty "
                              "(overwrite / --force replaces an earlier bundle)")
        if not _is_bundle(out_dir):
            raise ConfigError(f"output folder {out_dir!r} is not a Flywheel bundle: refusing to replace it")
    from flywheel.runtime.quantize import QuantizeConfig

    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".fw-bundle-", dir=parent)  # renamed into place when complete
    try:
        sample, labels, calibration = _samples(source, bool(quantize))
        quant_report = None
        files: list[str] = []
        if target in ("onnx", "ort-mobile"):
            onnx_file = os.path.join(work, "model.onnx")
            if quantize:
                quant_report = _quantized_onnx(source, onnx_file, say)
            else:
                shutil.copyfile(source.onnx_path, onnx_file)
            if target == "onnx":
                files = ["model.onnx"]
            else:
                say(f"converting to ONNX Runtime mobile format (.ort, {platform}) ...")
                files = list(_to_ort(onnx_file, work, platform))
                os.remove(onnx_file)
            model_file = files[0]
            run = _ort_runner(os.path.join(work, model_file))
            max_batch = len(sample)
        else:
            from flywheel.runtime.executorch_export import export_executorch

            say(f"exporting to ExecuTorch (XNNPACK{', int8' if quantize else ''}) ...")
            model_file = "model.pte"
            export_executorch(_torch_module(source), source.signature, os.path.join(work, model_file),
                              quantize=quantize, calibration=calibration, max_batch=EXECUTORCH_MAX_BATCH)
            files = [model_file]
            run = _executorch_runner(os.path.join(work, model_file))
            max_batch = 8  # well inside the dynamic batch range of any exported program
        say(f"checking parity on {len(sample)} sample rows and timing batch 1 ...")
        want = _ort_runner(source.onnx_path)(sample)
        got = _outputs_by_rows(run, sample, max_batch)
        check = parity(want, got, bool(quantize), labels)
        if quantize and target == "executorch":
            # pt2e quantizes inside the export, so the gate every int8 model
            # passes (>= 99 % agreement on held-out rows, <= 1 point of
            # accuracy lost) is checked here, on the rows calibration never saw.
            gate = QuantizeConfig()
            check["threshold"]["top1_agreement"] = gate.min_agreement
            check["passed"] = check["passed"] and check["top1_agreement"] >= gate.min_agreement
            quant_report = {"mode": "static (pt2e, XNNPACK quantizer)", "calibration_rows": len(calibration),
                            "heldout_rows": len(sample), "top1_agreement": check["top1_agreement"],
                            "accuracy_drop": check.get("accuracy_drop_points"), "kept": check["passed"]}
        if not check["passed"]:
            raise PreconditionFailedError(f"{target} export failed its parity check: {check}")
        latency = _batch1_latency_ms(run, sample)
        size = sum(os.path.getsize(os.path.join(work, f)) for f in files)
        metadata = {
            "format": BUNDLE_FORMAT,
            "target": target,
            "model_file": model_file,
            "quantize": quantize,
            # ort-mobile: the CPU its fusions target; executorch: rows one call may carry
            **({"platform": platform} if target == "ort-mobile" else {}),
            **({"max_batch": EXECUTORCH_MAX_BATCH} if target == "executorch" else {}),
            "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in source.signature.inputs],
            "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                        for t in source.signature.outputs],
            "preprocessing": dict(source.preprocessing),
            "source": {"ref": source.ref, "onnx_sha256": sha256_file(source.onnx_path),
                       "weights_sha256": sha256_file(source.weights_path) if source.weights_path else None},
            "files": {f: {"sha256": sha256_file(os.path.join(work, f)),
                          "bytes": os.path.getsize(os.path.join(work, f))} for f in files},
            "runtime": _runtime_versions(target),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        report = {"target": target, "quantize": quantize, "platform": platform if target == "ort-mobile" else None,
                  "size_bytes": size, "parity": check,
                  "latency_ms_batch1": latency, "latency_threads": 1, "quantization": quant_report}
        for name, doc in (("metadata.json", metadata), ("report.json", report)):
            with open(os.path.join(work, name), "w") as f:
                json.dump(doc, f, indent=2)
        if os.path.isdir(out_dir) and os.listdir(out_dir):  # overwrite: the old bundle steps aside first
            old = tempfile.mkdtemp(prefix=".fw-bundle-old-", dir=parent)
            os.replace(out_dir, os.path.join(old, "bundle"))
            os.replace(work, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if os.path.isdir(out_dir):
                os.rmdir(out_dir)  # empty
            os.replace(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    say(f"wrote {out_dir}: {model_file} {size:,} bytes, parity {_parity_line(check)}, "
        f"batch-1 latency {latency:.3f} ms")
    return BundleReport(target=target, quantize=quantize, path=out_dir, model_file=model_file, size_bytes=size,
                        parity=check, latency_ms_batch1=latency, quantization=quant_report,
                        seconds=time.perf_counter() - started)


def _parity_line(check: dict[str, Any]) -> str:
    if "accuracy_drop_points" in check or check["threshold"].get("top1_agreement"):
        return f"top-1 agreement {check['top1_agreement']:.4f}"
    return f"max |diff| {check['max_abs_diff']:.2e}"


def _runtime_versions(target: str) -> dict[str, str]:
    if target == "executorch":
        from importlib.metadata import version

        return {"executorch": version("executorch")}
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__}


def _is_bundle(path: str) -> bool:
    try:
        with open(os.path.join(path, "metadata.json")) as f:
            return json.load(f).get("format") == BUNDLE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_bundle(path: str) -> tuple[dict, dict]:
    """(metadata, report) of a bundle, with every file's sha256 verified."""
    with open(os.path.join(path, "metadata.json")) as f:
        metadata = json.load(f)
    with open(os.path.join(path, "report.json")) as f:
        report = json.load(f)
    if metadata.get("format") != BUNDLE_FORMAT:
        raise ConfigError(f"{path} is not a {BUNDLE_FORMAT} bundle")
    for name, info in metadata["files"].items():
        got = sha256_file(os.path.join(path, name))
        if got != info["sha256"]:
            raise PreconditionFailedError(f"bundle file {name} has sha256 {got}, metadata says {info['sha256']}")
    return metadata, report
