"""The soak's faults: kill a process by its PID, move an endpoint's traffic,
churn the API keys; and watch each until the deployment is whole again.

Runs on the soak's main thread while the load runs on its own
(bench/_soak_load.py). A kill returns at once; a watcher thread then waits for
Serve's replacement, so that the next fault is not delayed. A canary or a
swap blocks until it has ended (the next management step needs it done).
"""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from flywheel.bench import _soak_procs as procs
from flywheel.bench._soak_load import KeyRing, key_id
from flywheel.bench._soak_plan import Planned
from flywheel.bench._soak_report import Fault
from flywheel.client import Client, ClientError

RECOVERY_LIMIT_S = 120.0
# A kill waits up to this long for a request of the load to be in flight on
# its path: at a rate well below capacity a request lasts ~2 ms, so a kill at
# a random instant would almost never test what happens to one in flight.
STRIKE_WAIT_S = 3.0
KEY_HOLD_S = 5.0  # the revoked key stays in the churned share this long (refusals expected)
CANARY = {"variant": "2", "steps": [50, 100], "hold_s": 4.0,
          # p99 on 2 busy shared cores is noise: the canary is judged on errors
          "gates": {"max_p99_ratio": None, "min_requests": 10}}


@dataclass
class Target:
    """What the faults act on: the deployment and the names in it."""

    app: str
    url: str
    grpc_target: str
    admin_token: str
    keys_uri: str
    dedicated: str  # the dedicated model's Serve deployment
    dedicated_replicas: int
    ingress_replicas: int
    swap_model: dict  # the model config the swap moves the endpoint to
    endpoint: str = "ep"
    drift_model: str = "colo"


