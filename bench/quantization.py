"""Quantization and edge-runtime benchmark (issue 8).

    python -m flywheel.bench.quantization [--out bench/results] [--runner PATH]

For the demo model (digits MLP 64->128->64->10) and a small CNN (two 3x3
convolutions, 1x8x8 digits), both trained here on the digits data: ONNX
Runtime fp32 vs dynamic int8 vs static int8 (QDQ) latency at batch 1 and 32
(one thread, medians), file sizes, top-1 agreement with fp32 and accuracy on
the held-out digits; then the mobile formats at batch 1: ORT mobile (.ort,
fp32 and int8) through ONNX Runtime, and ExecuTorch (.pte, XNNPACK, fp32 and
int8) through its Python runtime and, with --runner, the native
flywheel-edge-run built from CMakeLists.txt. Writes quantization.json and
quantization.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

MLP = {"in_features": 64, "hidden": [128, 64], "out_features": 10}
CNN = {"channels": 1, "size": 8, "classes": 10}
EPOCHS = {"mlp": 15, "cnn": 40}  # the CNN learns more slowly; a half-trained one has near-tied logits


def _train(arch: str, hparams: dict, x: np.ndarray, y: np.ndarray, epochs: int, out: str):
    from flywheel.training.digits import train_classifier

    result = train_classifier(arch, hparams, x, y, epochs, f"{out}.onnx")
    print(f"  {arch}: {epochs} epochs", flush=True)
    return result


def _ort_latency(path: str, x: np.ndarray, batch: int) -> float:
    from flywheel.runtime.quantize import median_call_ms, ort_session

    sess = ort_session(path)
    feed = {sess.get_inputs()[0].name: np.ascontiguousarray(x[np.arange(batch) % len(x)])}
    runs = 2000 if batch == 1 else 500
    return median_call_ms(lambda: sess.run(None, feed), runs, warmup=runs // 20)


def _ort_outputs(path: str, x: np.ndarray) -> np.ndarray:
    from flywheel.runtime.quantize import ort_session

    sess = ort_session(path)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def model_rows(name: str, onnx_path: str, x_cal: np.ndarray, x_held: np.ndarray, y_held: np.ndarray,
               work: str) -> list[dict]:
    from flywheel.runtime.quantize import quantize_onnx

    want = _ort_outputs(onnx_path, x_held)
    rows = []
    for variant in ("fp32", "dynamic int8", "static int8"):
        path = onnx_path
        if variant != "fp32":
            mode = variant.split()[0]
            path = os.path.join(work, f"{name}-{mode}.onnx")
            quantize_onnx(onnx_path, path, mode, {"input": x_cal})
        got = _ort_outputs(path, x_held)
        row = {"model": name, "format": "onnx", "variant": variant, "bytes": os.path.getsize(path),
               "agreement": float((got.argmax(1) == want.argmax(1)).mean()),
               "accuracy": float((got.argmax(1) == y_held).mean()),
               "batch1_ms": _ort_latency(path, x_held, 1), "batch32_ms": _ort_latency(path, x_held, 32)}
        rows.append(row)
        print(f"  {name:<5} onnx {variant:<13} {row['bytes']:>8,} B  agree {row['agreement']:.4f}  "
              f"b1 {row['batch1_ms']:.4f} ms  b32 {row['batch32_ms']:.4f} ms", flush=True)
    return rows


def edge_rows(name: str, arch: str, hparams: dict, base: str, sig, x_ref: np.ndarray, y_ref: np.ndarray,
              work: str, runner: str | None) -> list[dict]:
    from flywheel.runtime.edge_export import ExportSource, export_bundle
    from flywheel.protocol.errors import PreconditionFailedError

    source = ExportSource(onnx_path=f"{base}.onnx", signature=sig, reference=x_ref, labels=y_ref,
                          architecture=arch, hparams=hparams, weights_path=f"{base}.safetensors")
    rows = []
    targets = ["ort-mobile"]
    try:
        import executorch  # noqa: F401

        targets.append("executorch")
    except ImportError:
        print("  (executorch not installed: pip install 'flywheel-ml[edge]' for the .pte rows)")
    for target in targets:
        for quantize in (None, "int8"):
            out = os.path.join(work, f"{name}-{target}-{quantize or 'fp32'}")
            try:
                rep = export_bundle(source, target, out, quantize=quantize, progress=None)
            except PreconditionFailedError as exc:  # the gate or parity check said no: report it
                rows.append({"model": name, "format": target, "variant": quantize or "fp32", "rejected": exc.message})
                print(f"  {name:<5} {target:<10} {quantize or 'fp32':<5} rejected: {exc.message}", flush=True)
                continue
            row = {"model": name, "format": target, "variant": quantize or "fp32", "bytes": rep.size_bytes,
                   "agreement": rep.parity.get("top1_agreement"), "batch1_ms": rep.latency_ms_batch1}
            if target == "executorch" and runner:
                row["native_batch1_ms"] = _runner_ms(runner, os.path.join(out, rep.model_file), x_ref[:1], work)
            rows.append(row)
            native = f"  native {row['native_batch1_ms']:.4f} ms" if "native_batch1_ms" in row else ""
            print(f"  {name:<5} {target:<10} {row['variant']:<5} {row['bytes']:>8,} B  agree {row['agreement']:.4f}"
                  f"  b1 {row['batch1_ms']:.4f} ms{native}", flush=True)
    return rows


def _runner_ms(runner: str, pte: str, x: np.ndarray, work: str) -> float:
    """Median batch-1 latency the native runner prints for --repeat."""
    inp = os.path.join(work, "runner-input.npy")
    np.save(inp, np.ascontiguousarray(x, dtype=np.float32))
    out_dir = os.path.join(work, "runner-out")
    os.makedirs(out_dir, exist_ok=True)
    proc = subprocess.run([runner, pte, out_dir, inp, "--repeat", "500"], capture_output=True, text=True,
                          check=True)
    for token in proc.stdout.replace("=", " ").split():
        try:
            value = float(token)
        except ValueError:
            continue
        return value / 1e3  # the runner prints microseconds
    raise RuntimeError(f"no latency in the runner's output: {proc.stdout!r}")


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, model in zip(axes, ("mlp", "cnn")):
        sel = [r for r in rows if r["model"] == model and "rejected" not in r]
        labels = [f"{r['format']}\n{r['variant']}" for r in sel]
        xs = np.arange(len(sel))
        ax.bar(xs - 0.27, [r["batch1_ms"] * 1e3 for r in sel], 0.27, label="batch 1 (Python)")
        ax.bar(xs, [r.get("native_batch1_ms", np.nan) * 1e3 for r in sel], 0.27,
               label="batch 1, native flywheel-edge-run")
        ax.bar(xs + 0.27, [r.get("batch32_ms", np.nan) * 1e3 / 32 for r in sel], 0.27, label="batch 32, per row")
        ax.set_xticks(xs, labels, fontsize=7)
        ax.set_ylabel("us (median, one thread)")
        ax.set_title(f"{model}: latency by format and precision")
        ax.legend()
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--runner", default=None, help="path to a built flywheel-edge-run (CMakeLists.txt)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    from flywheel.runtime.quantize import split_reference
    from flywheel.training.digits import load_digits_split

    xtr, ytr, xva, yva = load_digits_split(0)
    calib, held = split_reference(len(xva), 128)
    work = tempfile.mkdtemp(prefix="fw-qbench-")
    rows: list[dict] = []
    print("training the models on the digits data ...", flush=True)
    models = {
        "mlp": ("mlp", MLP, xtr, xva),
        "cnn": ("small_cnn", CNN, xtr.reshape(-1, 1, 8, 8), xva.reshape(-1, 1, 8, 8)),
    }
    for name, (arch, hp, x_train, x_val) in models.items():
        onnx_path, sig = _train(arch, hp, x_train, ytr, EPOCHS[name], os.path.join(work, name))
        print(f"{name}: ONNX Runtime fp32 vs int8 ...", flush=True)
        rows += model_rows(name, onnx_path, x_val[calib], x_val[held], yva[held], work)
        print(f"{name}: mobile formats ...", flush=True)
        rows += edge_rows(name, arch, hp, os.path.join(work, name), sig, x_val, yva, work, args.runner)
    print(f"\n{'model':<6}{'format':<12}{'variant':<14}{'bytes':>9}{'agree':>8}{'acc':>7}"
          f"{'b1 ms':>9}{'b32 ms':>9}{'native b1':>11}")
    for r in rows:
        if "rejected" in r:
            print(f"{r['model']:<6}{r['format']:<12}{r['variant']:<14}rejected: {r['rejected']}")
            continue
        acc = f"{100 * r['accuracy']:.1f}" if "accuracy" in r else "-"
        b32 = f"{r['batch32_ms']:.4f}" if "batch32_ms" in r else "-"
        nat = f"{r['native_batch1_ms']:.4f}" if "native_batch1_ms" in r else "-"
        print(f"{r['model']:<6}{r['format']:<12}{r['variant']:<14}{r['bytes']:>9,}{r['agreement']:>8.4f}{acc:>7}"
              f"{r['batch1_ms']:>9.4f}{b32:>9}{nat:>11}")
    with open(os.path.join(args.out, "quantization.json"), "w") as f:
        json.dump({"rows": rows, "threads": 1, "python": sys.version.split()[0]}, f, indent=2)
    _plot(rows, os.path.join(args.out, "quantization.png"))
    shutil.rmtree(work, ignore_errors=True)
    print(f"\nwrote {args.out}/quantization.json and {args.out}/quantization.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
