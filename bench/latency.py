"""Request-path benchmark: Flywheel against plain Ray Serve, on one machine.

    python -m flywheel.bench.latency [--rounds 3] [--block 1] [--duration 5] [--replicas 2] [--out bench/results]

One invocation measures, on this machine, the same ONNX model (an MLP
64->512->512->10, 1 row per request) behind:

- **flywheel**: Flywheel on Ray Serve as deployed (``server.replicas``
  ingress replicas sharing the ports, the model colocated in them), with
  routing, validation, metrics and API-key auth on; over HTTP JSON, HTTP
  binary tensors and gRPC;
- **flywheel, grpcio**: the same deployment with gRPC terminated by grpc.aio
  in the replica (``server.grpc_server: grpcio``) instead of the HAProxy
  HTTP/2 front (serving/_private/grpc_front.py), gRPC only;
- **flywheel, no Ray**: the same server in as many plain processes
  (``flywheel.bench.standalone``), the floor for our request path;
- **ray serve**: the plain Ray Serve deployment of ``rayserve_ref`` (Starlette
  request, ``@serve.batch``) through Serve's HTTP and gRPC proxies;
- **ray serve, direct ingress**: the same with
  ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1`` (each replica serves its own ports;
  load is split across them);
- **mlserver** (``mlserver_ref``, adaptive batching) and **kserve**
  (``kserve_ref``: KServe's Python ModelServer, FastAPI/uvicorn and grpc.aio),
  the Python V2 servers, each one process from its own virtual environment,
  over HTTP JSON and gRPC.

Flywheel, its no-Ray floor, plain Ray Serve, MLServer and KServe are up at
the same time (one Ray, their own ports), and Flywheel is compared with each
of the others on every path both speak, at every concurrency, in A B B A blocks of
--block seconds over --rounds rounds (bench/interleave.py): this host's speed
drifts more than the differences compared, so each block is compared with its
neighbour in time and the median of the paired ratios is reported with their
range. A block with errors is left out with its pair, and said. The two
systems that need a Ray of their own (grpcio; direct ingress, set when Ray
starts) are measured alone afterwards, --duration seconds per point.

Closed loop at concurrency 1, 8 and 32, after a warm-up per point, loopback
only; load from h2load when installed (see bench/h2load.py), else from the
Python client in bench/loadgen.py (which then limits what can be shown, and
says so). Prints throughput and p50/p90/p99 per point (a paired system's
blocks pooled), the paired ratios, and the issues' targets (ratio targets from
the pairs), and writes latency.json (with every block) and latency.png to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import msgspec
import numpy as np

from flywheel.bench import h2load, kserve_ref, mlserver_ref
from flywheel.bench import interleave as il
from flywheel.bench.common import export_model, free_port
from flywheel.bench.loadgen import LoadResult, build_request, run_grpc_load, run_load
from flywheel.common.settings import load_settings

HPARAMS = {"in_features": 64, "hidden": [512, 512], "out_features": 10}
GRPC_PATH = "/inference.GRPCInferenceService/ModelInfer"
MODEL = "mlp"


@dataclass(frozen=True)
class Path:
    """One way in: ``urls`` (one per listening replica) and what to send."""

    label: str  # "http json", "http binary", "grpc"
    urls: tuple[str, ...]
    target: h2load.Target


def _post(url: str, body: bytes, headers: dict[str, str]) -> bytes:
    req = urllib.request.Request(url, body, headers, method="POST")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.read()


def _grpc_call(host_port: str, message: bytes, metadata: tuple = ()) -> bytes:
    import grpc

    with grpc.insecure_channel(host_port) as ch:
        return ch.unary_unary(GRPC_PATH)(message, timeout=30, metadata=metadata)


def _check(path: Path, expected: np.ndarray) -> Path:
    """One real request per path before loading it: the answer must be the
    model's (so that a fast error is never measured as a fast answer); also
    learns a good answer's size for h2load's gRPC error check."""
    from flywheel.protocol.proto import inference_pb2 as pb

    t = path.target
    headers = dict(h.split(": ", 1) for h in t.headers)
    for url in path.urls:
        if t.grpc:
            host_port = url.split("//", 1)[1].split("/", 1)[0]
            meta = tuple((k.lower(), v) for k, v in headers.items() if k.lower() not in ("content-type", "te"))
            raw = _grpc_call(host_port, t.body[5:], meta)
            answer = pb.ModelInferResponse.FromString(raw)
            if answer.raw_output_contents:
                got = np.frombuffer(answer.raw_output_contents[0], np.float32)
            else:  # typed contents (MLServer answers so)
                got = np.asarray(answer.outputs[0].contents.fp32_contents, np.float32)
            good = len(raw)
        else:
            raw = _post(url, t.body, headers)
            if "inference-header-content-length" in {k.lower() for k in headers}:
                got = np.frombuffer(raw[-4 * expected.size:], np.float32)
            else:
                got = np.asarray(json.loads(raw)["outputs"][0]["data"], np.float32)
            good = len(raw)
        if not np.allclose(got.reshape(expected.shape), expected, atol=1e-4):
            raise RuntimeError(f"{path.label} at {url}: wrong answer {got[:4]}...")
    return Path(path.label, path.urls, h2load.Target(t.url, t.body, t.headers, t.grpc, good))


def _measure(path: Path, concurrency: int, duration: float, warmup: float) -> LoadResult:
    if h2load.available():
        return h2load.run(list(path.urls), path.target, concurrency=concurrency, duration_s=duration,
                          warmup_s=warmup)
    # Python client fallback: first URL only
    url = path.urls[0]
    host_port, _, route = url.split("//", 1)[1].partition("/")
    host, port = host_port.rsplit(":", 1)
    t = path.target
    if t.grpc:
        return run_grpc_load(host_port, GRPC_PATH, t.body[5:], concurrency=concurrency, duration_s=duration,
                             warmup_s=warmup)
    extra = "".join(f"{h}\r\n" for h in t.headers if not h.lower().startswith("content-type"))
    request = build_request("/" + route, t.body).replace(b"\r\n\r\n", b"\r\n" + extra.encode() + b"\r\n", 1)
    return run_load(host, int(port), request, concurrency=concurrency, duration_s=duration, warmup_s=warmup)


# -- payloads ---------------------------------------------------------------

@dataclass(frozen=True)
class Payloads:
    x: np.ndarray
    expected: np.ndarray
    json: bytes
    binary: bytes
    binary_header: int
    grpc: bytes  # 5-byte gRPC framing + ModelInferRequest


def _payloads(model_path: str) -> Payloads:
    import onnxruntime as ort

    from flywheel.bench.harness.payloads import encode
    from flywheel.bench.harness.scenario import OutputSpec

    x = np.random.default_rng(7).random((1, HPARAMS["in_features"]), dtype=np.float32)
    expected = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    bodies = encode(MODEL, "", {"input": x}, {"input": "FP32"}, [OutputSpec("logits")])
    framed = b"\x00" + len(bodies.grpc).to_bytes(4, "big") + bodies.grpc
    return Payloads(x, expected, bodies.json, bodies.binary, bodies.binary_header_length, framed)


def _flywheel_paths(http_port: int, grpc_port: int, p: Payloads, token: str) -> list[Path]:
    auth = (f"authorization: Bearer {token}",) if token else ()
    url = f"http://127.0.0.1:{http_port}/v2/models/{MODEL}/infer"
    return [
        Path("http json", (url,), h2load.Target(url, p.json, ("content-type: application/json", *auth))),
        Path("http binary", (url,), h2load.Target(url, p.binary, (
            "content-type: application/octet-stream", f"inference-header-content-length: {p.binary_header}", *auth))),
        Path("grpc", (f"http://127.0.0.1:{grpc_port}{GRPC_PATH}",), h2load.Target(
            f"http://127.0.0.1:{grpc_port}{GRPC_PATH}", p.grpc,
            ("content-type: application/grpc", "te: trailers", *auth), grpc=True)),
    ]


# -- the systems under test ---------------------------------------------------

def _flywheel_config(model_path: str, replicas: int, registry_uri: str, auth: bool) -> dict:
    return {
        "name": "latency",
        "server": {"port": free_port(), "grpc_port": free_port(), "replicas": replicas,
                   "auth": {"enabled": auth}},
        "registry": {"uri": registry_uri},
        "models": [{
            "name": MODEL, "path": model_path, "num_cpus": 0.5,
            "batching": {"max_batch_size": 64, "max_queue_delay_us": 0, "inline": True},
            "warmup_batch_sizes": [1, 8, 32, 64],
        }],
    }


@contextlib.contextmanager
def _ray(env: dict[str, str] | None = None) -> Iterator[None]:
    import ray
    from ray import serve

    from flywheel.common import start_ray

    # the Ray started here (and its workers) inherit ``env``; the whole
    # environment is put back afterwards
    saved = os.environ.copy()
    os.environ.update(env or {})
    start_ray(msgspec.structs.replace(load_settings(), ray_address=""), num_cpus=4, log_to_driver=False)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def flywheel_on_ray(cfg: dict, p: Payloads, token: str, labels: tuple[str, ...] = ()) -> Iterator[list[Path]]:
    with _ray(), flywheel_app(cfg, p, token, labels) as paths:
        yield paths


@contextlib.contextmanager
def flywheel_app(cfg: dict, p: Payloads, token: str, labels: tuple[str, ...] = ()) -> Iterator[list[Path]]:
    """Flywheel deployed on the Ray this process has started."""
    from flywheel.serving import parse_config
    from flywheel.serving.app import deploy, undeploy

    dep = deploy(parse_config(cfg))
    try:
        paths = _flywheel_paths(cfg["server"]["port"], cfg["server"]["grpc_port"], p, token)
        yield [x for x in paths if x.label in labels] if labels else paths
    finally:
        undeploy(dep)


@contextlib.contextmanager
def flywheel_without_ray(cfg: dict, p: Payloads, token: str) -> Iterator[list[Path]]:
    procs = [subprocess.Popen([sys.executable, "-m", "flywheel.bench.standalone", json.dumps(cfg)],
                              stdout=subprocess.PIPE, text=True) for _ in range(cfg["server"]["replicas"])]
    try:
        for proc in procs:
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("the standalone server did not start")
        yield _flywheel_paths(cfg["server"]["port"], cfg["server"]["grpc_port"], p, token)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)


def _ports_listening(first: int, count: int = 20) -> list[int]:
    found = []
    for port in range(first, first + count):
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                found.append(port)
    return found


def _direct_env(direct: bool) -> dict[str, str]:
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1" if direct else "0"}


@contextlib.contextmanager
def ray_serve(model_path: str, p: Payloads, replicas: int, direct: bool) -> Iterator[list[Path]]:
    with _ray(_direct_env(direct)), ray_serve_app(model_path, p, replicas, direct) as paths:
        yield paths


@contextlib.contextmanager
def ray_serve_app(model_path: str, p: Payloads, replicas: int, direct: bool) -> Iterator[list[Path]]:
    """The plain Ray Serve reference on the Ray this process has started
    (with ``_direct_env(direct)``). Serve's proxies are set by the first
    ``serve.start`` in a cluster: start this one before Flywheel's deploy
    (which asks for none) when both share a Ray."""
    from ray import serve
    from ray.serve.config import gRPCOptions

    from flywheel.bench.rayserve_ref import GRPC_SERVICER, RayServeModel

    http_port, grpc_port = free_port(), free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=[GRPC_SERVICER]))
    # max_ongoing_requests: Serve's default of 5 would cap every batch at 5
    app = RayServeModel.options(num_replicas=replicas, max_ongoing_requests=64,
                                ray_actor_options={"num_cpus": 0.5}).bind(model_path, MODEL)
    serve.run(app, name="ref", route_prefix="/ref")
    if direct:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            http_ports, grpc_ports = _ports_listening(30000), _ports_listening(40000)
            if len(http_ports) >= replicas and len(grpc_ports) >= replicas:
                break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"direct-ingress replicas not listening: {http_ports} {grpc_ports}")
    else:
        http_ports, grpc_ports = [http_port], [grpc_port]
    urls = tuple(f"http://127.0.0.1:{port}/ref" for port in http_ports)
    grpc_urls = tuple(f"http://127.0.0.1:{port}{GRPC_PATH}" for port in grpc_ports)
    yield [
        Path("http json", urls, h2load.Target(urls[0], p.json, ("content-type: application/json",))),
        Path("grpc", grpc_urls, h2load.Target(grpc_urls[0], p.grpc, (
            "content-type: application/grpc", "te: trailers", "application: ref"), grpc=True)),
    ]
    serve.delete("ref")


@contextlib.contextmanager
def v2_reference(server, venv: str, model_path: str, p: Payloads) -> Iterator[list[Path]]:
    """A Python V2 server (``mlserver_ref.mlserver``, ``kserve_ref.kserve``:
    ``server(venv, model_path, name, http_port, grpc_port)``) over HTTP JSON
    and gRPC, sent the same bodies as Flywheel (gRPC: raw input contents)."""
    http_port, grpc_port = free_port(), free_port()
    with server(venv, model_path, MODEL, http_port, grpc_port):
        url = f"http://127.0.0.1:{http_port}/v2/models/{MODEL}/infer"
        grpc_url = f"http://127.0.0.1:{grpc_port}{GRPC_PATH}"
        yield [
            Path("http json", (url,), h2load.Target(url, p.json, ("content-type: application/json",))),
            Path("grpc", (grpc_url,), h2load.Target(grpc_url, p.grpc, (
                "content-type: application/grpc", "te: trailers"), grpc=True)),
        ]


# -- paired comparisons -------------------------------------------------------

def _block(path: Path, concurrency: int, seconds: float) -> LoadResult:
    """One block of a paired comparison; a block with an error or no
    answer raises, so that it is left out with its pair (and said)."""
    res = _measure(path, concurrency, seconds, 0.0)
    if res.errors or not res.latencies_s:
        raise RuntimeError(f"{res.errors} errors {res.error_samples[:1]}, {len(res.latencies_s)} answers")
    return res


def _medians(pairs: list, side: str) -> dict:
    return {"throughput_rps": il.side_median(pairs, side, lambda r: r.throughput),
            "p50_ms": il.side_median(pairs, side, lambda r: r.percentile_ms(50))}


def comparison(a: str, b: str, path: str, concurrency: int, blocks: list, rounds: int, block_s: float) -> dict:
    """The JSON record of ``b`` against ``a`` measured in ``blocks`` (A B B A,
    LoadResults): every block, the pairs left out and why, each side's
    medians over the paired blocks, and how much faster ``b`` is (``b_faster``:
    throughput b/a and p50 a/b, median and range of the paired ratios)."""
    pairs, excluded = il.neighbour_pairs(blocks)
    names = {il.A: a, il.B: b}
    faster = {
        "throughput_rps": il.RatioStats.of(il.paired_ratios(pairs, lambda r: r.throughput)),
        "p50_ms": il.RatioStats.of(il.paired_ratios(pairs, lambda r: r.percentile_ms(50), numerator=il.A)),
    }
    return {
        "a": a, "b": b, "path": path, "concurrency": concurrency, "rounds": rounds, "block_s": block_s,
        "blocks": [{"index": blk.index, "round": blk.round, "side": blk.side, "system": names[blk.side],
                    **(blk.result.summary() if blk.ok else {"error": blk.error})} for blk in blocks],
        "pairs": len(pairs), "excluded": excluded,
        "median_a": _medians(pairs, il.A), "median_b": _medians(pairs, il.B),
        "b_faster": {k: v.as_dict() for k, v in faster.items() if v is not None},
    }


def _compare(a: tuple[str, Path], b: tuple[str, Path], concurrency: int, rounds: int, block_s: float,
             warmup: float) -> tuple[dict, list]:
    """Warm both up, then measure in A B B A blocks; returns the record
    (``comparison``) and the blocks."""
    if warmup > 0:
        for _, path in (a, b):
            _measure(path, concurrency, warmup, 0.0)
    blocks = il.run_blocks(rounds, lambda: _block(a[1], concurrency, block_s),
                           lambda: _block(b[1], concurrency, block_s))
    return comparison(a[0], b[0], a[1].label, concurrency, blocks, rounds, block_s), blocks


def pooled(system: str, path: str, results: list[LoadResult]) -> dict:
    """One table row from a system's blocks at one point: all their
    requests pooled (throughput over the blocks' total time)."""
    res = LoadResult(results[0].concurrency, sum(r.duration_s for r in results),
                     [x for r in results for x in r.latencies_s], sum(r.errors for r in results))
    return {**_row(system, path, res), "mode": "paired blocks", "blocks": len(results)}


# Flywheel is A against its floor (B: "the floor is x faster") and B against
# the peers ("Flywheel is x faster")
PARTNERS = (("flywheel, no ray", "floor"), ("ray serve", "peer"), ("mlserver", "peer"), ("kserve", "peer"))
# how many times a peer's throughput Flywheel must answer at the top
# concurrency, on which paths (paired): issue 11's for Ray Serve, issue 26's
# for KServe's gRPC
PEER_TARGETS = (("ray serve", ("http json", "http binary", "grpc"), 10), ("kserve", ("grpc",), 5))


# -- report -------------------------------------------------------------------

def _row(system: str, path: str, res: LoadResult) -> dict:
    return {"system": system, "path": path, **res.summary()}


def _print_row(r: dict) -> None:
    err = f"  errors {r['errors']} {r['error_samples'][:1]}" if r["errors"] else ""
    print(f"  {r['system']:<27}{r['path']:<13}c={r['concurrency']:<3}{r['throughput_rps']:>9.0f} req/s  "
          f"p50 {r['p50_ms']:7.3f}  p90 {r['p90_ms']:7.3f}  p99 {r['p99_ms']:7.3f} ms{err}", flush=True)


def _b_faster(comp: dict, key: str) -> dict | None:
    return comp.get("b_faster", {}).get(key)


def _paired_lines(comps: list[dict]) -> list[str]:
    if not comps:
        return []
    lines = [f"paired (A B B A blocks, {comps[0]['rounds']} rounds of {comps[0]['block_s']:g} s; median of the "
             "paired ratios [min-max]; x>1: the second system is faster):"]
    for comp in comps:
        parts = []
        for key, what in (("throughput_rps", "req/s"), ("p50_ms", "p50")):
            st = _b_faster(comp, key)
            parts.append(f"{what} x{st['median']:.2f} [{st['min']:.2f}-{st['max']:.2f}]" if st else f"{what} -")
        ma, mb = comp["median_a"], comp["median_b"]
        lines.append(f"  {comp['b'] + ' vs ' + comp['a']:<36}{comp['path']:<12} c={comp['concurrency']:<3} "
                     f"{'  '.join(parts)}  ({comp['a']} {ma['throughput_rps']:.0f} req/s {ma['p50_ms']:.3f} ms; "
                     f"{comp['b']} {mb['throughput_rps']:.0f} req/s {mb['p50_ms']:.3f} ms; "
                     f"{comp['pairs']} pairs)")
        lines += [f"    {note}" for note in comp["excluded"]]
    return lines


def _summary(rows: list[dict], comps: list[dict], top: int) -> list[str]:
    """The paired comparisons, the sequential ratios to the systems that
    cannot share a Ray with Flywheel, and the targets: every ratio target
    from the paired blocks, absolute ones from Flywheel's pooled rows."""
    def get(system, path, c):
        return next((r for r in rows if r["system"] == system and r["path"] == path and r["concurrency"] == c), None)

    def paired(a, b, path, c):
        return next((x for x in comps if x["a"] == a and x["b"] == b and x["path"] == path
                     and x["concurrency"] == c), None)

    lines = _paired_lines(comps)
    seq = []
    for path in ("http json", "http binary", "grpc"):
        fw = get("flywheel", path, top)
        if fw is None:
            continue
        parts = []
        for ref in ("ray serve, direct ingress", "flywheel, grpcio"):
            r, theirs = get(ref, path, top), ""
            if r is None and path.startswith("http") and ref != "flywheel, grpcio":  # the references speak JSON only
                r, theirs = get(ref, "http json", top), " (their json)"
            if r and r["throughput_rps"]:
                parts.append(f"x{fw['throughput_rps'] / r['throughput_rps']:.1f} vs {ref}{theirs}")
        if parts:
            seq.append(f"  flywheel {path:<12} " + "; ".join(parts))
    if seq:
        lines += [f"sequential runs (not paired: these need a Ray of their own), throughput at concurrency {top}:", *seq]
    targets = []
    h1 = get("flywheel", "http json", 1)
    h32 = get("flywheel", "http json", top)
    g32 = get("flywheel", "grpc", top)
    if h1:
        targets.append(("HTTP c=1 p50 <= 0.5 ms (issue 11)", h1["p50_ms"] <= 0.5, f"{h1['p50_ms']:.3f} ms"))
        targets.append(("HTTP c=1 p50 <= 0.3 ms (issue 26)", h1["p50_ms"] <= 0.3, f"{h1['p50_ms']:.3f} ms"))
    if h32:
        targets.append((f"HTTP c={top} >= 8000 req/s, p99 <= 10 ms",
                        h32["throughput_rps"] >= 8000 and h32["p99_ms"] <= 10,
                        f"{h32['throughput_rps']:.0f} req/s, p99 {h32['p99_ms']:.2f} ms"))
    if g32:
        targets.append((f"gRPC c={top} >= 3000 req/s", g32["throughput_rps"] >= 3000,
                        f"{g32['throughput_rps']:.0f} req/s"))
    for path in ("http json", "http binary", "grpc"):
        for c, key, what in ((1, "p50_ms", "p50 flywheel/floor"), (top, "throughput_rps", "req/s floor/flywheel")):
            comp = paired("flywheel", "flywheel, no ray", path, c)
            st = comp and _b_faster(comp, key)
            if st:
                targets.append((f"{path} c={c} {key.split('_')[0]} within 1.1x of the no-Ray floor (paired)",
                                st["median"] <= 1.1, f"{what} {st['median']:.2f} [{st['min']:.2f}-{st['max']:.2f}]"))
        for peer, paths, factor in PEER_TARGETS:
            comp = path in paths and paired(peer, "flywheel", path, top)
            st = comp and _b_faster(comp, "throughput_rps")
            if st:
                targets.append((f"{path} c={top} >= {factor}x {peer} (paired)", st["median"] >= factor,
                                f"x{st['median']:.1f} [{st['min']:.1f}-{st['max']:.1f}]"))
        fw = get("flywheel", path, top)
        r = get("ray serve, direct ingress", path, top) or (
            get("ray serve, direct ingress", "http json", top) if path.startswith("http") else None)
        if fw and r and r["throughput_rps"]:
            x = fw["throughput_rps"] / r["throughput_rps"]
            targets.append((f"{path} c={top} >= 2.5x ray serve, direct ingress (sequential)", x >= 2.5, f"x{x:.1f}"))
    lines.append("targets (issues 11 and 26):")
    lines += [f"  {'met ' if ok else 'MISS'} {name}: {value}" for name, ok, value in targets]
    return lines


def _plot(rows: list[dict], path: str, top: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(dict.fromkeys(r["system"] for r in rows))
    paths = list(dict.fromkeys(r["path"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / max(1, len(systems))
    for k, system in enumerate(systems):
        for ax, (c, field, label) in zip(axes, ((top, "throughput_rps", f"requests/s at concurrency {top}"),
                                                (1, "p50_ms", "p50 latency (ms) at concurrency 1"))):
            vals = [next((r[field] for r in rows if r["system"] == system and r["path"] == p
                          and r["concurrency"] == c), 0) for p in paths]
            ax.bar(np.arange(len(paths)) + k * width, vals, width, label=system)
            ax.set_ylabel(label)
    for ax in axes:
        ax.set_xticks(np.arange(len(paths)) + width * (len(systems) - 1) / 2, paths)
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle("MLP 64-512-512-10, 1 row per request, closed loop, loopback, 2 cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0,
                    help="seconds measured per point of a system measured alone (grpcio, direct ingress)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="A B B A rounds of every paired comparison (flywheel vs floor and peers)")
    ap.add_argument("--block", type=float, default=1.0,
                    help="seconds per block of a paired comparison (h2load: whole seconds)")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per point")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--replicas", type=int, default=2, help="replicas of every system (one per core here)")
    ap.add_argument("--only", default="",
                    help="comma-separated subset: flywheel,grpcio,noray,rayserve,direct,mlserver,kserve")
    ap.add_argument("--mlserver-venv", default=mlserver_ref.default_venv(),
                    help="virtual environment with MLServer (default .venv-mlserver or $FLYWHEEL_MLSERVER_VENV)")
    ap.add_argument("--kserve-venv", default=kserve_ref.default_venv(),
                    help="virtual environment with KServe (default .venv-kserve or $FLYWHEEL_KSERVE_VENV)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    only = set(filter(None, args.only.split(","))) or {"flywheel", "grpcio", "noray", "rayserve", "direct", "mlserver",
                                                       "kserve"}

    from flywheel.registry.keys import KeyStore

    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="fw-bench-latency-")
    print("load generator:", "h2load (nghttp2)" if h2load.available() else
          "Python (bench/loadgen.py; install nghttp2-client for h2load, which leaves the server more CPU)")
    print("exporting the model ...", flush=True)
    model_path = export_model("mlp", HPARAMS, os.path.join(work, "mlp.onnx"))
    uri = f"sqlite:///{work}/registry.db"
    store = KeyStore.open(uri)
    _, token = store.create("bench", ["predict"], actor="bench")
    store.close()
    payloads = _payloads(model_path)
    cfg = _flywheel_config(model_path, args.replicas, uri, auth=True)

    together = [  # up at the same time, in one Ray; plain Ray Serve first (see ray_serve_app)
        ("rayserve", "ray serve", lambda: ray_serve_app(model_path, payloads, args.replicas, direct=False)),
        ("flywheel", "flywheel", lambda: flywheel_app(cfg, payloads, token)),
        ("noray", "flywheel, no ray", lambda: flywheel_without_ray(
            {**cfg, "server": {**cfg["server"], "port": free_port(), "grpc_port": free_port()}}, payloads, token)),
        ("mlserver", "mlserver", lambda: v2_reference(mlserver_ref.mlserver, args.mlserver_venv, model_path,
                                                      payloads)),
        ("kserve", "kserve", lambda: v2_reference(kserve_ref.kserve, args.kserve_venv, model_path, payloads)),
    ]
    alone = [  # each needs a Ray of its own: measured one after the other
        # gRPC terminated by grpc.aio in the replica instead of the HAProxy
        # front (server.grpc_server: grpcio): what the front is worth
        ("grpcio", "flywheel, grpcio", lambda: flywheel_on_ray(
            {**cfg, "server": {**cfg["server"], "grpc_server": "grpcio"}}, payloads, token, labels=("grpc",))),
        ("direct", "ray serve, direct ingress", lambda: ray_serve(model_path, payloads, args.replicas, direct=True)),
    ]
    for key, ref, venv, what in (("mlserver", mlserver_ref, args.mlserver_venv, "MLServer"),
                                 ("kserve", kserve_ref, args.kserve_venv, "KServe")):
        if key in only and not ref.installed(venv):
            print(f"{key}: not measured: no {what} in {venv} (make bench-{key} creates it)")
            only.discard(key)
    rows: list[dict] = []
    comps: list[dict] = []
    started = time.monotonic()
    if only & {key for key, _, _ in together}:
        rows, comps = _measure_together([x for x in together if x[0] in only], payloads, levels, args)
    for key, system, start in alone:
        if key in only:
            rows += _measure_alone(system, start, payloads, levels, args)
    print(f"\nmeasured in {time.monotonic() - started:.0f} s")
    print(f"{'system':<27}{'path':<13}{'conc':>5}{'req/s':>10}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'errors':>8}  mode")
    for r in rows:
        print(f"{r['system']:<27}{r['path']:<13}{r['concurrency']:>5}{r['throughput_rps']:>10.0f}"
              f"{r['p50_ms']:>9.3f}{r['p90_ms']:>9.3f}{r['p99_ms']:>9.3f}{r['errors']:>8}  {r['mode']}")
    print()
    top = max(levels)
    for line in _summary(rows, comps, top):
        print(line)
    result = {"duration_s": args.duration, "rounds": args.rounds, "block_s": args.block, "replicas": args.replicas,
              "model": HPARAMS, "load_generator": "h2load" if h2load.available() else "python", "rows": rows,
              "paired": comps}
    with open(os.path.join(args.out, "latency.json"), "w") as f:
        json.dump(result, f, indent=1)
    if rows:
        _plot(rows, os.path.join(args.out, "latency.png"), top)
    print(f"\nwrote {args.out}/latency.json and {args.out}/latency.png")
    return 0


def _not_measured(system: str, exc: Exception) -> None:
    print(f"  {system}: not measured: {exc!r}", flush=True)
    if load_settings().bench_debug:
        import traceback

        traceback.print_exc()


def _measure_alone(system: str, start, payloads: Payloads, levels: list[int], args) -> list[dict]:
    """One system on its own, each point for ``args.duration`` seconds."""
    rows = []
    print(f"{system}: starting ...", flush=True)
    try:
        with start() as paths:
            for path in paths:
                path = _check(path, payloads.expected)
                for c in levels:
                    row = {**_row(system, path.label, _measure(path, c, args.duration, args.warmup)),
                           "mode": "sequential"}
                    rows.append(row)
                    _print_row(row)
    except Exception as exc:  # noqa: BLE001 - a reference that fails is reported, the rest still runs
        _not_measured(system, exc)
    return rows


def _measure_together(systems: list, payloads: Payloads, levels: list[int], args) -> tuple[list[dict], list[dict]]:
    """Start ``systems`` side by side; pair Flywheel with each of the others
    on every path both speak, at every level, in A B B A blocks; a system
    with no partner is measured alone (sequentially). Returns the table
    rows (each system's blocks pooled per point) and the comparisons."""
    blocks: dict[tuple[str, str, int], list[LoadResult]] = {}
    comps: list[dict] = []
    rows: list[dict] = []
    with contextlib.ExitStack() as stack:
        if any(key in ("flywheel", "rayserve") for key, _, _ in systems):
            stack.enter_context(_ray(_direct_env(False)))
        up: dict[str, dict[str, Path]] = {}
        for _key, system, start in systems:
            print(f"{system}: starting ...", flush=True)
            try:
                up[system] = {p.label: _check(p, payloads.expected) for p in stack.enter_context(start())}
            except Exception as exc:  # noqa: BLE001 - a reference that fails is reported, the rest still runs
                _not_measured(system, exc)
        fw = up.get("flywheel", {})
        partners = [(name, role) for name, role in PARTNERS if name in up and fw]
        for name, role in partners:
            for label in (x for x in fw if x in up[name]):
                for c in levels:
                    a, b = (("flywheel", fw[label]), (name, up[name][label])) if role == "floor" else \
                        ((name, up[name][label]), ("flywheel", fw[label]))
                    comp, got = _compare(a, b, c, args.rounds, args.block, args.warmup)
                    comps.append(comp)
                    print("\n".join(_paired_lines([comp])[1:]), flush=True)
                    for blk in got:
                        if blk.ok:
                            blocks.setdefault((comp[blk.side], label, c), []).append(blk.result)
        paired_systems = {"flywheel"} | {name for name, _ in partners} if partners else set()
        for system, paths in up.items():
            if system in paired_systems:
                continue
            for label, path in paths.items():
                for c in levels:
                    row = {**_row(system, label, _measure(path, c, args.duration, args.warmup)), "mode": "sequential"}
                    rows.append(row)
                    _print_row(row)
    order = ["flywheel", "flywheel, no ray", "ray serve", "mlserver", "kserve"]
    for (system, label, c), results in sorted(blocks.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1:])):
        rows.append(pooled(system, label, results))
    return rows, comps

if __name__ == "__main__":
    sys.exit(main())
