"""The router controller's decisions, without Ray: variants, swaps, canaries,
feedback and persistence (a real SQLite file), driven by replica reports."""

from __future__ import annotations

import itertools

import pytest

from flywheel.registry import RouterStateStore
from flywheel.protocol.errors import AlreadyExistsError, InvalidInputError, NotFoundError, PreconditionFailedError
from flywheel.serving.canary import VariantWindow
from flywheel.serving.config import EndpointConfig, ModelConfig
from flywheel.serving.control_state import ControlState
from flywheel.serving.policy_config import FixedPolicy

T0 = 1_000_000.0


def control(*args, **kwargs) -> ControlState:
    st = ControlState(*args, **kwargs)
    report.epoch = st.epoch
    return st


def models(*versions: str, name: str = "m") -> list[ModelConfig]:
    return [ModelConfig(name=name, version=v, path=f"/models/{v}.onnx") for v in versions]


_seq = itertools.count(1)


def report(replica: str, applied: int, loaded=None, windows=None, inflight=None, ids=(), rewards=None,
           epoch=None, seq=None) -> dict:
    """What an ingress replica sends (serving/_private/endpoint_sync.py);
    ``applied`` counts within the controller's current epoch unless
    ``epoch`` says otherwise."""
    batch = {"seq": seq or next(_seq), "windows": windows or {}, "rewards": rewards or {}, "ids": list(ids),
             "used_ids": []}
    # every version of these tests shares one signature, as the replicas
    # report it (the controller judges a move only once it knows both sides)
    names = set(loaded or {}) | {"m"}
    signatures = {n: {str(v): _META for v in range(1, 10)} for n in names}
    return {"replica": replica, "epoch": epoch if epoch is not None else report.epoch, "applied": applied,
            "loaded": loaded or {}, "signatures": signatures, "inflight": inflight or {}, "batches": [batch]}


