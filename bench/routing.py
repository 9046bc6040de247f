"""What the multi-model router costs per request, at concurrency 1.

    python -m flywheel.bench.routing [--duration 3] [--rounds 3] [--out bench/results]

One deployment (Ray Serve, one ingress replica) serving the same ONNX model
(an MLP 64->512->512->10, 1 row per request) as an endpoint ``m`` with two
variants and as a plain model ``plain`` (one version, no endpoint).
In the same run, alternating in ABBA blocks ``--rounds`` times (this VM's
speed drifts by 10-30 % over minutes; pairs taken side by side cancel it):

- **direct**: ``/v2/models/plain/infer``: the model called directly, nothing
  of the router involved (no policy, no request id kept for feedback);
- **a/b sticky**: ``/v2/models/m/infer`` under a 50/50 fixed split with a
  sticky key header (weighted rendezvous hash, request id kept for feedback);
- **thompson**: the same route under a Thompson-sampling bandit.

Prints p50/p99 and throughput per path, the median paired p50 difference
to direct (the issue's target: at most 0.3 ms), and writes routing.json and
routing.png to --out. Load from bench/loadgen.py (one closed-loop
connection; Python, which adds its own time to both sides alike).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

import numpy as np

from flywheel.bench.common import export_model
from flywheel.bench.loadgen import run_load

HPARAMS = {"in_features": 64, "hidden": [512, 512], "out_features": 10}
TARGET_MS = 0.3


def _request(path: str, body: bytes, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def _measure(port: int, request: bytes, seconds: float) -> dict:
    r = run_load("127.0.0.1", port, request, concurrency=1, duration_s=seconds, warmup_s=0.5)
    if r.errors or not r.latencies_s:
        raise SystemExit(f"errors while measuring: {r.error_samples}")
    lat = np.array(r.latencies_s) * 1000
    return {"p50_ms": float(np.median(lat)), "p99_ms": float(np.percentile(lat, 99)),
            "rps": len(lat) / seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="ABBA blocks per routed path")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)

    import msgspec
    import ray
    from ray import serve

    from flywheel.client import Client
    from flywheel.common import load_settings, start_ray
    from flywheel.serving import parse_config
    from flywheel.serving.app import deploy, undeploy

    tmp = tempfile.mkdtemp(prefix="fw-routing-")
    model = export_model("mlp", HPARAMS, os.path.join(tmp, "mlp.onnx"))
    cfg = parse_config({
        "name": "bench-routing", "server": {"port": 0, "grpc_port": -1},
        "registry": {"uri": f"sqlite:///{tmp}/registry.db", "artifacts": f"{tmp}/artifacts"},
        "models": [{"name": "m", "version": v, "path": model, "num_cpus": 0.1} for v in ("1", "2")]
        + [{"name": "plain", "version": "1", "path": model, "num_cpus": 0.1}],
        "endpoints": [{"name": "m", "policy": {"kind": "fixed", "weights": {"1": 0.5, "2": 0.5}}}],
    })
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                   "data": np.linspace(0, 1, 64).round(4).tolist()}]}).encode()
    direct = _request("/v2/models/plain/infer", body)
    routed = _request("/v2/models/m/infer", body, "flywheel-routing-key: user-42\r\n")
    start_ray(msgspec.structs.replace(load_settings(), ray_address=""), num_cpus=4, log_to_driver=False)
    results: dict[str, list] = {"direct": [], "a/b sticky": [], "thompson": []}
    deltas: dict[str, list[float]] = {"a/b sticky": [], "thompson": []}
    try:
        dep = deploy(cfg)
        port = int(dep.url.rsplit(":", 1)[1])
        try:
            with Client(dep.url) as client:
                for path, policy in (("a/b sticky", None), ("thompson", {"kind": "thompson"})):
                    if policy is not None:
                        client.set_policy("m", policy)
                    for i in range(args.rounds):
                        print(f"[{path}] round {i + 1}/{args.rounds} (ABBA, {args.duration:.0f} s each)", flush=True)
                        a1 = _measure(port, direct, args.duration)
                        b1 = _measure(port, routed, args.duration)
                        b2 = _measure(port, routed, args.duration)
                        a2 = _measure(port, direct, args.duration)
                        results["direct"] += [a1, a2]
                        results[path] += [b1, b2]
                        deltas[path] += [b1["p50_ms"] - a1["p50_ms"], b2["p50_ms"] - a2["p50_ms"]]
        finally:
            undeploy(dep)
    finally:
        serve.shutdown()
        ray.shutdown()

    summary = {}
    print(f"\n{'path':<12} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'p50 - direct (median of pairs)':>32}")
    for path, runs in results.items():
        row = {k: statistics.median(r[k] for r in runs) for k in ("p50_ms", "p99_ms", "rps")}
        if path in deltas:
            row["delta_p50_ms"] = statistics.median(deltas[path])
            row["delta_range_ms"] = [min(deltas[path]), max(deltas[path])]
        summary[path] = row
        delta = (f"{row['delta_p50_ms'] * 1000:+.1f} us ({row['delta_range_ms'][0] * 1000:+.0f}.."
                 f"{row['delta_range_ms'][1] * 1000:+.0f})" if path in deltas else "")
        print(f"{path:<12} {row['p50_ms']:8.3f} {row['p99_ms']:8.3f} {row['rps']:8.0f} {delta:>32}")
    worst = max(summary[p]["delta_p50_ms"] for p in deltas)
    verdict = "met" if worst <= TARGET_MS else "MISSED"
    print(f"\nrouting overhead at concurrency 1: {worst * 1000:+.1f} us p50 (target <= {TARGET_MS * 1000:.0f} us): {verdict}")

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "routing.json"), "w") as f:
        json.dump({"summary": summary, "runs": results, "deltas_ms": deltas}, f, indent=1)
    _plot(results, os.path.join(args.out, "routing.png"))
    print(f"wrote {args.out}/routing.json and routing.png")
    return 0


def _plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(results)
    ax.boxplot([[r["p50_ms"] for r in results[n]] for n in names], tick_labels=names)
    ax.set_ylabel("p50 latency per run (ms)")
    ax.set_title("Router cost at concurrency 1 (same run, ABBA pairs)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
