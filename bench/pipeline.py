"""Pipeline benchmark: one sub-millisecond model served three ways.

    python -m flywheel.bench.pipeline [--duration 3] [--rounds 2] [--out bench/results]

The model is an MLP (64 -> 128 -> 64 -> 10, ReLU; made here with fixed
weights), a few microseconds per row in ONNX Runtime. It is deployed three
times on one local Ray, each colocated with default batching (what a user
writes):

- ``plain``: ``backend: onnxruntime`` on the .onnx file;
- ``python``: ``backend: python``, a user class that runs the same file in
  its own ONNX Runtime session (``batched: true``);
- ``steps``: the plain model with a ``preprocess`` step (normalise the
  input) and a ``postprocess`` step (softmax of the scores), in the replica.

Closed-loop HTTP V2 JSON load, 1 row per request, at concurrency 1 and 32,
only to 127.0.0.1; the variants take turns within each round (each round
starting with the next variant), and each figure is the median over the
rounds. Prints first each variant's one-row
``infer`` time in process (no server) and where each replica runs it
(inline or a worker thread, chosen at warm-up), then each variant's c=1
p50 and c=32 throughput against plain (target: at most 20 % worse), and
writes pipeline.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import textwrap

import msgspec
import numpy as np

CONCURRENCY = (1, 32)
VARIANTS = ("plain", "python", "steps")
TARGET = 1.20  # the most a variant may cost over plain: p50 ratio, and plain/variant throughput
LAYERS = (64, 128, 64, 10)
INPUT, OUTPUT = "input", "output"

USER_CODE = {
    # the python backend's class: the same model file, its own session
    "ort_model.py": """
        import numpy as np
        import onnxruntime as ort

        class OrtModel:
            def load(self, artifacts, config):
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = 1
                opts.inter_op_num_threads = 1
                self.session = ort.InferenceSession(artifacts["mlp.onnx"], opts, providers=["CPUExecutionProvider"])

            def predict(self, inputs):
                return {"output": self.session.run(None, {"input": inputs["input"]})[0]}
    """,
    # the steps: a cheap normalisation before, a softmax after
    "mlp_steps.py": """
        import numpy as np

        class Normalise:
            def load(self, artifacts, config):
                self.mean = np.float32(config["kwargs"]["mean"])
                self.scale = np.float32(1 / config["kwargs"]["std"])

            def process(self, inputs):
                return {"input": (inputs["input"] - self.mean) * self.scale}

        class Softmax:
            def process(self, inputs):
                z = inputs["output"]
                e = np.exp(z - z.max(axis=1, keepdims=True))
                return {"output": e / e.sum(axis=1, keepdims=True)}
    """,
}


def build_mlp(path: str, layers: tuple[int, ...] = LAYERS, seed: int = 0) -> str:
    """An MLP with fixed random weights as ONNX: ``input`` FP32 [batch,
    layers[0]] -> ``output`` FP32 [batch, layers[-1]]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], INPUT
    for i, (n_in, n_out) in enumerate(zip(layers, layers[1:])):
        w = (rng.normal(size=(n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(n_out, np.float32), f"b{i}")]
        last = i == len(layers) - 2
        out = OUTPUT if last else f"z{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [out if last else f"g{i}"]))
        if not last:
            nodes.append(helper.make_node("Relu", [f"g{i}"], [out]))
        prev = out
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", layers[0]])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", layers[-1]])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, path)
    return path


