"""What API keys cost per request.

    python -m flywheel.bench.auth [--duration 3]

Times Authenticator.authenticate and the per-key concurrency bookkeeping
alone, then HTTP inference (demo-sized MLP, 1x64 FP32 JSON, closed loop,
127.0.0.1) through an in-process replica and ingress with auth off and on
(off, on, on, off), at concurrency 1 and 32. Prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import timeit

import msgspec

from flywheel.bench.common import export_model, free_port
from flywheel.bench.loadgen import run_load


def check_cost(uri: str, token: str) -> dict:
    from flywheel.registry.keys import parse_token
    from flywheel.serving.auth import Authenticator
    from flywheel.serving.config import AuthConfig

    auth = Authenticator(AuthConfig(enabled=True), uri)

    async def measure() -> dict:
        await auth.start()
        header, n = f"Bearer {token}", 100_000
        check = timeit.timeit(lambda: auth.authenticate(header, "predict", "POST /x"), number=n) / n
        key_id, _ = parse_token(token)
        book = timeit.timeit(lambda: (auth.acquire(key_id), auth.release(key_id)), number=n) / n
        await auth.aclose()
        return {"authenticate_us": round(check * 1e6, 2), "acquire_release_us": round(book * 1e6, 2)}

    return asyncio.run(measure())


def http_figures(model: str, uri: str, token: str, duration: float) -> list[dict]:
    from flywheel.serving.config import AuthConfig, ModelConfig, ServerConfig
    from flywheel.serving.ingress import Ingress
    from flywheel.serving.replica import ModelReplica
    from flywheel.serving.router import Route

    body = msgspec.json.encode({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                            "data": [0.5] * 64}]})
    rows = []
    # off, on, on, off: each setting once early and once late, since the
    # order alone moved p50 by ~0.05 ms in single runs here
    for auth_on in (False, True, True, False):
        cfg = ServerConfig(port=free_port(), grpc_port=-1, auth=AuthConfig(enabled=auth_on))
        port = free_port()
        secret = os.urandom(32)
        replica = ModelReplica(ModelConfig(name="demo", version="1", path=model), port, cfg.request_limits(),
                               secret=secret)
        ingress = Ingress(cfg, [Route("demo", "1", port)], keys_uri=uri if auth_on else "", secret=secret)
        auth_header = f"Authorization: Bearer {token}\r\n" if auth_on else ""
        request = (f"POST /v2/models/demo/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth_header}"
                   f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
        try:
            for c in (1, 32):
                r = run_load("127.0.0.1", cfg.port, request, concurrency=c, duration_s=duration).summary()
                rows.append({"auth": "on" if auth_on else "off", **r})
        finally:
            ingress.close()
            replica.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=3.0)
    args = ap.parse_args()
    from flywheel.registry.keys import KeyStore

    work = tempfile.mkdtemp(prefix="fw-bench-auth-")
    uri = f"sqlite:///{work}/registry.db"
    store = KeyStore.open(uri)
    _, token = store.create("bench", ["predict"], actor="bench")
    store.close()
    print("checks alone:", check_cost(uri, token), flush=True)
    model = export_model("mlp", {"in_features": 64, "hidden": [128, 64], "out_features": 10},
                         os.path.join(work, "demo.onnx"))
    print(f"\n{'auth':5} {'conc':>4} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
    for r in http_figures(model, uri, token, args.duration):
        print(f"{r['auth']:5} {r['concurrency']:>4} {r['throughput_rps']:>9.0f} {r['p50_ms']:>8.3f} "
              f"{r['p99_ms']:>8.3f} {r['errors']:>6}", flush=True)


if __name__ == "__main__":
    main()
