"""Zero-downtime swaps under load, a swap that fails, and router state that
outlives the loss of a router replica (real Ray Serve, real HTTP)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from flywheel.client import AsyncClient, Client, ClientError
from flywheel.serving import DeployConfig, ModelConfig, ServerConfig
from flywheel.serving.app import deploy, undeploy
from flywheel.serving.config import RegistryConfig

from _poll import wait_for
from _router_models import expected, rows, table_model

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]

CONCURRENCY = 16


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("swap-models")
    bad = d / "broken.onnx"
    bad.write_bytes(b"this is not an ONNX model")
    return {"1": table_model(d / "v1.onnx", 100, 1), "2": table_model(d / "v2.onnx", 100, 2), "broken": str(bad)}


@pytest.fixture(scope="module")
def swapped(models, tmp_path_factory):
    home = tmp_path_factory.mktemp("swap-home")
    cfg = DeployConfig(
        name="swapped",
        models=[ModelConfig(name="m", version="1", path=models["1"], num_cpus=0.05)],
        server=ServerConfig(port=0, grpc_port=-1),
        registry=RegistryConfig(uri=f"sqlite:///{home}/registry.db", artifacts=str(home / "art")),
    )
    dep = deploy(cfg)
    with Client(dep.url) as client:
        yield dep, client
    undeploy(dep)


async def _load(url: str, seconds: float, log: list) -> None:
    """CONCURRENCY closed loops; log (start, end, version or error, x, y)."""
    deadline = time.monotonic() + seconds
    rng = np.random.default_rng(0)

    async def worker(client: AsyncClient) -> None:
        while time.monotonic() < deadline:
            x = rows(1, rng)
            t0 = time.monotonic()
            try:
                r = await client.infer("m", x)
                log.append((t0, time.monotonic(), r.model_version, x, r.output()))
            except ClientError as exc:
                log.append((t0, time.monotonic(), f"error {exc}", x, None))

    clients = [AsyncClient(url) for _ in range(CONCURRENCY)]
    try:
        await asyncio.gather(*(worker(c) for c in clients))
    finally:
        for c in clients:
            await c.close()


def _p99(log, lo: float, hi: float) -> float:
    lat = [end - start for start, end, *_ in log if lo <= start < hi]
    assert len(lat) >= 100, f"only {len(lat)} requests between {lo:.1f} and {hi:.1f}"
    return float(np.percentile(lat, 99))


def test_swap_under_load_drops_nothing(swapped, models):
    dep, client = swapped
    log: list = []
    failed: list = []

    def load() -> None:  # 30 s of load, the swap in the middle
        try:
            asyncio.run(_load(dep.url, 30.0, log))
        except BaseException as exc:  # a load that died must fail the test, not shorten it
            failed.append(exc)

    loader = threading.Thread(target=load)
    t0 = time.monotonic()
    loader.start()
    time.sleep(15.0)  # pacing, not waiting for a state: the swap lands mid-load, after 15 s of steady traffic
    t_swap = time.monotonic()
    assert client.swap("m", {"version": "2", "path": models["2"], "num_cpus": 0.05})["swap"]["phase"] == "loading"
    status = wait_for(lambda: (s := client.endpoint("m"))["swap"]["phase"] in ("done", "failed") and s, 20,
                      "the swap to 2 to end", every_s=0.2)
    t_done = time.monotonic()
    loader.join()
    assert not failed, failed
    assert status["swap"]["phase"] == "done", status["swap"]
    errors = [entry[2] for entry in log if entry[2] not in ("1", "2")]
    assert not errors, errors[:5]
    for version in ("1", "2"):  # every answer is its variant's own (a ready model's)
        answered = [(x, y) for _, _, v, x, y in log if v == version]
        xs, ys = np.concatenate([x for x, _ in answered]), np.concatenate([y for _, y in answered])
        np.testing.assert_allclose(ys, expected(models[version], xs), rtol=1e-6)
    # before the swap only 1 answered; once it was done (and the replica had
    # the snapshot) only 2
    assert {v for start, _, v, *_ in log if start < t_swap} == {"1"}
    assert {v for start, _, v, *_ in log if start > t_done + 1.0} == {"2"}
    steady = _p99(log, t0 + 2.0, t_swap)
    during = _p99(log, t_swap, t_done + 1.0)
    print(f"requests {len(log)}, steady p99 {steady * 1e3:.2f} ms, during the swap {during * 1e3:.2f} ms")
    assert during <= 2 * steady, (steady, during)
    assert "1" not in status["variants"]  # drained and removed


def test_swap_to_a_model_that_fails_to_load_keeps_the_old_one(swapped, models):
    dep, client = swapped
    serving = client.endpoint("m")["weights"]
    (current,) = serving
    client.swap("m", {"version": "9", "path": models["broken"], "num_cpus": 0.05})
    status = wait_for(lambda: (s := client.endpoint("m"))["swap"]["phase"] in ("done", "failed") and s, 30,
                      "the swap to the broken 9 to end", every_s=0.2)
    assert status["swap"]["phase"] == "failed"
    assert status["swap"]["error"], status["swap"]
    assert "9" not in status["variants"]
    assert status["weights"] == {current: 1.0}
    rng = np.random.default_rng(5)
    assert {client.infer("m", rows(1, rng)).model_version for _ in range(10)} == {current}


def _replica(prefix: str) -> str:
    import ray

    (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
               if a["name"].startswith(f"SERVE_REPLICA::{prefix}")]
    return name


def test_router_state_survives_losing_its_replicas(swapped, models):
    import ray

    dep, client = swapped
    client.add_variant("m", {"version": "5", "path": models["1"], "num_cpus": 0.05})
    wait_for(lambda: client.endpoint("m")["variants"]["5"]["status"] == "ready", 30, "variant 5 ready", every_s=0.2)
    (current,) = client.endpoint("m")["weights"]
    client.set_policy("m", {"kind": "fixed", "weights": {current: 0.25, "5": 0.75}})
    for prefix in ("swapped#router#", "swapped#ingress#"):  # the controller, then the ingress
        old = _replica(prefix)
        ray.kill(ray.get_actor(old, namespace="serve"), no_restart=True)
        wait_for(lambda: _alive_other(prefix, old), 90, f"a replica {prefix}* other than {old}", every_s=0.5)

        def routed_by_the_saved_policy() -> dict | None:
            try:
                status = client.endpoint("m")
                return status if status["weights"] == {current: 0.25, "5": 0.75} else None
            except (ClientError, OSError):
                return None  # the ingress is coming back

        status = wait_for(routed_by_the_saved_policy, 90, "weights 0.25/0.75 after the restart", every_s=0.5)
        assert status["variants"]["5"]["status"] == "ready"
    # the new ingress replica loaded the run-time variant before it took traffic
    rng = np.random.default_rng(6)
    answered = {client.infer("m", rows(1, rng)).model_version for _ in range(40)}
    assert answered == {current, "5"}


def _alive_other(prefix: str, old: str) -> bool:
    try:
        return _replica(prefix) != old
    except ValueError:
        return False
