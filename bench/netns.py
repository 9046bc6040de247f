"""Several "hosts" on this machine: network namespaces on a bridge, each with
one address from the benchmarking range 198.18.0.0/15, and a real Ray
cluster across them (a head in the first, workers in the others). Used by
the multi-node tests and by the cluster benchmark (bench/cluster.py); needs
root and iproute2.

Nothing in a namespace can reach another namespace at 127.0.0.1, so a part
that only works through loopback fails here as it would on real hosts. The
bridge (in this process's namespace) holds 198.18.<n>.254, so tests can call
the hosts; nothing else is routed. Everything made here is removed by
``close()``, and every process started here is stopped by its PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

RAY_PORT = 6379
VENV_BIN = Path(sys.executable).parent


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, no iproute2, a sandbox)."""


def _ip_binary() -> str | None:
    """iproute2's ``ip`` (root's PATH may not hold /usr/sbin)."""
    return shutil.which("ip") or ("/usr/sbin/ip" if os.path.exists("/usr/sbin/ip") else None)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``ip ARGS``; NetnsUnavailable with its words when it fails and ``check``."""
    proc = subprocess.run([_ip_binary() or "ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise NetnsUnavailable(f"{' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


class Hosts:
    """``count`` namespaces on one bridge: host i (1-based) is
    ``198.18.<subnet>.<i>``; this namespace is ``198.18.<subnet>.254``."""

    def __init__(self, count: int = 2, subnet: int | None = None) -> None:
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root")
        if _ip_binary() is None:
            raise NetnsUnavailable("no `ip` command (Debian's iproute2)")
        # a subnet and names of this run's own, so that runs side by side do not meet
        tag = os.getpid() % 200
        self.subnet = subnet if subnet is not None else 1 + tag
        self.tag = f"fw{os.getpid() % 100000}"
        self.bridge = f"{self.tag}br"
        self.names = [f"{self.tag}h{i}" for i in range(1, count + 1)]
        self.addresses = [f"198.18.{self.subnet}.{i}" for i in range(1, count + 1)]
        self.gateway = f"198.18.{self.subnet}.254"
        self._made: list[tuple[str, str]] = []  # ("ns"|"link", name), to remove in reverse
        self._procs: list[subprocess.Popen] = []
        try:
            self._make()
        except BaseException:
            self.close()
            raise

    def _make(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        self._made.append(("link", self.bridge))
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, (ns, addr) in enumerate(zip(self.names, self.addresses), 1):
            _ip("netns", "add", ns)
            self._made.append(("ns", ns))
            outer, inner = f"{self.tag}v{i}", f"{self.tag}p{i}"
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            self._made.append(("link", outer))
            _ip("link", "set", inner, "netns", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", inner, "name", "eth0")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("link", "set", outer, "master", self.bridge)
            _ip("link", "set", outer, "up")

    def popen(self, host: int, argv: list[str], *, env: dict | None = None, log: str | None = None,
              cwd: str | None = None) -> subprocess.Popen:
        """Start ``argv`` in host ``host`` (1-based); stopped by close()."""
        out = open(log, "ab") if log else subprocess.DEVNULL
        try:
            proc = subprocess.Popen([_ip_binary(), "netns", "exec", self.names[host - 1], *argv],
                                    env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)
        finally:
            if log:
                out.close()  # the child holds its own copy
        self._procs.append(proc)
        return proc

    def run(self, host: int, argv: list[str], *, env: dict | None = None, timeout: float = 300,
            cwd: str | None = None) -> subprocess.CompletedProcess:
        """Run ``argv`` in host ``host`` to its end; its output comes back."""
        return subprocess.run([_ip_binary(), "netns", "exec", self.names[host - 1], *argv],
                              env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)

    def stop(self, proc: subprocess.Popen, grace_s: float = 15.0) -> None:
        """Stop ``proc`` and every process it started, by PID: SIGTERM, then
        SIGKILL to whatever is left after ``grace_s``."""
        try:
            family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            family = []
        for p in family:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(family, timeout=grace_s)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        if proc.poll() is None:
            proc.wait(5)

    def kill_all(self, host: int) -> None:
        """SIGKILL every process in host ``host``'s namespace, by PID."""
        for pid in _ip("netns", "pids", self.names[host - 1], check=False).stdout.split():
            try:
                psutil.Process(int(pid)).kill()
            except (psutil.NoSuchProcess, ValueError):
                pass

    def close(self) -> None:
        for proc in reversed(self._procs):
            self.stop(proc)
        self._procs.clear()
        for host in range(1, len(self.names) + 1):  # what outlived its parent (a killed node's workers)
            self.kill_all(host)
        for kind, name in reversed(self._made):
            if kind == "ns":
                _ip("netns", "del", name, check=False)
            else:
                _ip("link", "del", name, check=False)
        self._made.clear()


