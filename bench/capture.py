"""Capture benchmark: the throughput cost of inference capture at 10 % sampling.

    python -m flywheel.bench.capture [--duration 4] [--rounds 3] [--concurrency 32]

One local Ray, one deployment, two colocated versions of the demo digits MLP
(64->128->64->10) loaded from the same file: ``demo-off`` without capture and
``demo-cap`` with ``capture: {sample: 0.1}`` into a temporary folder. Closed
loop HTTP V2 JSON load, 1 row per request, only to 127.0.0.1, off and on
in each of ``--rounds`` rounds, which one first alternating (so that a busy
machine's drift hits both alike); prints each round, the median req/s of each, their ratio (target >=
0.95) and the captured rows found in finished files after the deployment
was shut down (which finishes the open files).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

from flywheel.bench.common import bench_deployment, export_model
from flywheel.bench.loadgen import build_request, run_load
from flywheel.bench.serving import MODELS, _body

SAMPLE = 0.1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=4.0, help="seconds measured per point")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per point")
    parser.add_argument("--rounds", type=int, default=3, help="off/on pairs measured")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--sample", type=float, default=SAMPLE, help="capture share of demo-cap (0 = a control)")
    args = parser.parse_args(argv)

    from flywheel.common.capture_files import read_captured

    work = tempfile.mkdtemp(prefix="fw-bench-capture-")
    captures = os.path.join(work, "captures")
    hp = MODELS["demo"]
    path = export_model("mlp", hp, os.path.join(work, "demo.onnx"))
    base = {"path": path, "num_cpus": 0.25, "warmup_batch_sizes": [1, 64]}
    models = [{"name": "demo-off", **base},
              {"name": "demo-cap", **base, "capture": {"path": captures, "sample": args.sample}}]
    body = _body(hp["in_features"])
    rps: dict[str, list[float]] = {"off": [], "on": []}
    print(f"starting Ray and deploying demo-off and demo-cap (capture sample {args.sample:g}) ...", flush=True)
    with bench_deployment("bench-capture", models) as dep:
        host, port = dep.url.removeprefix("http://").split(":")
        for r in range(args.rounds):
            pair = (("off", "demo-off"), ("on", "demo-cap"))
            for tag, name in pair if r % 2 == 0 else pair[::-1]:  # who goes first alternates
                res = run_load(host, int(port), build_request(f"/v2/models/{name}/infer", body),
                               concurrency=args.concurrency, duration_s=args.duration, warmup_s=args.warmup)
                s = res.summary()
                rps[tag].append(s["throughput_rps"])
                print(f"  round {r + 1} capture {tag:<3} c={args.concurrency} {s['throughput_rps']:>9.1f} req/s "
                      f"p50 {s['p50_ms']:.3f} p99 {s['p99_ms']:.3f} ms"
                      f"{'  errors ' + str(s['errors']) if s['errors'] else ''}", flush=True)
    off, on = statistics.median(rps["off"]), statistics.median(rps["on"])
    captured = len(read_captured(captures, "demo-cap", labelled=False))
    print()
    print(f"capture off:            {off:>9.1f} req/s (median of {args.rounds})")
    print(f"capture {args.sample:.0%} sampling:  {on:>9.1f} req/s (median of {args.rounds})")
    print(f"ratio on/off:           {on / off:>9.3f} (target >= 0.95)")
    print(f"captured rows in finished files: {captured} "
          f"(~{args.sample:.0%} of the demo-cap requests, warm-up included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
