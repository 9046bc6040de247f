"""Serving benchmark: direct ONNX Runtime vs Flywheel over HTTP, batching off/on.

    python -m flywheel.bench.serving [--duration 4] [--out bench/results]

Two models: the demo digits MLP (64->128->64->10) and a compute-bound MLP
(1024->4096->4096->10). Each is deployed on one local Ray with batching off
(max_batch_size 1) and on (max_batch_size 64), both on a worker thread; with
the model run inline on the replica's loop thread; and as a new user's config
names it (no batching settings at all: the replica chooses inline or a worker
thread at warm-up). Then closed-loop HTTP V2 JSON load, 1 row per request, at
concurrency 1, 8 and 32, only to 127.0.0.1. Prints a table, the default's
ratio to the best hand-tuned setting (c=1 p50, c=32 throughput), and writes
serving.json and serving.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import msgspec
import numpy as np

from flywheel.bench.common import bench_deployment, export_model
from flywheel.bench.loadgen import LoadResult, build_request, run_load

CONCURRENCY = (1, 8, 32)
MODELS = {
    "demo": {"in_features": 64, "hidden": [128, 64], "out_features": 10},
    "heavy": {"in_features": 1024, "hidden": [4096, 4096], "out_features": 10},
}


def _direct(path: str, features: int, duration_s: float) -> LoadResult:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((1, features), dtype=np.float32)
    for _ in range(50):
        sess.run(None, {"input": x})
    result = LoadResult(1, duration_s)
    stop = time.perf_counter() + duration_s
    while (t := time.perf_counter()) < stop:
        sess.run(None, {"input": x})
        result.latencies_s.append(time.perf_counter() - t)
    return result


def _body(features: int) -> bytes:
    x = np.random.default_rng(1).random(features, dtype=np.float32)
    return msgspec.json.encode(
        {"inputs": [{"name": "input", "shape": [1, features], "datatype": "FP32", "data": x.tolist()}]}
    )


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, model in zip(axes, MODELS):
        for mode, style in (("batching off", "o--"), ("batching on", "s-"), ("batching on, inline", "^-"),
                            ("default config", "kx:")):
            pts = [r for r in rows if r["model"] == model and r["path"] == f"flywheel http, {mode}"]
            ax.plot([p["concurrency"] for p in pts], [p["throughput_rps"] for p in pts], style, label=mode)
        ax.set_xscale("log", base=2)
        ax.set_xticks(CONCURRENCY, [str(c) for c in CONCURRENCY])
        ax.set_xlabel("concurrent clients (closed loop)")
        ax.set_ylabel("requests / s")
        ax.set_title(f"{model} model, 1 row per request")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=4.0, help="seconds measured per point")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per point")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)

    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="fw-bench-")
    print("exporting models ...", flush=True)
    paths = {name: export_model("mlp", hp, os.path.join(work, f"{name}.onnx")) for name, hp in MODELS.items()}
    # all colocated: the ingress replica asks Ray for the sum of their
    # num_cpus, which must fit the bench's 4 logical CPUs
    models = []
    for name, path in paths.items():
        for tag, size, inline in (("off", 1, False), ("on", 64, False), ("inline", 64, True)):
            models.append({
                "name": f"{name}-{tag}", "path": path, "num_cpus": 0.25,
                "batching": {"max_batch_size": size, "max_queue_delay_us": 0, "inline": inline},
                "warmup_batch_sizes": [1, size],
            })
        # what a new user writes: the model and nothing about batching
        models.append({"name": f"{name}-default", "path": path, "num_cpus": 0.25})
    print(f"starting Ray and deploying {len(models)} model versions ...", flush=True)
    rows: list[dict] = []

    def record(model: str, path: str, res: LoadResult) -> None:
        row = {"model": model, "path": path, **res.summary()}
        rows.append(row)
        print(
            f"  {model:<6} {path:<36} c={row['concurrency']:<3} {row['throughput_rps']:>9.1f} req/s "
            f"p50 {row['p50_ms']:.3f} p90 {row['p90_ms']:.3f} p99 {row['p99_ms']:.3f} ms"
            f"{'  errors ' + str(row['errors']) if row['errors'] else ''}",
            flush=True,
        )

    with bench_deployment("bench", models) as dep:
        host, port = dep.url.removeprefix("http://").split(":")
        for model, hp in MODELS.items():
            feats = hp["in_features"]
            record(model, "direct onnxruntime", _direct(paths[model], feats, args.duration))
            body = _body(feats)
            variants = [("off", "batching off"), ("on", "batching on"), ("inline", "batching on, inline"),
                        ("default", "default config")]
            for tag, label in variants:
                request = build_request(f"/v2/models/{model}-{tag}/infer", body)
                for c in CONCURRENCY:
                    res = run_load(host, int(port), request, concurrency=c,
                                   duration_s=args.duration, warmup_s=args.warmup)
                    record(model, f"flywheel http, {label}", res)

    print()
    print(f"{'model':<7}{'path':<37}{'conc':>5}{'req/s':>11}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for r in rows:
        print(f"{r['model']:<7}{r['path']:<37}{r['concurrency']:>5}{r['throughput_rps']:>11.1f}"
              f"{r['p50_ms']:>9.3f}{r['p90_ms']:>9.3f}{r['p99_ms']:>9.3f}{r['errors']:>8}")
    print()
    for model in MODELS:
        get = lambda path, c: next(r for r in rows if r["model"] == model and r["path"] == path and r["concurrency"] == c)  # noqa: E731
        off32, on32 = get("flywheel http, batching off", 32), get("flywheel http, batching on", 32)
        off1, on1 = get("flywheel http, batching off", 1), get("flywheel http, batching on", 1)
        print(
            f"{model}: c=32 batching on/off throughput x{on32['throughput_rps'] / off32['throughput_rps']:.2f}, "
            f"p99 {on32['p99_ms']:.2f} vs {off32['p99_ms']:.2f} ms; "
            f"c=1 p50 cost of batching {on1['p50_ms'] - off1['p50_ms']:+.3f} ms"
        )
        tuned = ("batching off", "batching on", "batching on, inline")
        best_p50 = min(get(f"flywheel http, {t}", 1)["p50_ms"] for t in tuned)
        best_rps = max(get(f"flywheel http, {t}", 32)["throughput_rps"] for t in tuned)
        d1, d32 = get("flywheel http, default config", 1), get("flywheel http, default config", 32)
        print(f"{model}: default config vs the best hand-tuned: c=1 p50 x{d1['p50_ms'] / best_p50:.2f} "
              f"({d1['p50_ms']:.3f} vs {best_p50:.3f} ms), c=32 throughput best/default x"
              f"{best_rps / d32['throughput_rps']:.2f} ({d32['throughput_rps']:.0f} vs {best_rps:.0f} req/s); "
              "target <= 1.10 each")
    with open(os.path.join(args.out, "serving.json"), "w") as f:
        json.dump({"duration_s": args.duration, "rows": rows}, f, indent=1)
    _plot(rows, os.path.join(args.out, "serving.png"))
    print(f"\nwrote {args.out}/serving.json and {args.out}/serving.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
