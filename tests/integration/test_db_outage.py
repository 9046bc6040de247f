"""The registry's PostgreSQL restarts mid-run (real Ray Serve, real HTTP, API
keys on, a loop, a training scheduler): nothing needs a restart.

One deployment (an endpoint with two variants, its router controller, a loop
controller) on a PostgreSQL of this module's own, a client calling it all
along, and a TrainingRuntime scheduler in this process. Then: key ``early``
is revoked and the server is stopped at once (so the ingress replicas most
likely learn of the revocation only after the restart), it stays down for
OUTAGE_S, starts again, and at once key ``late`` is revoked, a traffic
change is made, a loop pause is queued and a job is submitted. The fixture
then watches for each effect and records how long after the restart it was
first seen; each test checks one consumer:

- key refresh: both revoked keys are refused within the reload interval + 10 s;
- router controller: a management call during the outage is refused (503)
  and changes nothing; a traffic change made after the restart reaches the
  replicas within 10 s;
- loop controller: a pause queued after the restart is applied within 10 s;
- job queue: a job submitted after the restart is claimed within 10 s;
- serving: not one of the client's requests failed, outage included.
"""

from __future__ import annotations

import threading
import time

import msgspec
import numpy as np
import pytest

from flywheel.client import Client, ClientError
from flywheel.common import load_settings
from flywheel.loops.spec import parse_loop
from flywheel.registry import LoopStore
from flywheel.registry.keys import KeyStore
from flywheel.serving import DeployConfig, ModelConfig, ServerConfig
from flywheel.serving.app import deploy, undeploy
from flywheel.serving.config import AuthConfig, EndpointConfig, RegistryConfig
from flywheel.serving.policy_config import FixedPolicy
from flywheel.training import TrainingRuntime

from _poll import wait_for
from _router_models import rows, table_model
from pg import started_or_skip

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]

RELOAD_S = 1.0  # the ingress replicas re-read the keys this often
OUTAGE_S = 3.0  # long enough for every consumer to fail a few times
BACK_S = 10.0  # the bound: each consumer works again within this long of the server's return
LOOP = "keeper"


