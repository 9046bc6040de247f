"""Flywheel's processes in a running deployment, found through Ray Serve.

Every replica is a Serve actor named ``SERVE_REPLICA::<app>#<deployment>#<id>``;
its PID is asked of the actor itself. A gRPC front is the HAProxy child of an
ingress replica (serving/_private/grpc_front.py starts it from the replica's
loop thread). Nothing is found by matching process names. Needs Ray
initialised in this process.
"""

from __future__ import annotations

import os
import threading
import time

from flywheel.bench._soak_report import rss_kib, settled

# roles by Serve deployment name (a dedicated model's deployment is <model>-<version>)
INGRESS, ROUTER, DRIFT = "ingress", "router", "drift"
FRONT = "gRPC front"


def replicas(app: str, deployment: str) -> dict[str, object]:
    """Replica actor name -> actor handle, for one deployment of ``app``."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["name"].startswith(prefix))
    out = {}
    for name in names:
        try:
            out[name] = ray.get_actor(name, namespace="serve")
        except ValueError:  # gone between the listing and the lookup
            pass
    return out


def replica_pid(handle, timeout_s: float = 10.0) -> int:
    """The PID of a replica's process, asked of the actor."""
    import ray

    return ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=timeout_s)


def running(app: str, deployment: str) -> int:
    """Replicas Serve counts as RUNNING for ``deployment``."""
    from ray import serve

    app_status = serve.status().applications.get(app)
    if app_status is None or deployment not in app_status.deployments:
        return 0
    return app_status.deployments[deployment].replica_states.get("RUNNING", 0)


def children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (from /proc/<pid>/task/*/children)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(p) for p in f.read().split()]
        except OSError:
            pass
    return sorted(set(out))


def front_pids(ingress_pid: int) -> list[int]:
    """The gRPC fronts of an ingress replica: its child processes that
    listen on a TCP socket (HAProxy binds the public gRPC port; the other
    children Ray or ONNX Runtime may start do not listen)."""
    return [c for c in children(ingress_pid) if tcp_sockets(c, LISTEN)]


LISTEN, ESTABLISHED = "0A", "01"


def tcp_sockets(pid: int, state: str, port: int | None = None) -> int:
    """How many TCP sockets ``pid`` holds in ``state`` (a /proc/net/tcp
    state code), on local ``port`` if given; 0 when it is gone."""
    try:
        inodes = set(_fd_links(pid))
        rows = []
        for family in ("tcp", "tcp6"):
            with open(f"/proc/{pid}/net/{family}") as f:
                rows += f.read().splitlines()[1:]
    except OSError:
        return 0
    return sum(1 for cols in (r.split() for r in rows)
               if cols[3] == state and f"socket:[{cols[9]}]" in inodes
               and (port is None or int(cols[1].rsplit(":", 1)[1], 16) == port))


def _fd_links(pid: int) -> list[str]:
    """What each open descriptor of ``pid`` points at (``socket:[inode]``,
    ``pipe:[inode]``, a path; two descriptors may point at one thing); a
    descriptor closed between the listing and its reading is left out."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            pass
    return out


def live_sockets(pid: int, links: list[str] | None = None) -> int:
    """Sockets of ``pid`` that carry or await traffic: TCP listening or
    established, Unix listening or connected. Connections move between
    processes when a kill sends the load's clients elsewhere, so they are
    counted apart from the descriptors that only a leak makes grow (files,
    pipes, sockets left half-closed)."""
    try:
        inodes = set(links if links is not None else _fd_links(pid))
        live = 0
        for family in ("tcp", "tcp6"):
            with open(f"/proc/{pid}/net/{family}") as f:
                live += sum(1 for cols in (r.split() for r in f.read().splitlines()[1:])
                            if cols[3] in (LISTEN, ESTABLISHED) and f"socket:[{cols[9]}]" in inodes)
        with open(f"/proc/{pid}/net/unix") as f:
            # columns: Num RefCount Protocol Flags Type St Inode [Path]; St 03 = connected,
            # Flags 00010000 = listening
            live += sum(1 for cols in (r.split() for r in f.read().splitlines()[1:])
                        if len(cols) >= 7 and (cols[5] == "03" or cols[3] == "00010000")
                        and f"socket:[{cols[6]}]" in inodes)
    except OSError:
        return 0
    return live


def sample(pid: int) -> dict | None:
    """RSS (KiB), open descriptors, how many of those are live sockets (see
    live_sockets) and how many are not, of ``pid`` now; None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = rss_kib(f.read())
        links = _fd_links(pid)
    except OSError:
        return None
    live = live_sockets(pid, links)
    return {"pid": pid, "rss_kib": rss, "fds": len(links), "sockets": live, "other_fds": len(links) - live}


def flywheel_pids(app: str, deployments: list[str]) -> list[tuple[str, int]]:
    """(role, pid) of every process of the deployment: each replica of
    ``deployments`` and each ingress replica's gRPC front."""
    out = []
    for dep in deployments:
        for handle in replicas(app, dep).values():
            try:
                pid = replica_pid(handle)
            except Exception:  # a replica being replaced: it is not there to measure
                continue
            out.append((dep, pid))
            if dep == INGRESS:
                out += [(FRONT, c) for c in front_pids(pid)]
    return out


def snapshot(app: str, deployments: list[str], rounds: int = 3, every_s: float = 2.5) -> list[dict]:
    """RSS and open files of every Flywheel process of the deployment, each
    the least of ``rounds`` samples ``every_s`` apart (see settled)."""
    pids = flywheel_pids(app, deployments)
    taken = []
    for i in range(rounds):
        if i:
            time.sleep(every_s)
        taken.append([{"role": role, **s} for role, pid in pids if (s := sample(pid)) is not None])
    return settled(taken)


class Sampler:
    """Samples every Flywheel process every ``every_s`` on a thread of its
    own, for the RSS trend of each (``points``: dicts of ``t`` (seconds
    since ``t0``), role, pid, rss_kib, fds, sockets, other_fds)."""

    def __init__(self, app: str, deployments: list[str], t0: float, every_s: float = 10.0) -> None:
        self._app, self._deployments, self._t0, self._every = app, deployments, t0, every_s
        self.points: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30.0)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            try:
                pids = flywheel_pids(self._app, self._deployments)
            except Exception:  # Ray busy mid-restart: the next tick will do
                continue
            t = time.monotonic() - self._t0
            self.points += [{"t": round(t, 1), "role": role, **s} for role, pid in pids
                            if (s := sample(pid)) is not None]