class RayCluster:
    """A Ray head in host 1 and a worker node in every other host of
    ``hosts``, each with ``cpus`` CPUs; ``address`` is the head's GCS."""

    def __init__(self, hosts: Hosts, cpus: float = 1, env: dict | None = None, timeout_s: float = 120) -> None:
        self.hosts = hosts
        self.address = f"{hosts.addresses[0]}:{RAY_PORT}"
        self.dir = tempfile.mkdtemp(prefix="fw-rc-")
        self.env = {**os.environ, **(env or {}), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        for name in ("RAY_ADDRESS", "RAY_NAMESPACE"):
            self.env.pop(name, None)
        self.cpus = cpus
        self.nodes: list[subprocess.Popen] = []
        self._starts = 0
        for i in range(1, len(hosts.addresses) + 1):
            self.nodes.append(self._start(i))
            if i == 1:
                self._wait(lambda: self._port_open(hosts.addresses[0], RAY_PORT), timeout_s, "the Ray head")
        self._wait(lambda: self.alive_nodes() >= len(hosts.addresses), timeout_s, "every node to join")

    def _start(self, host: int) -> subprocess.Popen:
        """``ray start --block`` of host ``host``'s node (the head for 1)."""
        self._starts += 1
        # a temp dir per node start: the nodes share this machine's file system
        where = (["--head", f"--port={RAY_PORT}", "--include-dashboard=false"] if host == 1
                 else [f"--address={self.address}"])
        return self.hosts.popen(
            host, [str(VENV_BIN / "ray"), "start", *where, f"--node-ip-address={self.hosts.addresses[host - 1]}",
                   f"--temp-dir={self.dir}/n{self._starts}", "--block", "--disable-usage-stats",
                   f"--num-cpus={self.cpus}"],
            env=self.env, log=f"{self.dir}/node{self._starts}.log",
        )

    def kill_node(self, host: int) -> None:
        """Kill worker host ``host`` as a machine that dies: its raylet
        first, then every process left in its namespace (a raylet's workers
        outlive it for seconds), all with SIGKILL, by PID. Returns at once,
        while the cluster is still to notice."""
        if host == 1:
            raise ValueError("host 1 is the head; kill a worker node")
        raylet = next(p for p in psutil.Process(self.nodes[host - 1].pid).children(recursive=True)
                      if p.name() == "raylet")
        raylet.kill()
        self.hosts.kill_all(host)

    def restart_node(self, host: int, timeout_s: float = 120) -> None:
        """Start worker host ``host``'s node again (after kill_node): a new
        node at the same address, as a replaced machine joins; returns once
        the GCS counts a node alive at that address that was not there
        before (the killed one stays counted alive for several seconds)."""
        if host == 1:
            raise ValueError("host 1 is the head; restart a worker node")
        before = set(self.node_ids())
        self.hosts.stop(self.nodes[host - 1])
        self.nodes[host - 1] = self._start(host)
        address = self.hosts.addresses[host - 1]
        self._wait(lambda: any(ip == address and node not in before for node, ip in self.node_ids().items()),
                   timeout_s, f"host {host} to rejoin")

    @staticmethod
    def _port_open(host: str, port: int) -> bool:
        import socket

        with socket.socket() as s:
            s.settimeout(1)
            return s.connect_ex((host, port)) == 0

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            dead = [p.args[-1] for p in self.nodes if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"waiting for {what}: {'a node exited' if dead else 'timed out'}; "
                                   f"logs in {self.dir}")
            time.sleep(0.5)

    def alive_nodes(self) -> int:
        """Alive nodes, as the head's GCS counts them (asked from host 1)."""
        return len(self.node_ids())

    def node_ids(self) -> dict[str, str]:
        """Node id -> address of every node the head's GCS counts alive."""
        out = self.python(1, "import json, ray; ray.init(address=%r, log_to_driver=False); "
                             "print('NODES', json.dumps({n['NodeID']: n['NodeManagerAddress'] for n in ray.nodes() "
                             "if n['Alive']}))" % self.address, timeout=60)
        # Ray may print its own lines (a node marked dead) beside ours
        lines = [line for line in out.splitlines() if line.startswith("NODES ")]
        return json.loads(lines[-1][len("NODES "):]) if lines else {}

    def python(self, host: int, code: str, timeout: float = 300, env: dict | None = None) -> str:
        """Run ``code`` with this venv's Python in host ``host`` (a Ray
        driver there joins with ``ray.init(address=cluster.address)``);
        its standard output. RuntimeError with its output on failure."""
        proc = self.hosts.run(host, [sys.executable, "-c", code], env={**self.env, **(env or {})}, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"host {host}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc.stdout

    def close(self) -> None:
        for proc in reversed(self.nodes):  # workers first, then the head
            # the cluster is thrown away: a short grace, then SIGKILL (a
            # raylet that waits on its workers' exit holds a stop for 15 s)
            self.hosts.stop(proc, grace_s=3.0)
        self.nodes.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
