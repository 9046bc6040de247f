"""What tracing and the access log cost on the request path.

    python -m flywheel.bench.tracing [--rounds 3] [--seconds 3]

Two figures:

1. The cost of tracing *off* against the same server with the checks
   compiled out. Off, a request pays for exactly these operations: the data
   plane's ``tracer is not None``, a colocated ModelServer's
   ``MODEL_TIMES.get()`` and its four ``times is not None`` (tracing.py),
   and no access-log wrapper (the handler is not wrapped at ``sample: 0``).
   Those are timed here in a tight loop and set against the time one request
   takes at c=32 on the off server (1 / throughput, the loop being the
   bottleneck): ``off_cost_pct`` = their nanoseconds x throughput. Goal <= 2 %.
2. Paired A B B A rounds (bench/interleave.py) at c=32 over HTTP against
   in-process ingresses serving the same colocated MLP, all started at once:
   off vs tracing on with no exporter reachable (spans made and queued, their
   export failing), off vs the access log at sample 1.0 (every request a
   line in a file), and c=1 p50 off vs tracing on. The medians of the
   neighbours' ratios (B/A) are printed with their range.

The load generator runs in this process beside the ingresses' loop threads
(one GIL), as it does for every side alike. On a shared machine the figures
are noisy: read the ratios' ranges, not only the medians.
"""

from __future__ import annotations

import argparse
import contextvars
import json
import os
import tempfile
import timeit

from flywheel.bench.common import export_model, free_port
from flywheel.bench.interleave import RatioStats, neighbour_pairs, paired_ratios, run_blocks, side_median
from flywheel.bench.loadgen import build_request, run_load


def _off_checks_ns(n: int = 2_000_000) -> float:
    """Nanoseconds of the operations tracing-off adds to one request."""
    var: contextvars.ContextVar = contextvars.ContextVar("bench", default=None)

    class Plane:
        tracer = None

    plane = Plane()

    def checks():
        if plane.tracer is not None:
            return
        times = var.get()
        if times is not None:
            pass
        if times is not None:
            pass
        if times is not None:
            pass
        if times is not None:
            pass

    def empty():
        return

    spent = min(timeit.repeat(checks, number=n, repeat=3)) - min(timeit.repeat(empty, number=n, repeat=3))
    return max(spent, 0.0) / n * 1e9


def _ingress(model: str, **server):
    from flywheel.serving.config import ModelConfig, ServerConfig
    from flywheel.serving.ingress import Ingress

    cfg = ServerConfig(port=free_port(), grpc_port=-1, **server)
    return Ingress(cfg, [], colocated=[ModelConfig(name="mlp", version="1", path=model)]), cfg.port


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="A B B A rounds per comparison")
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds of load per block")
    args = ap.parse_args(argv)

    from flywheel.serving.config import AccessLogConfig, TracingConfig

    with tempfile.TemporaryDirectory(prefix="fw-bench-tracing-") as tmp:
        model = export_model("mlp", {"in_features": 64, "hidden": [32], "out_features": 10},
                             os.path.join(tmp, "mlp.onnx"))
        nowhere = f"http://127.0.0.1:{free_port()}/v1/traces"  # nothing listens: every export fails
        servers = {
            "off": _ingress(model),
            "tracing_on": _ingress(model, tracing=TracingConfig(otlp_endpoint=nowhere)),
            "access_log": _ingress(model, access_log=AccessLogConfig(sample=1.0, path=os.path.join(tmp, "a.log"))),
        }
        body = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                       "data": [0.5] * 64}]}).encode()
        request = build_request("/v2/models/mlp/infer", body)

        def measure(name: str, concurrency: int):
            return lambda: run_load("127.0.0.1", servers[name][1], request, concurrency=concurrency,
                                    duration_s=args.seconds, warmup_s=0.5)

        out: dict = {"note": "shared 2-core host: noisy; read the ranges"}
        try:
            for label, b_side, conc, metric in (
                ("tracing_on_vs_off_c32_throughput", "tracing_on", 32, lambda r: r.throughput),
                ("access_log_vs_off_c32_throughput", "access_log", 32, lambda r: r.throughput),
                ("tracing_on_vs_off_c1_p50", "tracing_on", 1, lambda r: r.percentile_ms(50)),
            ):
                blocks = run_blocks(args.rounds, measure("off", conc), measure(b_side, conc))
                pairs, excluded = neighbour_pairs(blocks)
                stats = RatioStats.of(paired_ratios(pairs, metric))
                out[label] = {
                    "ratio_b_over_a": stats.as_dict() if stats else None,
                    "off": round(side_median(pairs, "a", metric), 3) if pairs else None,
                    b_side: round(side_median(pairs, "b", metric), 3) if pairs else None,
                    "excluded": excluded,
                }
            off_rps = out["tracing_on_vs_off_c32_throughput"]["off"] or 0.0
            checks_ns = _off_checks_ns()
            out["off_checks_ns_per_request"] = round(checks_ns, 1)
            out["off_c32_rps"] = off_rps
            out["off_cost_pct"] = round(checks_ns * 1e-9 * off_rps * 100, 4)
        finally:
            for ingress, _ in servers.values():
                ingress.close()
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
