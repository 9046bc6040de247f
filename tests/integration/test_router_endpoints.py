"""The multi-model router on real Ray Serve: A/B with sticky keys, bandits fed
by feedback, shadow traffic, canaries that roll back or promote, and which
variant answered, over real HTTP and gRPC with flywheel.client.
(variants: see _router_models.py).
"""

from __future__ import annotations

import time

import msgspec
import numpy as np
import pytest

from flywheel.client import Client, ClientError, GrpcClient
from flywheel.serving import DeployConfig, ModelConfig, ServerConfig
from flywheel.serving.app import deploy, undeploy
from flywheel.serving.config import EndpointConfig, RegistryConfig
from flywheel.serving.policy_config import FixedPolicy

from _poll import wait_for
from _router_models import expected, rows, table_model

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    d = tmp_path_factory.mktemp("variants")
    return {
        "1": table_model(d / "v1.onnx", 100, 1),
        "2": table_model(d / "v2.onnx", 100, 2),
        "faulty": table_model(d / "faulty.onnx", 10, 3),
        "4": table_model(d / "v4.onnx", 100, 4),
    }


@pytest.fixture(scope="module")
def ab(variants, tmp_path_factory):
    home = tmp_path_factory.mktemp("router-home")
    cfg = DeployConfig(
        name="routed",
        models=[
            ModelConfig(name="m", version="1", path=variants["1"], num_cpus=0.05),
            ModelConfig(name="m", version="2", path=variants["2"], num_cpus=0.05),
        ],
        endpoints=[EndpointConfig(name="m", policy=FixedPolicy(weights={"1": 0.5, "2": 0.5}))],
        # two ingress replicas: feedback may reach the one that did not answer
        server=ServerConfig(port=0, grpc_port=0, replicas=2),
        registry=RegistryConfig(uri=f"sqlite:///{home}/registry.db", artifacts=str(home / "art")),
    )
    dep = deploy(cfg)
    with Client(dep.url) as client:
        yield dep, client
    undeploy(dep)


def test_ab_split_sticky_keys_and_who_answered(ab, variants):
    dep, client = ab
    rng = np.random.default_rng(0)
    seen = {"1": 0, "2": 0}
    for _ in range(200):
        x = rows(1, rng)
        r = client.infer("m", x)
        assert r.headers["flywheel-model-version"] == r.model_version
        np.testing.assert_allclose(r.output(), expected(variants[r.model_version], x), rtol=1e-6)
        seen[r.model_version] += 1
    assert 60 <= seen["1"] <= 140, seen  # 50/50 split; p < 1e-8 to fall outside
    for user in ("alice", "bob", "carol", "dave"):
        answered = {client.infer("m", rows(1, rng), key=user).model_version for _ in range(15)}
        assert len(answered) == 1, (user, answered)
    with GrpcClient(dep.grpc_target) as g:
        versions = {g.infer("m", rows(1, rng), key="alice").model_version for _ in range(10)}
    assert versions == {client.infer("m", rows(1, rng), key="alice").model_version}


def test_bandit_learns_from_feedback_and_rejects_bad_feedback(ab):
    dep, client = ab
    client.set_policy("m", {"kind": "thompson", "reward": "bernoulli"})
    rng = np.random.default_rng(1)
    for i in range(120):  # variant 2 converts 80 % of the time, variant 1 20 %
        r = client.infer("m", rows(1, rng))
        assert r.request_id
        p = 0.8 if r.model_version == "2" else 0.2
        if i % 10:
            client.feedback("m", r.request_id, float(rng.random() < p))
        else:  # a new connection: the kernel may pick the other replica
            with Client(dep.url) as other:
                assert other.feedback("m", r.request_id, float(rng.random() < p))["variant"] == r.model_version
    status = wait_for(lambda: (s := client.endpoint("m"))["bandit"]["arms"]["2"]["count"] >= 20 and s, 30,
                      "20 rewards counted for arm 2", every_s=0.2)
    arms = status["bandit"]["arms"]
    assert arms["2"]["mean"] > arms["1"]["mean"]
    assert status["weights"]["2"] > 0.5
    later = [client.infer("m", rows(1, rng)).model_version for _ in range(40)]
    assert later.count("2") >= 28, later
    with pytest.raises(ClientError) as err:
        client.feedback("m", "no-such-request", 1.0)
    assert err.value.status == 404
    assert "unknown" in err.value.message
    r = client.infer("m", rows(1, rng), request_id="mine-1")
    assert r.request_id == "mine-1"
    with pytest.raises(ClientError) as err:
        client.feedback("m", "mine-1", 3.0)  # a Bernoulli arm takes rewards in [0, 1]
    assert err.value.status == 400
    assert "[0, 1]" in err.value.message
    assert client.feedback("m", "mine-1", 1.0)["variant"] == r.model_version  # the id was not used up
    client.set_policy("m", {"kind": "fixed", "weights": {"1": 0.5, "2": 0.5}})


