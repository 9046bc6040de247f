"""One load-generator process: locust, headless, driven over stdin/stdout.

    python -m flywheel.bench.harness.worker <plan.msgpack>

Only this module imports locust, which monkey-patches the standard library
with gevent on import; it must never be imported into a process that also
runs Ray or threads of its own (the harness starts it as a subprocess).

Protocol: one JSON object per line. The worker writes ``{"ready": true}``
once, then answers each ``{"cmd": "step", ...}`` with the step's figures and
exits on ``{"cmd": "quit"}`` or end of input. Latencies of successful
requests go into a mergeable histogram (locust's own statistics round to
whole milliseconds, too coarse for a sub-millisecond server); failed ones
are counted by message.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
import urllib.parse
from collections import Counter
from typing import TYPE_CHECKING

import msgspec

from flywheel.bench.harness.histogram import LatencyHistogram

if TYPE_CHECKING:
    from flywheel.bench.harness.payloads import WorkPlan

MAX_ERROR_KINDS = 20


class _Outputs(msgspec.Struct):
    name: str
    shape: list[int]
    parameters: dict = {}


class _Answer(msgspec.Struct):
    outputs: list[_Outputs] = []


_answer_decoder = msgspec.json.Decoder(_Answer)


def _host_port(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


def _shape_error(plan: WorkPlan, got: dict[str, list[int]]) -> str | None:
    for spec in plan.outputs:
        shape = got.get(spec.name)
        if shape is None:
            return f"output {spec.name!r} missing (got {sorted(got)})"
        if spec.shape and (len(shape) != len(spec.shape) or any(
            e >= 0 and e != s for e, s in zip(spec.shape, shape)
        )):
            return f"output {spec.name!r} has shape {shape}, expected {spec.shape}"
    return None


def check_json(plan: WorkPlan, status: int, body: bytes) -> str | None:
    if status != 200:
        return f"HTTP {status}: {body[:160].decode('utf-8', 'replace')}"
    try:
        answer = _answer_decoder.decode(body)
    except msgspec.DecodeError as exc:
        return f"malformed V2 JSON answer: {exc}"
    return _shape_error(plan, {o.name: o.shape for o in answer.outputs})


def check_binary(plan: WorkPlan, status: int, body: bytes, header_length: str | None) -> str | None:
    if status != 200:
        return f"HTTP {status}: {body[:160].decode('utf-8', 'replace')}"
    n = int(header_length) if header_length else len(body)
    try:
        answer = _answer_decoder.decode(body[:n])
    except msgspec.DecodeError as exc:
        return f"malformed V2 binary answer header: {exc}"
    declared = sum(int(o.parameters.get("binary_data_size", 0)) for o in answer.outputs)
    if declared != len(body) - n:
        return f"binary answer declares {declared} bytes of tensor data, carries {len(body) - n}"
    return _shape_error(plan, {o.name: o.shape for o in answer.outputs})


def check_grpc(plan: WorkPlan, response) -> str | None:
    return _shape_error(plan, {o.name: list(o.shape) for o in response.outputs})


def _make_user_class(plan: WorkPlan, per_user_rate: float | None, window: _Window):
    import gevent
    import grpc
    from geventhttpclient import HTTPClient
    from locust import User

    from flywheel.protocol.proto import inference_pb2 as pb

    variants = plan.variants

    host, port = _host_port(plan.http)
    auth = {"Authorization": plan.authorization} if plan.authorization else {}
    json_headers = {"Content-Type": "application/json", **auth}
    grpc_metadata = (("authorization", plan.authorization),) if plan.authorization else None

    class V2User(User):
        # Our own timing around a plain geventhttpclient connection per user:
        # locust's FastHttpSession adds milliseconds per request once there
        # are dozens of users (measured: p50 21 ms at 64 paced users against
        # 2.9 ms with the same client used directly).
        def wait_time(self):
            if not per_user_rate:
                return 0
            # Fixed schedule per user, not locust's constant_throughput:
            # measured here, that bunched 64 paced users into bursts (p50
            # 17.8 ms against 2.5 ms for the same rate evenly spaced).
            self._next_at += 1 / per_user_rate
            return max(0.0, self._next_at - time.perf_counter())

        def on_start(self):
            self._i = int.from_bytes(os.urandom(2), "little")
            self._http_client = HTTPClient(host, port, concurrency=1, connection_timeout=plan.timeout_s,
                                    network_timeout=plan.timeout_s)
            self._grpc = None
            if "grpc" in plan.weights:
                self._channel = grpc.insecure_channel(plan.grpc)
                self._grpc = self._channel.unary_unary(plan.grpc_method)
            if per_user_rate:
                # Users start together; without a random phase their paced
                # requests would arrive in bursts of `users` at a time.
                gevent.sleep(random.uniform(0, 1 / per_user_rate))
            self._next_at = time.perf_counter()
            window.schedules.append(self._next_at)

        def on_stop(self):
            self._http_client.close()
            if self._grpc is not None:
                self._channel.close()

        def _next(self):
            if window.recording:
                # The request bound: no user sends past it, so the step ends
                # with exactly max_requests answered.
                if window.sent >= window.max_requests:
                    gevent.sleep(0.05)
                    return None
                window.sent += 1
            self._i += 1
            return variants[self._i % len(variants)]

        def _fire(self, name, start, size, err):
            self.environment.events.request.fire(
                request_type=name, name=name, response_time=(time.perf_counter() - start) * 1e3,
                response_length=size, exception=None if err is None else RuntimeError(err), context={},
            )

        def _http(self, name, body, headers, check):
            start = time.perf_counter()
            size, err = 0, None
            try:
                r = self._http_client.post(plan.infer_path, body=body, headers=headers)
                content = r.read()
                size = len(content)
                err = check(r, content)
            except Exception as exc:  # any client-side failure is a counted error
                err = f"connection: {type(exc).__name__}: {exc}"
            self._fire(name, start, size, err)

        def http_json(self):
            if (b := self._next()) is not None:
                self._http("http_json", b.json, json_headers,
                           lambda r, content: check_json(plan, r.status_code, content))

        def http_binary(self):
            if (b := self._next()) is not None:
                headers = {"Content-Type": "application/octet-stream",
                           "Inference-Header-Content-Length": str(b.binary_header_length), **auth}
                self._http("http_binary", b.binary, headers, lambda r, content: check_binary(
                    plan, r.status_code, content, r.get("Inference-Header-Content-Length")))

        def grpc_infer(self):
            if (b := self._next()) is None:
                return
            start = time.perf_counter()
            size, err = 0, None
            try:
                raw = self._grpc(b.grpc, timeout=plan.timeout_s, metadata=grpc_metadata)
                size = len(raw)
                err = check_grpc(plan, pb.ModelInferResponse.FromString(raw))
            except grpc.RpcError as e:
                err = f"gRPC {e.code().name}: {e.details()}"
            self._fire("grpc", start, size, err)

    by_name = {"http_json": V2User.http_json, "http_binary": V2User.http_binary, "grpc": V2User.grpc_infer}
    V2User.tasks = [by_name[p] for p, w in plan.weights.items() for _ in range(_integer_weight(w, plan.weights))]
    return V2User


def _integer_weight(w: float, weights: dict[str, float]) -> int:
    # locust picks tasks uniformly from a list; repeat each by its share (1/100 resolution)
    total = sum(weights.values())
    return max(1, round(100 * w / total))


class _Window:
    """Figures of one step's measured window (warm-up excluded)."""

    def __init__(self, max_requests: int) -> None:
        self.recording = False
        self.max_requests = max_requests
        self.hist = LatencyHistogram()
        self.protocols: dict[str, dict] = {}
        self.errors: Counter[str] = Counter()
        self.sent = 0
        self.done = 0
        self.schedules: list[float] = []  # first due time of each paced user
        self.t0 = self.cpu0 = 0.0
        self.host0 = (0.0, 0.0)

    def begin(self) -> None:
        self.t0, self.cpu0, self.host0 = time.perf_counter(), time.process_time(), host_busy_times()
        self.recording = True

    def on_request(self, request_type, name, response_time, response_length, exception=None, **_kw):
        if not self.recording:
            return
        self.done += 1
        per = self.protocols.get(name)
        if per is None:
            per = self.protocols[name] = {"ok": 0, "errors": 0, "hist": LatencyHistogram()}
        if exception is None:
            seconds = response_time / 1e3
            self.hist.record(seconds)
            per["hist"].record(seconds)
            per["ok"] += 1
        else:
            per["errors"] += 1
            msg = f"{name}: {exception}"[:200]
            if msg in self.errors or len(self.errors) < MAX_ERROR_KINDS:
                self.errors[msg] += 1
            else:
                self.errors["(other errors)"] += 1