def prepare(work: str) -> list[dict]:
    """The model file, the user code beside it, and the three model configs
    (absolute paths under ``work``)."""
    path = build_mlp(os.path.join(work, "mlp.onnx"))
    for name, source in USER_CODE.items():
        with open(os.path.join(work, name), "w") as f:
            f.write(textwrap.dedent(source))
    io = {"inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, LAYERS[0]]}],
          "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, LAYERS[-1]]}]}
    common = {"num_cpus": 0.25}
    return [
        {"name": "plain", "path": path, **common},
        {"name": "python", "path": work, "backend": "python",
         "python": {"class": "ort_model:OrtModel", "batched": True, **io}, **common},
        {"name": "steps", "path": path, **common,
         "preprocess": {"class": "mlp_steps:Normalise", "kwargs": {"mean": 0.5, "std": 0.29},
                        "inputs": io["inputs"]},
         "postprocess": {"class": "mlp_steps:Softmax", "outputs": io["outputs"]}},
    ]


def request_body(seed: int = 1) -> bytes:
    x = np.random.default_rng(seed).random(LAYERS[0], dtype=np.float32)
    return msgspec.json.encode(
        {"inputs": [{"name": INPUT, "shape": [1, LAYERS[0]], "datatype": "FP32", "data": x.tolist()}]})


def medians(rows: list[dict]) -> dict[tuple[str, int], dict]:
    """Per (variant, concurrency): the median p50 (ms) and throughput (req/s)
    over the rounds' rows."""
    out: dict[tuple[str, int], dict] = {}
    for key in sorted({(r["variant"], r["concurrency"]) for r in rows}):
        got = [r for r in rows if (r["variant"], r["concurrency"]) == key]
        out[key] = {"p50_ms": statistics.median(r["p50_ms"] for r in got),
                    "throughput_rps": statistics.median(r["throughput_rps"] for r in got),
                    "errors": sum(r["errors"] for r in got)}
    return out


def in_process_us(models: list[dict], calls: int = 2000) -> dict[str, float]:
    """Median microseconds of one ``infer`` of one row per variant, each
    backend made by the model server's factory in this process (no server):
    what the steps and the python backend add to the model call itself."""
    import time

    from flywheel.serving.config import parse_config
    from flywheel.serving.model_server import make_backend

    x = {INPUT: np.random.default_rng(2).random((1, LAYERS[0]), dtype=np.float32)}
    out = {}
    for model in parse_config({"models": models}).models:
        backend = make_backend(model)
        backend.load()
        backend.warmup((1,))
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            backend.infer(x)
            times.append(time.perf_counter() - t)
        backend.close()
        out[model.name] = statistics.median(times) * 1e6
    return out


def execution_of(url: str, name: str) -> str:
    """Where the replica runs model ``name`` (inline / worker thread), from
    its V2 metadata: the choice made at warm-up decides much of c=1 p50."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/v2/models/{name}", timeout=10) as resp:
        params = json.loads(resp.read()).get("parameters", {})
    return f"{params.get('execution', '?')} ({params.get('execution_chosen_by', '?')})"


def verdicts(summary: dict[tuple[str, int], dict]) -> list[str]:
    """One line per variant other than plain: its c=1 p50 and c=32 throughput
    as ratios to plain's (cost: > 1 is worse), each against TARGET."""
    lines = []
    base1, base32 = summary[("plain", 1)], summary[("plain", 32)]
    for variant in VARIANTS[1:]:
        if (variant, 1) not in summary:
            continue
        v1, v32 = summary[(variant, 1)], summary[(variant, 32)]
        p50 = v1["p50_ms"] / base1["p50_ms"]
        rps = base32["throughput_rps"] / v32["throughput_rps"]
        verdict = lambda r: "ok" if r <= TARGET else "OVER"  # noqa: E731
        lines.append(
            f"{variant}: c=1 p50 x{p50:.2f} ({v1['p50_ms']:.3f} vs {base1['p50_ms']:.3f} ms) {verdict(p50)}; "
            f"c=32 throughput cost x{rps:.2f} ({v32['throughput_rps']:.0f} vs {base32['throughput_rps']:.0f} req/s) "
            f"{verdict(rps)}; target <= x{TARGET:.2f} each"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    from flywheel.bench.common import bench_deployment
    from flywheel.bench.loadgen import build_request, run_load

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds measured per point")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds of warm-up per point")
    parser.add_argument("--rounds", type=int, default=2, help="turns of every variant; figures are medians")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)

    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="fw-bench-pipeline-")
    models = prepare(work)
    body = request_body()
    rows: list[dict] = []
    call_us = in_process_us(models)
    print("one-row infer in process (median): "
          + ", ".join(f"{name} {us:.1f} us" for name, us in call_us.items()), flush=True)
    print(f"starting Ray and deploying {len(models)} models ...", flush=True)
    with bench_deployment("bench-pipeline", models) as dep:
        host, port = dep.url.removeprefix("http://").split(":")
        executions = {v: execution_of(dep.url, v) for v in VARIANTS}
        print("execution: " + ", ".join(f"{v} {e}" for v, e in executions.items()), flush=True)
        for rnd in range(args.rounds):
            # each round starts with another variant: no variant always follows the same one
            order = VARIANTS[rnd % len(VARIANTS):] + VARIANTS[:rnd % len(VARIANTS)]
            for c in CONCURRENCY:
                for variant in order:
                    request = build_request(f"/v2/models/{variant}/infer", body)
                    res = run_load(host, int(port), request, concurrency=c, duration_s=args.duration,
                                   warmup_s=args.warmup)
                    row = {"round": rnd, "variant": variant, **res.summary()}
                    rows.append(row)
                    print(f"  round {rnd} {variant:<7} c={c:<3} {row['throughput_rps']:>9.1f} req/s "
                          f"p50 {row['p50_ms']:.3f} p99 {row['p99_ms']:.3f} ms"
                          f"{'  errors ' + str(row['errors']) if row['errors'] else ''}", flush=True)
    summary = medians(rows)
    print(f"\n{'variant':<9}{'conc':>5}{'req/s':>11}{'p50 ms':>9}{'errors':>8}   (medians of {args.rounds} rounds)")
    for (variant, c), s in summary.items():
        print(f"{variant:<9}{c:>5}{s['throughput_rps']:>11.1f}{s['p50_ms']:>9.3f}{s['errors']:>8}")
    print()
    for line in verdicts(summary):
        print(line)
    with open(os.path.join(args.out, "pipeline.json"), "w") as f:
        json.dump({"duration_s": args.duration, "rounds": args.rounds, "in_process_us": call_us,
                   "execution": executions, "rows": rows}, f, indent=1)
    print(f"\nwrote {args.out}/pipeline.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
