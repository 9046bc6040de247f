"""GPU check for the TensorRT backend (run on a machine with an NVIDIA GPU).

    python -m flywheel.bench.gpu_tensorrt_check

Exports an MLP 64->128->64->10 to ONNX, builds an FP16 engine through
TensorRTBackend, checks it against ONNX Runtime on the CPU (max |diff| <= 1e-2
at batch 1 and 32), then times every path it can run: ONNX Runtime CPU,
TensorRTBackend, and ONNX Runtime's CUDA and TensorRT execution providers
where this onnxruntime build has them. Prints one table; exits 0 when every
parity check holds, 1 when one fails, and 2 with a one-line message where no
GPU, TensorRT or CuPy is available, so it is safe to run anywhere.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from flywheel.protocol.errors import FlywheelError

BATCHES = (1, 32)
TOLERANCE = 1e-2


def _time_ms(fn: Callable[[], object], warmup: int = 20, repeats: int = 200) -> tuple[float, float]:
    """Median and 90th percentile of one call, in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return statistics.median(times), times[int(0.9 * (len(times) - 1))]


def _export(folder: Path) -> str:
    import torch

    from flywheel.runtime.architectures import build
    from flywheel.runtime.export import export_onnx

    torch.manual_seed(0)
    module, sig = build("mlp", {"in_features": 64, "hidden": [128, 64], "out_features": 10})
    return export_onnx(module, sig, str(folder / "mlp.onnx"))


def _ort_paths(model: str, cache: Path) -> dict[str, object]:
    """ONNX Runtime backends by label: CPU always; CUDA and TensorRT EP only
    when the session really runs on them (a CPU-only build falls back)."""
    import onnxruntime as ort

    from flywheel.runtime.backends.onnx_backend import OnnxRuntimeBackend, OnnxRuntimeConfig

    wanted = {
        "onnxruntime CPU": ("CPUExecutionProvider", OnnxRuntimeConfig(intra_op_threads=0)),
        "onnxruntime CUDA EP": ("CUDAExecutionProvider", OnnxRuntimeConfig(providers=("cuda", "cpu"))),
        "onnxruntime TensorRT EP fp16": (
            "TensorrtExecutionProvider",
            OnnxRuntimeConfig(
                providers=("tensorrt", "cuda", "cpu"), trt_fp16=True,
                trt_engine_cache_path=str(cache / "ort-trt"), trt_batch_profile=(1, 16, 32),
            ),
        ),
    }
    available = ort.get_available_providers()
    paths = {}
    for label, (provider, cfg) in wanted.items():
        if provider not in available:
            print(f"  ({label}: this onnxruntime has no {provider}; skipped)")
            continue
        backend = OnnxRuntimeBackend(model, cfg)
        backend.load()
        if backend.providers[0] != provider:
            print(f"  ({label}: session fell back to {backend.providers}; skipped)")
            continue
        paths[label] = backend
    return paths


def main() -> int:
    from flywheel.runtime.backends.tensorrt_backend import TensorRTBackend, TensorRTConfig
    from flywheel.runtime.backends.tensorrt_plan import import_gpu_stack

    try:
        trt, cupy = import_gpu_stack()
    except FlywheelError as exc:
        print(f"nothing to check here: {exc.message}")
        return 2
    gpu = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    gpu = gpu.decode() if isinstance(gpu, bytes) else gpu
    print(f"GPU {gpu}, TensorRT {trt.__version__}, CuPy {cupy.__version__}")

    with tempfile.TemporaryDirectory(prefix="fw-trt-check-") as tmp:
        folder = Path(tmp)
        model = _export(folder)
        start = time.perf_counter()
        engine = TensorRTBackend(model, TensorRTConfig(precision="fp16", cache_dir=str(folder / "plans")))
        engine.load()
        print(f"FP16 engine built in {time.perf_counter() - start:.1f} s -> {engine.cache_path}")
        paths = _ort_paths(model, folder)
        reference = paths["onnxruntime CPU"]
        paths["TensorRTBackend fp16"] = engine

        rng = np.random.default_rng(0)
        ok = True
        rows = []
        for batch in BATCHES:
            x = {"input": rng.standard_normal((batch, 64)).astype(np.float32)}
            want = reference.infer(x)["logits"]
            for label, backend in paths.items():
                diff = float(np.abs(backend.infer(x)["logits"] - want).max())
                good = diff <= TOLERANCE
                ok &= good
                median, p90 = _time_ms(lambda b=backend: b.infer(x))
                rows.append((label, batch, median, p90, diff, good))

    print(f"\n{'path':<30} {'batch':>5} {'median ms':>10} {'p90 ms':>8} {'max|diff|':>10}  parity")
    for label, batch, median, p90, diff, good in rows:
        print(f"{label:<30} {batch:>5} {median:>10.3f} {p90:>8.3f} {diff:>10.2e}  "
              f"{'OK' if good else f'BAD (> {TOLERANCE})'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
