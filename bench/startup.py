"""Start-up: `flywheel serve` on the demo config to ready, beside a bare Ray Serve app.

    python -m flywheel.bench.startup [--rounds 2] [--out bench/results]

Both start from a fresh process, so each pays for Python's imports, Ray's
start and Serve's controller; each is timed from the process's launch to the
first 200 from its HTTP endpoint, on 127.0.0.1 only.

- flywheel: ``flywheel serve --config demo`` (the preset ``make run`` serves:
  two ingress replicas, the digits model colocated from the registry, drift
  monitoring, gRPC through HAProxy) against a registry of its own in a
  temporary FLYWHEEL_HOME, ready when ``/v2/health/ready`` answers 200. Its
  own phase timings (start Ray, per-step deploy) are read from its output.
- bare Ray Serve: ``ray.init`` + one ``@serve.deployment`` (two replicas,
  0.5 CPU each, like the demo's ingress) that opens the same ONNX file in
  ONNX Runtime, run by ``serve.run`` with Serve's HTTP proxy; ready when a
  request through the proxy answers 200.

They run in A B B A order (``--rounds`` blocks), and the report gives each
start, the medians, the median of the paired ratios (issue 26's target:
flywheel <= 1.2x bare) and where flywheel's seconds went.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

from flywheel.bench.common import free_port
from flywheel.bench.interleave import RatioStats, abba_names
from flywheel.bench.peer_process import answers

READY_TIMEOUT_S = 240.0

BARE = r'''
import sys, time
t0 = float(sys.argv[1])
import numpy as np
import ray
from ray import serve

ray.init(include_dashboard=False, log_to_driver=False)
serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[3])})


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0.5})
class Model:
    def __init__(self, path):
        import onnxruntime as ort
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.name = self.session.get_inputs()[0].name

    async def __call__(self, request):
        x = np.zeros((1, 64), dtype=np.float32)
        return {"argmax": int(self.session.run(None, {self.name: x})[0].argmax())}


serve.run(Model.bind(sys.argv[2]), route_prefix="/")
print("deployed", time.time() - t0, flush=True)
import signal, threading
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: done.set())
done.wait()
serve.shutdown()
ray.shutdown()
'''


def _timed_start(cmd: list[str], env: dict, url: str, log: str, then: str | None = None) -> tuple[float, str]:
    """Seconds from launching ``cmd`` to the first 200 from ``url``, and
    what the process printed (until ``then`` appears in it, when given).
    The process is stopped after: SIGTERM, which both systems answer by
    shutting Serve and Ray down; SIGKILL to its group only if it hangs."""
    out = open(log, "w")
    started = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while not answers(url):
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(cmd[:3])} exited ({proc.returncode}) before it answered; see {log}")
            if time.time() - started > READY_TIMEOUT_S:
                raise RuntimeError(f"{' '.join(cmd[:3])} did not answer {url} in {READY_TIMEOUT_S:.0f}s; see {log}")
            time.sleep(0.05)
        took = time.time() - started
        deadline = time.time() + 60
        while then is not None and time.time() < deadline and then not in _read(log):
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this script started for it
            proc.wait(30)
        out.close()
    return took, _read(log)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _phases(output: str) -> dict[str, float]:
    """flywheel's own phase lines, after 'where the time went:'."""
    found = {}
    for line in output.partition("where the time went:")[2].splitlines():
        m = re.match(r"^\s{2,}(.+?)\s{2,}([0-9.]+)\s*s\s*$", line)
        if m:
            found[m.group(1).strip()] = float(m.group(2))
    return found


def _registry_home(work: str) -> tuple[str, str]:
    """A FLYWHEEL_HOME whose registry holds digits@production, and that
    version's ONNX file (for the bare app)."""
    from flywheel.registry import Registry
    from flywheel.training.digits import register_digits, train_digits

    home = os.path.join(work, "home")
    reg = Registry.open(f"sqlite://{home}/registry.db", os.path.join(home, "artifacts"))  # the defaults for that home
    try:
        result = train_digits(os.path.join(work, "digits"), epochs=2)
        mv = register_digits(reg, result, actor="bench", epochs=2)
        reg.promote("digits", mv.version, "staging", actor="bench")
        reg.promote("digits", mv.version, "production", actor="bench")
        onnx = reg.artifact_path(f"digits/{mv.version}", "model.onnx")[1]
    finally:
        reg.close()
    return home, onnx


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="A B B A blocks")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="fw-startup-")
    print("training and registering the digits model for the demo config ...", flush=True)
    home, onnx = _registry_home(work)
    env = os.environ.copy()  # for the processes started here: a Ray and a registry of their own
    for name in ("RAY_ADDRESS", "FLYWHEEL_REGISTRY_URI", "FLYWHEEL_ARTIFACTS_URI"):
        env.pop(name, None)
    env.update({"FLYWHEEL_HOME": home, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"})
    flywheel = [os.path.join(os.path.dirname(sys.executable), "flywheel"), "serve", "--config", "demo"]
    bare_script = os.path.join(work, "bare_serve.py")
    with open(bare_script, "w") as f:
        f.write(BARE)
    runs: list[dict] = []
    for i, name in enumerate(abba_names("bare", "flywheel", args.rounds)):
        port = free_port()
        log = os.path.join(work, f"{i:02d}-{name}.log")
        if name == "flywheel":
            cmd = flywheel + ["--port", str(port), "--grpc-port", str(free_port())]
            took, output = _timed_start(cmd, env, f"http://127.0.0.1:{port}/v2/health/ready", log,
                                        then="  total ")
        else:
            cmd = [sys.executable, bare_script, repr(time.time()), onnx, str(port)]
            took, output = _timed_start(cmd, env, f"http://127.0.0.1:{port}/", log)
        runs.append({"system": name, "seconds": took, "phases": _phases(output) if name == "flywheel" else {}})
        print(f"  {name:<9} ready in {took:5.1f} s", flush=True)
    bare = [r["seconds"] for r in runs if r["system"] == "bare"]
    fly = [r["seconds"] for r in runs if r["system"] == "flywheel"]
    ratio = RatioStats.of([f / b for b, f in zip(bare, fly)])  # ABBA: the i-th of each are neighbours
    print(f"\nbare Ray Serve app: median {sorted(bare)[len(bare) // 2]:.1f} s; flywheel serve (demo): "
          f"median {sorted(fly)[len(fly) // 2]:.1f} s")
    print(f"flywheel / bare: {ratio.median:.2f} (pairs {ratio.low:.2f}-{ratio.high:.2f}; target <= 1.2)")
    phases = [r["phases"] for r in runs if r["system"] == "flywheel" and r["phases"]]
    if phases:
        print("where flywheel's seconds went (median over its starts):")
        for key in phases[0]:
            values = sorted(p.get(key, 0.0) for p in phases)
            print(f"  {key:<52} {values[len(values) // 2]:5.1f} s")
    with open(os.path.join(args.out, "startup.json"), "w") as f:
        json.dump({"runs": runs, "ratio": {"median": ratio.median, "low": ratio.low, "high": ratio.high}}, f,
                  indent=1)
    print(f"wrote {args.out}/startup.json (logs under {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