def test_shadow_mirrors_without_changing_the_answer(ab, variants):
    dep, client = ab
    client.set_policy("m", {"kind": "fixed", "weights": {"1": 1.0}})
    client.set_shadow("m", {"variant": "2", "fraction": 1.0})
    before = client.endpoint("m")["variants"]["2"]["shadow_compared"]
    rng = np.random.default_rng(2)
    for _ in range(40):
        x = rows(1, rng)
        r = client.infer("m", x)
        assert r.model_version == "1"
        np.testing.assert_allclose(r.output(), expected(variants["1"], x), rtol=1e-6)
    status = wait_for(lambda: (s := client.endpoint("m"))["variants"]["2"]["shadow_compared"] >= before + 40 and s,
                      30, "40 more shadow comparisons", every_s=0.2)
    v2 = status["variants"]["2"]
    # two different random tables: the argmax agrees now and then, not always
    assert v2["shadow_agreed"] < v2["shadow_compared"]
    client.clear_shadow("m")
    text = _get(dep.url + "/metrics")
    assert 'flywheel_endpoint_shadow_comparisons_total{endpoint="m",variant="2"}' in text
    client.set_policy("m", {"kind": "fixed", "weights": {"1": 0.5, "2": 0.5}})


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def _drive(client, seconds: float, rng, high: int, stop=None) -> dict:
    answered: dict[str, int] = {}
    failures = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (stop and stop()):
        try:
            version = client.infer("m", rows(1, rng, high)).model_version
            answered[version] = answered.get(version, 0) + 1
        except ClientError:
            failures += 1
    return {"answered": answered, "failures": failures}


def test_canary_of_a_faulty_variant_rolls_back(ab, variants):
    dep, client = ab
    client.set_policy("m", {"kind": "fixed", "weights": {"1": 1.0}})
    client.add_variant("m", {"version": "3", "path": variants["faulty"], "num_cpus": 0.05})
    wait_for(lambda: client.endpoint("m")["variants"]["3"]["status"] == "ready", 30, "variant 3 ready", every_s=0.2)
    client.start_canary("m", {
        "variant": "3", "baseline": "1", "steps": [30, 60, 100], "hold_s": 3.0,
        "gates": {"min_requests": 15, "max_error_rate_increase": 0.05},
    })
    rng = np.random.default_rng(3)
    done = lambda: client.endpoint("m")["canary"]["status"] != "running"  # noqa: E731
    _drive(client, 40, rng, high=14, stop=done)
    status = client.endpoint("m")
    canary = status["canary"]
    assert canary["status"] == "rolled_back", canary
    assert status["weights"] == {"1": 1.0}
    assert any("error" in e["detail"] for e in status["events"] if e["kind"] == "canary"), status["events"]
    # back on the baseline once the replicas have the new snapshot (they
    # fetch one every 0.5 s): every request succeeds again

    def twenty_answered_by_the_baseline() -> bool:
        try:
            return all(client.infer("m", rows(1, rng, 14)).model_version == "1" for _ in range(20))
        except ClientError:
            return False  # a replica still on the old snapshot sent it to 3

    wait_for(twenty_answered_by_the_baseline, 10, "20 requests in a row answered by 1", every_s=0.1)
    client.remove_variant("m", "3")