@dataclass
class FaultRunner:
    """Does the planned faults (``run``) and records them: ``faults`` (as
    dicts until ``result``), ``revocations``, ``not_done`` and a time-stamped
    ``log``. Its watcher threads only write their own fault's ``recovered``."""

    target: Target
    keys: KeyRing
    t0: float
    seed: int
    in_flight: Counter  # the load's requests awaiting answers, by transport and by model
    faults: list[dict] = field(default_factory=list)
    revocations: list[dict] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    not_done: list[tuple[str, str]] = field(default_factory=list)  # (kind, why)
    _watchers: list[threading.Thread] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def say(self, text: str) -> None:
        line = f"[{self.now():7.1f}s] {text}"
        self.log.append(line)
        print(line, flush=True)

    def run(self, plan: list[Planned]) -> None:
        """Do each planned fault at its time (later, if the one before it
        ran long: the time it really happened is recorded)."""
        actions: dict[str, Callable[[], None]] = {
            "kill dedicated replica": self.kill_dedicated, "kill router controller": self.kill_router,
            "kill drift monitor": self.kill_drift, "kill gRPC front": self.kill_front,
            "canary": self.canary, "swap": self.swap, "key churn": self.key_churn,
        }
        for p in plan:
            wait = p.at - self.now()
            if wait > 0:
                time.sleep(wait)
            try:
                actions[p.kind]()
            except Exception as exc:  # a fault that could not be done is reported, the soak goes on
                self.say(f"{p.kind}: could not be done: {exc!r}")
                self.not_done.append((p.kind, repr(exc)[:300]))

    def join(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for w in self._watchers:
            w.join(max(0.0, deadline - time.monotonic()))

    def result(self) -> list[Fault]:
        return [Fault(f["kind"], f["at"], tuple(f.get("transports", ())), tuple(f.get("models", ())),
                      f.get("target", ""), f.get("recovered"), f.get("detail", ""), f.get("load_path", True))
                for f in sorted(self.faults, key=lambda f: f["at"])]

    # -- kills -------------------------------------------------------------------
    def _pick(self, deployment: str) -> tuple[str, int]:
        reps = procs.replicas(self.target.app, deployment)
        if not reps:
            raise RuntimeError(f"no replica of {deployment!r} to kill")
        names = sorted(reps)
        name = names[(self.seed + len(self.faults)) % len(names)]
        return name, procs.replica_pid(reps[name])

    def _strike(self, path: str | None) -> str:
        """Wait (up to STRIKE_WAIT_S) until a request on ``path`` (a
        transport or model name) is in flight; say how many were."""
        if path is None:
            return ""
        deadline = time.monotonic() + STRIKE_WAIT_S
        while self.in_flight[path] <= 0 and time.monotonic() < deadline:
            time.sleep(0.0002)
        return f"struck with {max(0, self.in_flight[path])} {path} request(s) in flight"

    def _kill_replica(self, kind: str, deployment: str, count: int, also: Callable[[], bool] | None = None,
                      path: str | None = None, **fields) -> None:
        """SIGKILL one replica of ``deployment`` (once a request is in
        flight on ``path``); recovered when Serve runs ``count`` replicas
        again without it (and ``also()`` holds)."""
        name, pid = self._pick(deployment)
        struck = self._strike(path)
        os.kill(pid, signal.SIGKILL)
        f = {"kind": kind, "at": self.now(), "target": f"{deployment} pid {pid}", "detail": struck, **fields}
        self.faults.append(f)
        self.say(f"{kind}: SIGKILL to pid {pid} ({name})")
        self._watch(f, lambda: self._replaced(deployment, name, count), also)

    def _replaced(self, deployment: str, old: str, count: int) -> bool:
        names = procs.replicas(self.target.app, deployment)
        return old not in names and len(names) >= count and procs.running(self.target.app, deployment) >= count

    def _watch(self, f: dict, whole: Callable[[], bool], also: Callable[[], bool] | None = None) -> None:
        """Record in ``f["recovered"]`` when ``whole()`` (and ``also()``) first hold."""
        def body() -> None:
            deadline = time.monotonic() + RECOVERY_LIMIT_S
            pending = [c for c in (whole, also) if c is not None]
            while pending and time.monotonic() < deadline:
                try:
                    pending = [c for c in pending if not c()]
                except Exception:  # Serve or Ray answering slowly mid-restart: ask again
                    pass
                if pending:
                    time.sleep(0.2)
            if not pending:
                f["recovered"] = self.now() - f["at"]
                self.say(f"{f['kind']}: whole again after {f['recovered']:.1f} s")
            else:
                self.say(f"{f['kind']}: NOT whole again within {RECOVERY_LIMIT_S:.0f} s")

        w = threading.Thread(target=body, name=f"soak-watch-{f['kind']}", daemon=True)
        self._watchers.append(w)
        w.start()

    def kill_dedicated(self) -> None:
        t = self.target
        model = t.dedicated.rsplit("-", 1)[0]
        self._kill_replica("kill dedicated replica", t.dedicated, t.dedicated_replicas, path=model, models=(model,))

    def kill_router(self) -> None:
        t = self.target
        self._kill_replica("kill router controller", procs.ROUTER, 1, load_path=False,
                           detail="(on no request's path; recovered: endpoint management answers again)",
                           also=lambda: self._answers(lambda c: c.endpoint(t.endpoint)))

    def kill_drift(self) -> None:
        t = self.target
        self._kill_replica("kill drift monitor", procs.DRIFT, 1, load_path=False,
                           detail="(on no request's path; recovered: drift history answers again)",
                           also=lambda: self._drift_history_answers())

    def _answers(self, call: Callable[[Client], object]) -> bool:
        with Client(self.target.url, api_key=self.target.admin_token, timeout=5) as c:
            try:
                call(c)
                return True
            except ClientError:
                return False

    def _drift_history_answers(self) -> bool:
        """GET /v2/models/<model>/drift is 200 (503 while no monitor answers);
        the client has no method for it."""
        t = self.target
        req = urllib.request.Request(f"{t.url}/v2/models/{t.drift_model}/drift",
                                     headers={"Authorization": f"Bearer {t.admin_token}"})
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status == 200
        except OSError:  # HTTPError included
            return False

    def kill_front(self) -> None:
        """SIGKILL the gRPC front that holds the most client connections (the
        load's channels: killing an idle one would test nothing); the seed
        breaks ties."""
        t = self.target
        port = int(t.grpc_target.rsplit(":", 1)[1])
        fronts = []
        for name, handle in sorted(procs.replicas(t.app, procs.INGRESS).items()):
            ingress = procs.replica_pid(handle)
            for pid in procs.front_pids(ingress):
                fronts.append((procs.tcp_sockets(pid, procs.ESTABLISHED, port), name, ingress, pid))
        if not fronts:
            raise RuntimeError("no ingress replica with a gRPC front (grpc_server grpcio?)")
        busiest = max(c for c, *_ in fronts)
        tied = [f for f in fronts if f[0] == busiest]
        conns, name, ingress, pid = tied[self.seed % len(tied)]
        struck = self._strike("grpc")
        os.kill(pid, signal.SIGKILL)
        f = {"kind": "kill gRPC front", "at": self.now(), "transports": ("grpc",), "detail": struck,
             "target": f"HAProxy pid {pid} of ingress pid {ingress}, {conns} client connection(s)"}
        self.faults.append(f)
        self.say(f"kill gRPC front: SIGKILL to HAProxy pid {pid} ({conns} client connections) of "
                 f"ingress pid {ingress} ({name})")
        # the replica's health check fails without its front: Serve replaces it
        self._watch(f, lambda: self._replaced(procs.INGRESS, name, t.ingress_replicas))

    # -- traffic moves -----------------------------------------------------------
    def _manage(self, what: str, call: Callable[[Client], dict], limit_s: float = 60.0) -> dict:
        """A management call, asked again while the controller is unavailable
        (it may be restarting after its own kill)."""
        deadline = time.monotonic() + limit_s
        with Client(self.target.url, api_key=self.target.admin_token, timeout=30) as c:
            while True:
                try:
                    return call(c)
                except ClientError as exc:
                    if exc.status not in (None, 503) or time.monotonic() > deadline:
                        raise
                    self.say(f"{what}: {exc} (asked again)")
                    time.sleep(1.0)

    def _until(self, what: str, done: Callable[[dict], bool], limit_s: float = 90.0) -> dict:
        deadline = time.monotonic() + limit_s
        while True:
            status = self._manage(what, lambda c: c.endpoint(self.target.endpoint))
            if done(status) or time.monotonic() > deadline:
                return status
            time.sleep(0.5)

    def canary(self) -> None:
        ep = self.target.endpoint
        at = self.now()
        self._manage("canary", lambda c: c.start_canary(ep, CANARY))
        self.say(f"canary: {CANARY['variant']} on {ep}, steps {CANARY['steps']}, hold {CANARY['hold_s']} s")
        status = self._until("canary", lambda s: (s.get("canary") or {}).get("status") != "running")
        outcome = (status.get("canary") or {}).get("status", "?")
        self.faults.append({"kind": "canary", "at": at, "recovered": self.now() - at, "models": (ep,),
                            "target": f"{ep} {CANARY['variant']}", "detail": outcome, "load_path": False})
        self.say(f"canary: {outcome} after {self.now() - at:.1f} s; weights {status.get('weights')}")

    def swap(self) -> None:
        ep, model = self.target.endpoint, self.target.swap_model
        at = self.now()
        self._manage("swap", lambda c: c.swap(ep, model))
        self.say(f"swap: {ep} -> {model['version']}")
        status = self._until("swap", lambda s: (s.get("swap") or {}).get("phase") in ("done", "failed"))
        phase = (status.get("swap") or {}).get("phase", "?")
        self.faults.append({"kind": "swap", "at": at, "recovered": self.now() - at, "models": (ep,),
                            "target": f"{ep} -> {model['version']}", "detail": phase, "load_path": False})
        self.say(f"swap: {phase} after {self.now() - at:.1f} s; variants {sorted(status.get('variants', {}))}")

    def key_churn(self) -> None:
        """Create a key, revoke the churned share's key, and move that share
        to the new key KEY_HOLD_S later (its refusals meanwhile are expected)."""
        from flywheel.registry.keys import KeyStore

        store = KeyStore.open(self.target.keys_uri)
        try:
            n = len(self.revocations) + 1
            _, token = store.create(f"soak-churn-{n}", ["predict"], actor="soak")
            old = key_id(self.keys.churn)
            store.revoke(old, actor="soak")
        finally:
            store.close()
        at = self.now()
        self.revocations.append({"key": old, "at": at, "new_key": key_id(token)})
        self.faults.append({"kind": "key churn", "at": at, "load_path": False,
                            "target": f"revoked {old}, created {key_id(token)}"})
        self.say(f"key churn: revoked {old}, created {key_id(token)} (used from +{KEY_HOLD_S:.0f} s)")

        def switch() -> None:
            self.keys.churn = token

        timer = threading.Timer(KEY_HOLD_S, switch)
        timer.daemon = True
        self._watchers.append(timer)
        timer.start()
