"""Wire-format benchmark: HTTP JSON vs HTTP binary vs gRPC, and codec cost.

    python -m flywheel.bench.wire [--duration 3] [--out bench/results]

Payloads: the demo model's input (1x64 FP32) and an image-sized input
(1x3x224x224 FP32) for a cheap patch-CNN, so that moving the tensor, not the
model, is what is measured. Closed loop, concurrency 1 and 32, 127.0.0.1 only.
Also times encode+decode per request of our V2 JSON codec against the
standard library's json + numpy.array. Prints tables; writes wire.json and
wire.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from flywheel.bench.common import bench_deployment, export_model
from flywheel.bench.harness.payloads import encode
from flywheel.bench.harness.scenario import OutputSpec
from flywheel.bench.loadgen import LoadResult, build_request, run_grpc_load, run_load

CONCURRENCY = (1, 32)
PAYLOADS = {
    "demo 1x64": ("mlp", {"in_features": 64, "hidden": [128, 64], "out_features": 10}, (1, 64)),
    "image 1x3x224x224": ("patch_cnn", {}, (1, 3, 224, 224)),
}
MODEL_NAMES = {"demo 1x64": "demo", "image 1x3x224x224": "image"}


def _bodies(model: str, x: np.ndarray):
    """The same tensor as V2 JSON, V2 binary (logits back as binary) and gRPC."""
    return encode(model, "", {"input": x}, {"input": "FP32"}, [OutputSpec(name="logits")])


def _per_call_us(fn, seconds: float = 1.0) -> float:
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return (time.perf_counter() - start) / n * 1e6


def codec_table(seconds: float) -> list[dict]:
    from flywheel.protocol.codec import decode_infer_request, encode_infer_response

    rows = []
    logits = np.random.default_rng(2).random((1, 10), dtype=np.float32)
    for label, (_, _, shape) in PAYLOADS.items():
        x = np.random.default_rng(1).random(shape, dtype=np.float32)
        body = _bodies("m", x).json

        def ours_decode():
            decode_infer_request(body, max_elements=1 << 24)

        def base_decode():
            d = json.loads(body)
            i = d["inputs"][0]
            np.array(i["data"], dtype=np.float32).reshape(i["shape"])

        def ours_encode():
            encode_infer_response("m", "1", {"logits": logits, "echo": x})

        def base_encode():
            json.dumps({"model_name": "m", "model_version": "1", "outputs": [
                {"name": n, "datatype": "FP32", "shape": list(a.shape), "data": a.ravel().tolist()}
                for n, a in (("logits", logits), ("echo", x))]}).encode()

        r = {"payload": label}
        for key, fn in (("ours_decode_us", ours_decode), ("stdlib_decode_us", base_decode),
                        ("ours_encode_us", ours_encode), ("stdlib_encode_us", base_encode)):
            r[key] = round(_per_call_us(fn, seconds), 1)
        r["decode_speedup"] = round(r["stdlib_decode_us"] / r["ours_decode_us"], 2)
        r["encode_speedup"] = round(r["stdlib_encode_us"] / r["ours_encode_us"], 2)
        rows.append(r)
    return rows


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    transports = ["http json", "http binary", "grpc"]
    for ax, payload in zip(axes, PAYLOADS):
        width = 0.38
        for k, c in enumerate(CONCURRENCY):
            vals = [next(r["throughput_rps"] for r in rows if r["payload"] == payload and r["transport"] == t
                         and r["concurrency"] == c) for t in transports]
            ax.bar(np.arange(3) + (k - 0.5) * width, vals, width, label=f"c={c}")
        ax.set_xticks(range(3), transports)
        ax.set_ylabel("requests / s")
        ax.set_yscale("log")
        ax.set_title(payload)
        ax.grid(alpha=0.3, axis="y")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds measured per point")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)

    os.makedirs(args.out, exist_ok=True)
    print("codec: encode + decode per request, ours vs json + numpy.array ...", flush=True)
    codec = codec_table(1.0)
    work = tempfile.mkdtemp(prefix="fw-wire-")
    print("exporting models ...", flush=True)
    models = []
    for label, (arch, hp, _) in PAYLOADS.items():
        path = export_model(arch, hp, os.path.join(work, f"{arch}.onnx"))
        models.append({"name": MODEL_NAMES[label], "path": path, "num_cpus": 0.5,
                       "batching": {"max_batch_size": 32, "max_queue_delay_us": 0}})
    print("starting Ray and deploying ...", flush=True)
    rows: list[dict] = []

    def record(payload: str, transport: str, res: LoadResult) -> None:
        row = {"payload": payload, "transport": transport, **res.summary()}
        rows.append(row)
        print(f"  {payload:<18} {transport:<12} c={row['concurrency']:<3} {row['throughput_rps']:>9.1f} req/s "
              f"p50 {row['p50_ms']:.3f} p99 {row['p99_ms']:.3f} ms"
              f"{'  errors ' + str(row['errors']) + ' ' + str(row['error_samples'][:1]) if row['errors'] else ''}",
              flush=True)

    with bench_deployment("wire", models) as dep:
        host, port = dep.url.removeprefix("http://").split(":")
        for label, (_, _, shape) in PAYLOADS.items():
            model = MODEL_NAMES[label]
            x = np.random.default_rng(1).random(shape, dtype=np.float32)
            path = f"/v2/models/{model}/infer"
            bodies = _bodies(model, x)
            json_req = build_request(path, bodies.json)
            bin_req = build_request(path, bodies.binary).replace(
                b"Content-Type: application/json\r\n",
                b"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: %d\r\n"
                % bodies.binary_header_length,
            )
            grpc_req = bodies.grpc
            for c in CONCURRENCY:
                kw = dict(concurrency=c, duration_s=args.duration, warmup_s=args.warmup)
                record(label, "http json", run_load(host, int(port), json_req, **kw))
                record(label, "http binary", run_load(host, int(port), bin_req, **kw))
                record(label, "grpc", run_grpc_load(dep.grpc_target, "/inference.GRPCInferenceService/ModelInfer",
                                                    grpc_req, **kw))

    print(f"\n{'payload':<19}{'transport':<13}{'conc':>5}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for r in rows:
        print(f"{r['payload']:<19}{r['transport']:<13}{r['concurrency']:>5}{r['throughput_rps']:>10.1f}"
              f"{r['p50_ms']:>9.3f}{r['p99_ms']:>9.3f}{r['errors']:>8}")
    print()
    for label in PAYLOADS:
        for c in CONCURRENCY:
            get = lambda t: next(r["throughput_rps"] for r in rows if r["payload"] == label and r["transport"] == t and r["concurrency"] == c)  # noqa: E731
            js = get("http json") or float("nan")
            print(f"{label}, c={c}: binary/json x{get('http binary') / js:.1f}, grpc/json x{get('grpc') / js:.1f}")
    print(f"\n{'payload':<19}{'ours dec us':>12}{'json+np dec':>12}{'x':>6}{'ours enc us':>12}{'json enc':>10}{'x':>6}")
    for r in codec:
        print(f"{r['payload']:<19}{r['ours_decode_us']:>12.1f}{r['stdlib_decode_us']:>12.1f}{r['decode_speedup']:>6.1f}"
              f"{r['ours_encode_us']:>12.1f}{r['stdlib_encode_us']:>10.1f}{r['encode_speedup']:>6.1f}")
    with open(os.path.join(args.out, "wire.json"), "w") as f:
        json.dump({"duration_s": args.duration, "rows": rows, "codec": codec}, f, indent=1)
    _plot(rows, os.path.join(args.out, "wire.png"))
    print(f"\nwrote {args.out}/wire.json and {args.out}/wire.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