def test_canary_of_a_healthy_variant_promotes_and_retires_the_baseline(ab, variants):
    dep, client = ab
    client.set_policy("m", {"kind": "fixed", "weights": {"1": 1.0}})
    client.start_canary("m", {
        "variant": "2", "baseline": "1", "steps": [50, 100], "hold_s": 1.5,
        "gates": {"min_requests": 10, "max_p99_ratio": 20.0},
    })
    rng = np.random.default_rng(4)
    _drive(client, 40, rng, high=10, stop=lambda: client.endpoint("m")["canary"]["status"] != "running")
    status = wait_for(lambda: (s := client.endpoint("m"))["canary"]["status"] == "promoted" and "1" not in s["variants"] and s,
                      30, "the canary promoted and 1 retired", every_s=0.2)
    assert status["weights"] == {"2": 1.0}
    assert {client.infer("m", rows(1, rng)).model_version for _ in range(10)} == {"2"}

    def gone() -> bool:
        try:
            client.infer("m", rows(1, rng), version="1")
        except ClientError as exc:
            assert exc.status == 404, exc
            return True
        return False

    wait_for(gone, 5, "version 1 to answer 404", every_s=0.2)  # the replicas unload it with their next snapshot


def test_canary_whose_inputs_drift_rolls_back_on_the_drift_gate(variants, tmp_path):
    from flywheel.serving.config import DriftConfig

    rng = np.random.default_rng(11)
    reference = tmp_path / "reference.npy"
    np.save(reference, rows(500, rng))
    # every sampled row shipped at once, scored in windows of 60 rows
    drift = DriftConfig(enabled=True, sample_rate=1.0, batch_rows=10, flush_interval_s=0.2, window=60,
                        tests=("ks",), reference=str(reference))
    cfg = DeployConfig(
        name="drifted",
        models=[ModelConfig(name="m", version="1", path=variants["1"], num_cpus=0.05, drift=drift)],
        server=ServerConfig(port=0, grpc_port=-1),
        registry=RegistryConfig(uri=f"sqlite:///{tmp_path}/registry.db", artifacts=str(tmp_path / "art")),
    )
    dep = deploy(cfg)
    try:
        with Client(dep.url) as client:
            # a variant added at run time: the monitor starts tracking it from its first samples
            client.add_variant("m", {"version": "2", "path": variants["2"], "num_cpus": 0.05,
                                     "drift": msgspec.to_builtins(drift)})
            wait_for(lambda: _loaded(client, "2"), 30, "variant 2 loaded", every_s=0.2)
            client.start_canary("m", {
                "variant": "2", "baseline": "1", "steps": [50, 100], "hold_s": 2.0, "max_step_s": 60.0,
                # drift alone judges (a p99 of 10 requests on a busy host is noise)
                "gates": {"min_requests": 10, "max_drift": 0.2, "max_p99_ratio": None},
            })
            deadline = time.monotonic() + 60
            while client.endpoint("m")["canary"]["status"] == "running" and time.monotonic() < deadline:
                x = rows(1, rng)
                x[:, 1:] += 3.0  # live inputs left the training range
                client.infer("m", x)
            status = client.endpoint("m")
            assert status["canary"]["status"] == "rolled_back", status["canary"]
            drift_gate = next(g for g in status["canary"]["last_gates"] if g["name"] == "drift")
            assert not drift_gate["passed"], status["canary"]
            assert drift_gate["value"] > 0.2, status["canary"]
            assert status["weights"] == {"1": 1.0}
            # a variant without drift monitoring cannot take a drift gate
            client.add_variant("m", {"version": "3", "path": variants["4"], "num_cpus": 0.05})
            wait_for(lambda: _loaded(client, "3"), 30, "variant 3 loaded", every_s=0.2)
            with pytest.raises(ClientError, match="no drift monitoring") as err:
                client.start_canary("m", {"variant": "3", "baseline": "1", "gates": {"max_drift": 0.2}})
            assert err.value.status == 400
    finally:
        undeploy(dep)


def _loaded(client, version: str) -> bool:
    status = client.endpoint("m")
    assert version in status["variants"], status["events"]  # a failed load says why there
    return status["variants"][version]["status"] == "ready"