_META = {"name": "m", "versions": [], "platform": "onnx_onnxv1",
         "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
         "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}]}


report.epoch = ""


def window(requests: int, errors: int = 0, latency_s: float = 0.002) -> dict:
    w = VariantWindow()
    for i in range(requests):
        w.observe(latency_s, i >= errors)
    return w.to_wire()


@pytest.fixture
def store(tmp_path):
    s = RouterStateStore.open(f"sqlite:///{tmp_path}/registry.db")
    yield s
    s.close()


def test_a_name_without_settings_sends_everything_to_its_highest_version():
    st = control("d", "id1", [], models("1", "2", "10"), now=T0)
    snap = st.snapshot()["endpoints"]["m"]
    assert snap["weights"] == {"10": 1.0}
    assert snap["routable"] == ["1", "2", "10"]


def test_policies_are_checked_against_the_endpoints_variants():
    st = control("d", "id1", [], models("1", "2"), now=T0)
    with pytest.raises(InvalidInputError, match=r"\['7'\]"):
        st.set_policy("m", {"kind": "fixed", "weights": {"1": 1, "7": 1}}, now=T0)
    with pytest.raises(InvalidInputError, match="kind"):
        st.set_policy("m", {"kind": "roulette"}, now=T0)
    with pytest.raises(NotFoundError, match="endpoints"):
        st.set_policy("nope", {"kind": "ucb1"}, now=T0)
    v = st.version
    status = st.set_policy("m", {"kind": "ucb1"}, now=T0)
    assert st.version == v + 1
    assert status["policy"]["kind"] == "ucb1"
    assert status["bandit"]["kind"] == "ucb1"
    snap = st.sync(report("r1", 0), now=T0)["endpoints"]["m"]
    assert snap["weights"] is None
    assert snap["policy"]["kind"] == "ucb1"


def test_a_variant_takes_traffic_only_once_every_live_replica_has_it_ready():
    st = control("d", "id1", [], models("1"), now=T0)
    st.sync(report("r1", 0), now=T0)
    st.sync(report("r2", 0), now=T0)
    st.add_variant("m", {"version": "2", "path": "/models/2.onnx"}, now=T0)
    snap = st.snapshot()["endpoints"]["m"]
    assert snap["variants"]["2"]["path"] == "/models/2.onnx"
    assert snap["routable"] == ["1"]
    st.sync(report("r1", st.version, loaded={"m": {"1": "ready", "2": "ready"}}), now=T0 + 1)
    st.sync(report("r2", st.version, loaded={"m": {"1": "ready", "2": "loading"}}), now=T0 + 1)
    st.tick(now=T0 + 1)
    assert st.status("m", now=T0 + 1)["variants"]["2"]["status"] == "loading"
    st.sync(report("r2", st.version, loaded={"m": {"1": "ready", "2": "ready"}}), now=T0 + 2)
    st.tick(now=T0 + 2)
    assert st.snapshot()["endpoints"]["m"]["routable"] == ["1", "2"]
    with pytest.raises(AlreadyExistsError, match="endpoint 'm' already has variant '2'"):
        st.add_variant("m", {"version": "2", "path": "/x.onnx"}, now=T0 + 2)
    with pytest.raises(InvalidInputError, match="placement"):
        st.add_variant("m", {"version": "3", "path": "/x.onnx", "placement": "dedicated"}, now=T0 + 2)


def test_swap_moves_traffic_after_load_and_removes_the_old_variant_once_drained():
    st = control("d", "id1", [], models("1"), now=T0)
    st.sync(report("r1", 0), now=T0)
    st.swap("m", {"version": "2", "path": "/models/2.onnx"}, now=T0)
    assert st.snapshot()["endpoints"]["m"]["weights"] == {"1": 1.0}  # nothing moves while loading
    with pytest.raises(PreconditionFailedError, match="swapping"):
        st.set_policy("m", {"kind": "ucb1"}, now=T0)
    st.sync(report("r1", st.version, loaded={"m": {"1": "ready", "2": "ready"}}), now=T0 + 1)
    st.tick(now=T0 + 1)  # ready
    st.tick(now=T0 + 1)  # traffic moves, 1 retires
    assert st.status("m", now=T0 + 1)["swap"]["phase"] == "draining"
    assert st.snapshot()["endpoints"]["m"]["weights"] == {"2": 1.0}
    # the replica has not applied the move yet, and still has a request on 1
    st.sync(report("r1", st.version - 1, inflight={"m": {"1": 2}}), now=T0 + 2)
    st.tick(now=T0 + 2)
    assert "1" in st.snapshot()["endpoints"]["m"]["variants"]
    st.sync(report("r1", st.version), now=T0 + 3)
    st.tick(now=T0 + 3)
    st.tick(now=T0 + 3)
    status = st.status("m", now=T0 + 3)
    assert status["swap"]["phase"] == "done"
    assert list(status["variants"]) == ["2"]


def test_a_swap_whose_variant_fails_to_load_leaves_the_old_one_serving():
    st = control("d", "id1", [], models("1"), now=T0)
    st.sync(report("r1", 0), now=T0)
    st.swap("m", {"version": "2", "path": "/broken.onnx"}, now=T0)
    st.sync(report("r1", st.version, loaded={"m": {"1": "ready", "2": "failed: not an ONNX model"}}), now=T0 + 1)
    st.tick(now=T0 + 1)
    status = st.status("m", now=T0 + 1)
    assert status["swap"]["phase"] == "failed"
    assert status["swap"]["error"] == "not an ONNX model"
    assert list(status["variants"]) == ["1"]
    assert status["weights"] == {"1": 1.0}


def _two_variants(moved=None) -> ControlState:
    ms = [ModelConfig(name="m", version="1", ref="m/1"), ModelConfig(name="m", version="2", ref="m/2")]
    st = control("d", "id1", [EndpointConfig(name="m", policy=FixedPolicy(weights={"1": 1.0}))], ms,
                      alias_mover=(lambda n, a, v: moved.append((n, a, v))) if moved is not None else None, now=T0)
    st.sync(report("r1", 0), now=T0)
    return st


def test_a_canary_that_errors_rolls_back_at_once_and_says_why():
    st = _two_variants()
    st.start_canary("m", {"variant": "2", "steps": [10, 50, 100], "hold_s": 60,
                          "gates": {"min_requests": 20}}, now=T0)
    assert st.snapshot()["endpoints"]["m"]["weights"] == pytest.approx({"1": 0.9, "2": 0.1})
    st.sync(report("r1", st.version, windows={"m": {"1": window(200), "2": window(30, errors=6)}}), now=T0 + 1)
    st.tick(now=T0 + 1)  # long before hold_s: a failing gate does not wait
    status = st.status("m", now=T0 + 1)
    assert status["canary"]["status"] == "rolled_back"
    assert status["weights"] == {"1": 1.0}
    assert "error_rate" in status["events"][-1]["detail"]
    assert st.snapshot()["endpoints"]["m"]["canary_outcomes"] == {"rolled_back": 1}


def test_a_healthy_canary_ramps_promotes_moves_the_alias_and_retires_the_baseline():
    moved: list = []
    st = _two_variants(moved)
    st.start_canary("m", {"variant": "2", "steps": [50, 100], "hold_s": 5, "gates": {"min_requests": 10}}, now=T0)
    now = T0
    for _ in range(2):
        now += 6
        st.sync(report("r1", st.version, windows={"m": {"1": window(50), "2": window(50)}}), now=now)
        st.tick(now=now)
    status = st.status("m", now=now)
    assert status["canary"]["status"] == "promoted"
    assert status["weights"] == {"2": 1.0}
    assert moved == [("m", "production", 2)]
    assert st.snapshot()["endpoints"]["m"]["canary_outcomes"] == {"promoted": 1}
    assert status["variants"]["1"]["status"] == "retiring"
    st.sync(report("r1", st.version), now=now + 1)
    st.tick(now=now + 1)
    assert list(st.snapshot()["endpoints"]["m"]["variants"]) == ["2"]


def test_feedback_through_the_controller_for_ids_other_replicas_reported():
    st = _two_variants()
    st.set_policy("m", {"kind": "thompson"}, now=T0)
    st.sync(report("r1", st.version, ids=[("abc", "m", "2")]), now=T0 + 1)
    assert st.feedback("m", "abc", 1.0, now=T0 + 1)["variant"] == "2"
    with pytest.raises(NotFoundError, match="unknown"):
        st.feedback("m", "abc", 1.0, now=T0 + 1)  # used up
    st.sync(report("r1", st.version, ids=[("bad", "m", "1")]), now=T0 + 1)
    with pytest.raises(InvalidInputError, match="finite"):
        st.feedback("m", "bad", float("nan"))
    st.sync(report("r1", st.version, rewards={"m": {"1": [10, 2.0, 2.0]}}), now=T0 + 2)
    arms = st.status("m", now=T0 + 2)["bandit"]["arms"]
    assert arms["1"]["count"] == 10
    assert arms["2"]["count"] == 1


def test_statistics_reach_the_replicas_about_once_a_second():
    st = _two_variants()
    v = st.version
    st.sync(report("r1", v, windows={"m": {"1": window(5)}}), now=T0 + 10)
    st.tick(now=T0 + 10)
    assert st.version == v + 1
    snap = st.sync(report("r1", v), now=T0 + 10)
    assert snap["endpoints"]["m"]["totals"]["1"]["requests"] == 5


def test_state_resumes_after_a_controller_restart_and_not_after_a_new_deploy(store):
    ms = models("1", "2")
    st = control("d", "id1", [], ms, store, now=T0)
    st.set_policy("m", {"kind": "fixed", "weights": {"1": 0.25, "2": 0.75}}, now=T0)
    st.sync(report("r1", st.version), now=T0)  # the replicas' first report: the signatures
    st.start_canary("m", {"variant": "1", "baseline": "2", "steps": [5, 100], "hold_s": 30}, now=T0)
    again = control("d", "id1", [], ms, store, now=T0 + 5)  # Serve restarted the replica
    status = again.status("m", now=T0 + 5)
    assert status["canary"]["status"] == "running"
    assert status["canary"]["config"]["variant"] == "1"
    assert again.snapshot()["endpoints"]["m"]["weights"] == pytest.approx({"2": 0.95, "1": 0.05})
    assert status["events"][-1]["kind"] == "resumed"
    fresh = control("d", "id2", [], ms, store, now=T0 + 6)  # a new deploy
    assert fresh.status("m", now=T0 + 6)["canary"] is None
    assert fresh.snapshot()["endpoints"]["m"]["weights"] == {"2": 1.0}


@pytest.mark.parametrize("policy", [
    {"kind": "epsilon_greedy", "epsilon": 0.1}, {"kind": "thompson", "reward": "bernoulli"},
    {"kind": "thompson", "reward": "gaussian"}, {"kind": "ucb1"},
])
def test_every_bandit_kind_takes_rewards_and_reports_its_arms(policy):
    st = _two_variants()
    st.set_policy("m", policy, now=T0)
    st.sync(report("r1", st.version, rewards={"m": {"2": [4, 3.0, 3.0]}}), now=T0 + 1)
    status = st.status("m", now=T0 + 1)
    assert status["bandit"]["arms"]["2"]["count"] == 4
    assert status["bandit"]["arms"]["1"]["count"] == 0
    assert set(status["weights"]) == {"1", "2"}
    snap = st.sync(report("r1", 0), now=T0 + 1)["endpoints"]["m"]
    assert snap["policy"]["kind"] == policy["kind"]
    assert snap["policy_state"]["arms"]["2"]["count"] == 4


def test_a_report_batch_sent_again_is_counted_once():
    st = _two_variants()
    again = report("r1", st.version, windows={"m": {"1": window(10)}}, seq=10_000)
    st.sync(again, now=T0 + 1)
    st.sync(again, now=T0 + 2)  # its answer was lost: the replica sends it again
    assert st.status("m", now=T0 + 2)["variants"]["1"]["requests"] == 10


def test_replicas_take_the_snapshot_of_a_restarted_controller(store):
    st = control("d", "id1", [], models("1", "2"), store, now=T0)
    for _ in range(5):
        st.set_policy("m", {"kind": "fixed", "weights": {"1": 1.0}}, now=T0)
    old_epoch, applied = st.epoch, st.version
    again = control("d", "id1", [], models("1", "2"), store, now=T0 + 1)
    assert again.version < applied
    answer = again.sync(report("r1", applied, epoch=old_epoch), now=T0 + 1)
    assert answer["epoch"] == again.epoch
    assert answer["endpoints"]["m"]["weights"] == {"1": 1.0}


def test_a_canary_without_promotion_stays_at_full_traffic_when_it_completes():
    st = _two_variants()
    st.start_canary("m", {"variant": "2", "steps": [100], "hold_s": 1, "promote": False,
                          "gates": {"min_requests": 5}}, now=T0)
    st.sync(report("r1", st.version, windows={"m": {"1": window(20), "2": window(20)}}), now=T0 + 2)
    st.tick(now=T0 + 2)
    status = st.status("m", now=T0 + 2)
    assert status["canary"]["status"] == "completed"
    assert status["weights"] == {"2": 1.0}
    assert set(status["variants"]) == {"1", "2"}  # nothing retired without a promotion


def test_controller_feedback_expires_and_a_bad_reward_leaves_the_id_usable():
    st = _two_variants()
    st.set_policy("m", {"kind": "thompson"}, now=T0)
    st.sync(report("r1", st.version, ids=[("old", "m", "1"), ("new", "m", "2")]), now=T0)
    with pytest.raises(NotFoundError, match="expired"):
        st.feedback("m", "old", 1.0, now=T0 + 601)
    with pytest.raises(InvalidInputError, match=r"\[0, 1\]"):
        st.feedback("m", "new", 5.0, now=T0 + 1)
    assert st.feedback("m", "new", 1.0, now=T0 + 1)["variant"] == "2"
    with pytest.raises(NotFoundError, match="unknown endpoint 'other'"):
        st.feedback("other", "new", 1.0, now=T0 + 1)


def _ready(st: ControlState, now: float, *versions: str) -> None:
    st.sync(report("r1", st.version, loaded={"m": {v: "ready" for v in versions}}), now=now)
    st.tick(now=now)


def test_a_variant_added_under_a_bandit_takes_no_traffic_until_a_policy_names_it():
    st = control("d", "id1", [], models("1", "2"), now=T0)
    st.sync(report("r1", 0), now=T0)
    st.set_policy("m", {"kind": "ucb1"}, now=T0)  # arms: the ready variants now
    st.add_variant("m", {"version": "3", "path": "/models/3.onnx"}, now=T0)
    _ready(st, T0 + 1, "1", "2", "3")
    snap = st.snapshot()["endpoints"]["m"]
    assert snap["routable"] == ["1", "2", "3"]
    assert snap["policy"]["arms"] == ["1", "2"]
    assert set(st.status("m", now=T0 + 1)["weights"]) == {"1", "2"}
    st.set_policy("m", {"kind": "ucb1", "arms": ["2", "3"]}, now=T0 + 1)
    assert set(st.status("m", now=T0 + 1)["weights"]) == {"2", "3"}
    with pytest.raises(InvalidInputError, match=r"arms names variants \['9'\]"):
        st.set_policy("m", {"kind": "thompson", "arms": ["2", "9"]}, now=T0 + 1)
    st.remove_variant("m", "2", now=T0 + 1)  # retiring: no longer an arm
    assert st.snapshot()["endpoints"]["m"]["policy"]["arms"] == ["3"]
    with pytest.raises(PreconditionFailedError, match="only one"):
        st.remove_variant("m", "3", now=T0 + 1)


@pytest.mark.parametrize("policy", [{"kind": "ucb1"}, {"kind": "epsilon_greedy", "epsilon": 0.5},
                                    {"kind": "fixed", "weights": {"1": 0.5, "2": 0.5}}])
def test_a_rolled_back_canary_gets_no_traffic_under_any_policy(policy):
    st = control("d", "id1", [], models("1", "2"), now=T0)
    st.sync(report("r1", 0), now=T0)
    st.set_policy("m", policy, now=T0)  # the canary variant is already one of its arms
    st.start_canary("m", {"variant": "2", "baseline": "1", "steps": [10, 100], "hold_s": 60,
                          "gates": {"min_requests": 20}}, now=T0)
    st.sync(report("r1", st.version, windows={"m": {"1": window(200), "2": window(30, errors=6)}}), now=T0 + 1)
    st.tick(now=T0 + 1)
    status = st.status("m", now=T0 + 1)
    assert status["canary"]["status"] == "rolled_back"
    assert {v for v, w in status["weights"].items() if w > 0} == {"1"}, status["weights"]
    snap = st.snapshot()["endpoints"]["m"]  # what the replicas route by
    assert set(snap["weights"] or {}) == {"1"} or snap["policy"]["arms"] == ["1"], snap


def test_rolling_back_a_promoted_canary_moves_the_alias_back():
    moved: list = []
    st = _two_variants(moved)
    st.start_canary("m", {"variant": "2", "steps": [100], "hold_s": 5, "gates": {"min_requests": 10}}, now=T0)
    st.sync(report("r1", st.version, windows={"m": {"1": window(50), "2": window(50)}}), now=T0 + 6)
    st.tick(now=T0 + 6)
    assert st.status("m", now=T0 + 6)["canary"]["status"] == "promoted"
    st.rollback("m", now=T0 + 6)
    assert moved == [("m", "production", 2), ("m", "production", 1)]
    assert st.status("m", now=T0 + 6)["weights"] == {"1": 1.0}


def test_a_drift_gate_needs_a_monitored_variant_and_rolls_back_on_drift():
    with pytest.raises(InvalidInputError, match="no drift monitoring"):  # no monitor in the deployment
        _two_variants().start_canary("m", {"variant": "2", "gates": {"max_drift": 0.5}}, now=T0)
    ms = [ModelConfig(name="m", version="1", path="/m/1.onnx"),
          ModelConfig(name="m", version="2", path="/m/2.onnx", drift={"enabled": True, "reference": "/r.npy"})]
    st = control("d", "id1", [EndpointConfig(name="m", policy=FixedPolicy(weights={"1": 1.0}))], ms,
                 drift_monitor=True, now=T0)
    st.sync(report("r1", 0), now=T0)
    with pytest.raises(InvalidInputError, match="no drift monitoring"):  # variant 1 has it off
        st.start_canary("m", {"variant": "1", "baseline": "2", "gates": {"max_drift": 0.5}}, now=T0)
    st.start_canary("m", {"variant": "2", "steps": [10, 100], "hold_s": 5, "gates": {"min_requests": 10,
                                                                                      "max_drift": 0.25}}, now=T0)
    assert st.drift_wanted() == [("m", "2", T0)]
    healthy = {"m": {"1": window(50), "2": window(50)}}
    st.sync(report("r1", st.version, windows=healthy), now=T0 + 6)
    st.tick(now=T0 + 6)  # past hold_s, healthy, but no drift score yet: holds
    assert st.status("m", now=T0 + 6)["canary"]["step"] == 0
    st.set_drift("m", "2", 0.0)
    st.tick(now=T0 + 6)
    assert st.status("m", now=T0 + 6)["canary"]["step"] == 1
    ((_, _, since),) = st.drift_wanted()
    assert since == T0 + 6  # scores are read per step
    st.sync(report("r1", st.version, windows=healthy), now=T0 + 7)
    st.set_drift("m", "2", 0.5)
    st.tick(now=T0 + 7)
    status = st.status("m", now=T0 + 7)
    assert status["canary"]["status"] == "rolled_back"
    assert status["weights"] == {"1": 1.0}
    assert "drift" in status["events"][-1]["detail"]
    assert st.drift_wanted() == []


def test_removing_what_a_fixed_split_routes_to_is_refused_and_a_restored_policy_never_falls_back_to_a_new_variant():
    st = control("d", "id1", [], models("1", "2"), now=T0)  # no settings: fixed {"2": 1}
    st.sync(report("r1", 0), now=T0)
    with pytest.raises(PreconditionFailedError, match="only one"):
        st.remove_variant("m", "2", now=T0)
    st.remove_variant("m", "1", now=T0)  # no weight: fine
    with pytest.raises(InvalidInputError, match="being removed"):
        st.set_policy("m", {"kind": "ucb1", "arms": ["1", "2"]}, now=T0)
    st.add_variant("m", {"version": "3", "path": "/models/3.onnx"}, now=T0)
    _ready(st, T0 + 1, "2", "3")
    assert st.snapshot()["endpoints"]["m"]["weights"] == {"2": 1.0}  # 3 is newer, but named by nothing


def test_a_failed_load_is_no_arm_of_a_version_added_again_later():
    st = control("d", "id1", [], models("1", "2"), now=T0)
    st.sync(report("r1", 0), now=T0)
    st.set_policy("m", {"kind": "ucb1", "arms": ["1", "2"]}, now=T0)
    st.add_variant("m", {"version": "3", "path": "/broken.onnx"}, now=T0)
    st.set_policy("m", {"kind": "ucb1", "arms": ["1", "2", "3"]}, now=T0)  # 3 still loading
    st.sync(report("r1", st.version, loaded={"m": {"1": "ready", "2": "ready", "3": "failed: no"}}), now=T0 + 1)
    st.tick(now=T0 + 1)
    assert st.snapshot()["endpoints"]["m"]["policy"]["arms"] == ["1", "2"]


def test_rolling_back_a_completed_canary_leaves_the_alias_alone():
    moved: list = []
    st = _two_variants(moved)
    st.start_canary("m", {"variant": "2", "steps": [100], "hold_s": 5, "promote": False,
                          "gates": {"min_requests": 10}}, now=T0)
    st.sync(report("r1", st.version, windows={"m": {"1": window(50), "2": window(50)}}), now=T0 + 6)
    st.tick(now=T0 + 6)
    assert st.status("m", now=T0 + 6)["canary"]["status"] == "completed"
    st.rollback("m", now=T0 + 6)
    assert moved == []
    assert st.status("m", now=T0 + 6)["weights"] == {"1": 1.0}


def test_a_replica_of_another_generation_of_the_deployment_gets_no_snapshot():
    # Serve replaces an updated deployment's replicas one by one: an old
    # ingress replica must not load the new generation's variants
    st = control("d", "new-generation", [], models("2"), now=T0)
    answer = st.sync({**report("old-replica", 0), "deploy": "old-generation"}, now=T0)
    assert answer == {"deploy_id": "new-generation"}


def test_a_replica_of_another_generation_is_not_counted_live():
    st = control("d", "new-generation", [], models("2"), now=T0)
    st.sync({**report("old-replica", 0), "deploy": "old-generation"}, now=T0)
    assert st.live_replicas(T0) == {}


def test_a_replica_of_this_generation_gets_the_snapshot_with_its_id():
    st = control("d", "gen", [], models("2"), now=T0)
    answer = st.sync({**report("r1", 0), "deploy": "gen"}, now=T0)
    assert answer["deploy_id"] == "gen"
    assert answer["endpoints"]["m"]["routable"] == ["2"]


def test_a_gpu_variant_is_refused_at_run_time_when_the_ingress_replicas_have_no_gpu():
    st = ControlState("d", "id1", [], models("1"), now=T0)
    cuda = {"version": "2", "path": "/models/2.onnx", "onnxruntime": {"providers": ["cuda", "cpu"]}}
    for op in (st.add_variant, st.swap):
        with pytest.raises(InvalidInputError, match=r"model needs 1 GPU per replica.*deployed with 0"):
            op("m", dict(cuda), now=T0 + 1)
    assert st.status("m", now=T0 + 1)["variants"].keys() == {"1"}
    # accepting ONNX Runtime's CPU fallback explicitly is allowed
    assert st.add_variant("m", {**cuda, "num_gpus": 0}, now=T0 + 2)["variants"]["2"]["status"] == "loading"
    # ingress replicas deployed with a GPU model take GPU variants
    gpu_models = [ModelConfig(name="m", version="1", path="/models/1.onnx", num_gpus=1.0)]
    with_gpu = ControlState("d", "id2", [], gpu_models, now=T0)
    assert with_gpu.add_variant("m", dict(cuda), now=T0 + 1)["variants"]["2"]["status"] == "loading"


def test_a_variant_added_at_run_time_captures_as_its_endpoint_does(tmp_path):
    from flywheel.serving.config import CaptureConfig, EndpointConfig

    capture = CaptureConfig(path=str(tmp_path))
    st = ControlState("d", "id-capture", [EndpointConfig(name="m", capture=capture)], models("1"), now=T0)
    st.add_variant("m", {"version": "2", "path": "/models/m2.onnx"}, now=T0)
    assert st.endpoints["m"].doc["models"]["2"]["capture"]["path"] == str(tmp_path)
    own = {"version": "3", "path": "/models/m3.onnx", "capture": {"path": "/elsewhere"}}
    st.add_variant("m", own, now=T0)
    assert st.endpoints["m"].doc["models"]["3"]["capture"]["path"] == "/elsewhere"


def test_ended_canaries_are_counted_in_the_endpoint_metrics():
    from flywheel.serving._private.live_endpoint import LiveEndpoint, render_endpoint_metrics

    ep = LiveEndpoint("m")
    ep.canary_outcomes = {"rolled_back": 2}
    text = render_endpoint_metrics([ep]).decode()
    assert 'flywheel_endpoint_canaries_total{endpoint="m",outcome="rolled_back"} 2' in text
    assert 'flywheel_endpoint_canaries_total{endpoint="m",outcome="promoted"} 0' in text