class Traffic:
    """A client calling the endpoint back to back from a thread, counting
    what answered and keeping what failed (with when)."""

    def __init__(self, url: str, key: str) -> None:
        self._client = Client(url, api_key=key, timeout=30.0)
        self.answered: list[float] = []
        self.failed: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        rng = np.random.default_rng(0)
        while not self._stop.is_set():
            try:
                self._client.infer("m", rows(1, rng))
                self.answered.append(time.time())
            except ClientError as exc:
                self.failed.append((time.time(), f"{exc.status}: {exc.message}"))
            self._stop.wait(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self._client.close()


def _status(client: Client) -> int:
    """The HTTP status of one inference call with ``client``'s key."""
    try:
        client.infer("m", rows(1, np.random.default_rng(1)))
        return 200
    except ClientError as exc:
        return exc.status or 0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    home = tmp_path_factory.mktemp("outage")
    server = started_or_skip()
    w = type("World", (), {})()
    w.server = server
    w.uri = server.new_database()
    keys = KeyStore.open(w.uri)
    w.tokens = {name: keys.create(name, [role], actor="tests") for name, role in
                (("app", "predict"), ("ops", "operate"), ("early", "predict"), ("late", "predict"))}
    keys.close()
    cfg = DeployConfig(
        name="outage",
        models=[ModelConfig(name="m", version=v, path=table_model(home / f"v{v}.onnx", 100, int(v)), num_cpus=0.05)
                for v in ("1", "2")],
        endpoints=[EndpointConfig(name="m", policy=FixedPolicy(weights={"1": 1.0}))],
        loops=[parse_loop({"name": LOOP, "endpoint": "m", "data": {"captured": False}, "tick_s": 0.5,
                           "job": {"name": "keeper-job", "model": {"architecture": "mlp"}}})],
        server=ServerConfig(port=0, grpc_port=-1, auth=AuthConfig(enabled=True, reload_interval_s=RELOAD_S)),
        registry=RegistryConfig(uri=w.uri, artifacts=str(home / "art")),
    )
    settings = msgspec.structs.replace(load_settings(), home=str(home), registry_uri=w.uri,
                                       artifacts_uri=str(home / "art"))
    w.dep = deploy(cfg, settings=settings)
    w.training = TrainingRuntime(settings)
    w.training.start()
    w.clients = {name: Client(w.dep.url, api_key=token) for name, (_, token) in w.tokens.items()}
    w.traffic = Traffic(w.dep.url, w.tokens["app"][1])
    w.loops = LoopStore.open(w.uri)
    try:
        yield w
    finally:
        w.traffic.stop()
        for c in w.clients.values():
            c.close()
        w.training.close(timeout=10)
        undeploy(w.dep)
        w.loops.close()
        server.stop()


@pytest.fixture(scope="module")
def outage(world):
    """Stop the server right after revoking ``early``, keep it down for
    OUTAGE_S, start it again and revoke ``late``; what was seen meanwhile."""
    w = world
    wait_for(lambda: len(w.traffic.answered) >= 20, 30, "the client's first answers")
    wait_for(lambda: w.loops.loops("outage"), 30, "the loop's first tick")
    assert _status(w.clients["early"]) == 200
    assert _status(w.clients["late"]) == 200
    keys = KeyStore.open(w.uri)
    keys.revoke(w.tokens["early"][0].id, actor="tests")
    keys.close()
    w.server.stop_server()
    w.down_at = time.time()
    seen = {"early_status_while_down": _status(w.clients["early"])}
    try:
        w.clients["ops"].set_policy("m", {"kind": "fixed", "weights": {"2": 1.0}})
        seen["manage_while_down"] = (200, "")
    except ClientError as exc:
        seen["manage_while_down"] = (exc.status, exc.message)
    time.sleep(max(0.0, w.down_at + OUTAGE_S - time.time()))  # the outage itself, not a wait for a state
    w.server.start_server()
    w.back_at = time.time()
    keys = KeyStore.open(w.uri)
    keys.revoke(w.tokens["late"][0].id, actor="tests")
    keys.close()
    seen["weights_before_change"] = w.clients["ops"].endpoint("m")["weights"]  # the refused call's effect
    # every consumer's work after the restart, asked for at once, so that
    # each is timed from the restart (not from when its test runs)
    w.clients["ops"].set_policy("m", {"kind": "fixed", "weights": {"2": 1.0}})
    w.loops.add_event("outage", LOOP, "pause_requested", {"actor": "tests"})
    # a job that fails in the driver (its batch is larger than its data), so
    # that no training holds the CPUs the deployment uses
    w.job = w.training.submit({"name": "after-outage", "model": {"architecture": "mlp"}, "batch_size": 1_000_000})
    rng = np.random.default_rng(2)
    effects = {
        "router": lambda: w.clients["app"].infer("m", rows(1, rng)).model_version == "2",
        "key early": lambda: _status(w.clients["early"]) == 401,
        "key late": lambda: _status(w.clients["late"]) == 401,
        "loop": lambda: bool(w.loops.load_state("outage", LOOP).get("paused")),
        "job": lambda: bool(w.job.status().attempts),
    }
    seen["back_after_s"] = {}
    deadline = w.back_at + RELOAD_S + BACK_S + 20  # past every bound: a late effect is measured, not cut off
    while effects and time.time() < deadline:
        for name, done in list(effects.items()):
            if done():
                seen["back_after_s"][name] = time.time() - w.back_at
                del effects[name]
        time.sleep(0.05)
    print(f"\nafter the restart, first seen (s): { {k: round(v, 1) for k, v in seen['back_after_s'].items()} }")
    return seen


def _back_after(outage, name: str, bound_s: float) -> float:
    """How long after the restart ``name``'s effect was first seen; fails
    past ``bound_s`` or when it was never seen."""
    took = outage["back_after_s"].get(name)
    assert took is not None, f"{name}: never took effect ({outage['back_after_s']})"
    assert took <= bound_s, f"{name}: took effect {took:.1f} s after the restart (bound {bound_s} s)"
    return took


def test_a_management_call_during_the_outage_is_refused_and_changes_nothing(world, outage):
    status, message = outage["manage_while_down"]
    assert status == 503, message
    assert "registry database postgresql://" in message
    assert "is unreachable" in message
    assert outage["weights_before_change"] == {"1": 1.0}


def test_the_router_controller_applies_a_traffic_change_made_after_the_restart(world, outage):
    _back_after(outage, "router", BACK_S)
    assert world.clients["ops"].endpoint("m")["weights"] == {"2": 1.0}


@pytest.mark.parametrize("key", ["early", "late"])
def test_a_key_revoked_around_the_outage_stops_working(world, outage, key):
    _back_after(outage, f"key {key}", RELOAD_S + BACK_S)


def test_the_loop_controller_applies_a_command_queued_after_the_restart(world, outage):
    _back_after(outage, "loop", BACK_S)


def test_the_job_queue_claims_a_job_submitted_after_the_restart(world, outage):
    _back_after(outage, "job", BACK_S)
    assert world.job.status().runner == world.training.runner_id
    done = world.job.wait(timeout=60)
    assert done.state == "failed"
    assert "batch_size" in done.error


def test_serving_never_stopped_answering(world, outage):
    during = [t for t in world.traffic.answered if world.down_at <= t <= world.back_at]
    assert world.traffic.failed == []
    assert len(during) > 10, f"only {len(during)} answers while the database was down"