def host_busy_times() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole host so far (all cores)."""
    import psutil

    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    return sum(t) - idle, sum(t)


def _due_in_window(firsts: list[float], rate: float, t0: float, t1: float) -> int:
    """Requests the paced users were due to send in [t0, t1): what the
    offered rate meant in this window, whatever the window's edges cut."""
    period = 1 / rate
    return sum(
        max(0, math.ceil((t1 - f) / period) - max(0, math.ceil((t0 - f) / period))) for f in firsts
    )


def run_step(plan: WorkPlan, cmd: dict) -> dict:
    import gevent
    from locust.env import Environment

    users = int(cmd["users"])
    rate = cmd.get("rate")
    per_user = (rate / users) if rate else None
    window = _Window(int(cmd["max_requests"]))
    env = Environment(user_classes=[_make_user_class(plan, per_user, window)], host=plan.http)
    env.events.request.add_listener(window.on_request)
    runner = env.create_local_runner()
    warmup = float(cmd["warmup_s"])
    if warmup <= 0:
        window.begin()  # before any user runs: every request is counted
    runner.start(users, spawn_rate=max(1000, users * 100))
    if warmup > 0:
        gevent.sleep(warmup)
        window.begin()
    deadline = window.t0 + float(cmd["duration_s"])
    while (now := time.perf_counter()) < deadline and window.done < window.max_requests:
        gevent.sleep(min(0.02, deadline - now))
    window.recording = False
    elapsed = time.perf_counter() - window.t0
    cpu = time.process_time() - window.cpu0
    host0, host1 = window.host0, host_busy_times()
    scheduled = _due_in_window(window.schedules, per_user, window.t0, window.t0 + elapsed) if per_user else None
    runner.quit()
    busy = (host1[0] - host0[0]) / max(host1[1] - host0[1], 1e-9)
    return {
        "users": users,
        "rate": rate,
        "elapsed_s": elapsed,
        "scheduled": scheduled,
        "cpu_s": cpu,
        "host_busy": busy,
        "hist": window.hist.to_dict(),
        "protocols": {
            k: {"ok": v["ok"], "errors": v["errors"], "hist": v["hist"].to_dict()}
            for k, v in window.protocols.items()
        },
        "errors": dict(window.errors),
    }


def main(argv: list[str]) -> int:
    # gevent first, before anything imports socket or ssl (locust would
    # patch on import too, but later than our own imports).
    from gevent import monkey

    monkey.patch_all()
    from flywheel.bench.harness.payloads import WorkPlan

    with open(argv[0], "rb") as f:
        plan = msgspec.msgpack.decode(f.read(), type=WorkPlan)
    # Replies go to the original stdout; anything else that prints (locust,
    # gevent, grpc) goes to stderr so it cannot corrupt the protocol.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    if "grpc" in plan.weights:
        import grpc.experimental.gevent as grpc_gevent

        grpc_gevent.init_gevent()
    import locust  # noqa: F401  (patches the standard library with gevent)

    out.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("cmd") == "quit":
            break
        try:
            reply = run_step(plan, cmd)
        except Exception as exc:  # reported to the parent, which fails the run
            reply = {"failed": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(reply) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
