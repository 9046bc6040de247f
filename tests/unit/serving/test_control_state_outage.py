"""The router controller's state while its database is away: a decision is
kept in memory and announced to the replicas only once it is saved."""

from __future__ import annotations

import itertools

import pytest

from flywheel.protocol.errors import UnavailableError
from flywheel.registry import RouterStateStore
from flywheel.registry.db import DatabaseUnreachable
from flywheel.serving.canary import VariantWindow
from flywheel.serving.config import EndpointConfig, ModelConfig
from flywheel.serving.control_state import ControlState
from flywheel.serving.policy_config import FixedPolicy

T0 = 1_000_000.0
SPLIT = {"kind": "fixed", "weights": {"1": 0.25, "2": 0.75}}


class FlakyStore:
    """A RouterStateStore whose saves fail while ``down``."""

    def __init__(self, store: RouterStateStore) -> None:
        self._store = store
        self.down = False

    def load(self, deployment):
        return self._store.load(deployment)

    def delete(self, deployment, endpoint=None):
        self._store.delete(deployment, endpoint)

    def save(self, deployment, endpoint, state):
        if self.down:
            raise UnavailableError("registry database postgresql://h/db is unreachable: refused")
        self._store.save(deployment, endpoint, state)


@pytest.fixture
def store(tmp_path):
    s = RouterStateStore.open(f"sqlite:///{tmp_path}/registry.db")
    yield FlakyStore(s)
    s.close()


def test_a_decision_that_cannot_be_saved_is_announced_by_the_tick_that_saves_it(store):
    models = [ModelConfig(name="m", version=v, path=f"/models/{v}.onnx") for v in ("1", "2")]
    st = ControlState("d", "id1", [], models, store, now=T0)
    before = st.version
    store.down = True
    with pytest.raises(UnavailableError):
        st.set_policy("m", SPLIT, now=T0 + 1)
    with pytest.raises(UnavailableError):  # still away: the controller's ticker logs it and ticks on
        st.tick(now=T0 + 2)
    assert st.version == before
    store.down = False
    st.tick(now=T0 + 3)
    assert st.version == before + 1
    assert store.load("d")["m"]["policy"]["weights"] == SPLIT["weights"]
    st.tick(now=T0 + 4)
    assert st.version == before + 1  # announced once


class FlakyAliasMover:
    """Moves the registry's alias, or fails as an unreachable database does while ``down``."""

    def __init__(self) -> None:
        self.down = True
        self.moved: list = []

    def __call__(self, name, alias, version) -> None:
        if self.down:
            raise DatabaseUnreachable("registry database postgresql://h/db is unreachable: refused")
        self.moved.append((name, alias, version))


def _report(st: ControlState, windows=None) -> dict:
    meta = {"name": "m", "versions": [], "platform": "onnx_onnxv1",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}]}
    return {"replica": "r1", "epoch": st.epoch, "applied": st.version, "loaded": {"m": {"1": "ready", "2": "ready"}},
            "signatures": {"m": {"1": meta, "2": meta}}, "inflight": {},
            "batches": [{"seq": next(_SEQ), "windows": windows or {}, "rewards": {}, "ids": [], "used_ids": []}]}


_SEQ = itertools.count(1)


def _window(requests: int) -> dict:
    w = VariantWindow()
    for _ in range(requests):
        w.observe(0.002, True)
    return w.to_wire()


def _state(mover) -> ControlState:
    ms = [ModelConfig(name="m", version="1", ref="m/1"), ModelConfig(name="m", version="2", ref="m/2")]
    st = ControlState("d", "id1", [EndpointConfig(name="m", policy=FixedPolicy(weights={"1": 1.0}))], ms,
                      alias_mover=mover, now=T0)
    st.sync(_report(st), now=T0)
    return st


def test_a_canary_whose_promotion_meets_an_unreachable_registry_promotes_once_it_is_back():
    mover = FlakyAliasMover()
    st = _state(mover)
    st.start_canary("m", {"variant": "2", "steps": [50, 100], "hold_s": 5, "gates": {"min_requests": 10}}, now=T0)
    now = T0
    for _ in range(3):  # the last step passes, but the alias cannot move: not a refusal
        now += 6
        st.sync(_report(st, {"m": {"1": _window(50), "2": _window(50)}}), now=now)
        st.tick(now=now)
    status = st.status("m", now=now)
    assert status["canary"]["status"] == "running" and mover.moved == []
    assert st.snapshot()["endpoints"]["m"].get("canary_outcomes", {}) == {}
    mover.down = False
    now += 6
    st.sync(_report(st, {"m": {"1": _window(50), "2": _window(50)}}), now=now)
    st.tick(now=now)
    assert st.status("m", now=now)["canary"]["status"] == "promoted"
    assert mover.moved == [("m", "production", 2)]


def test_a_swap_that_meets_an_unreachable_registry_waits_and_then_moves_the_traffic():
    mover = FlakyAliasMover()
    ms = [ModelConfig(name="m", version="1", ref="m/1")]
    st = ControlState("d", "id1", [EndpointConfig(name="m", policy=FixedPolicy(weights={"1": 1.0}))], ms,
                      alias_mover=mover, resolver=lambda ref: ref, now=T0)
    st.sync(_report(st), now=T0)
    st.swap("m", {"version": "2", "ref": "m/2"}, now=T0)
    for t in (1, 2, 3):
        st.sync(_report(st), now=T0 + t)
        st.tick(now=T0 + t)
    assert st.status("m", now=T0 + 3)["swap"]["phase"] == "loading"  # not failed: the registry was away
    assert st.snapshot()["endpoints"]["m"]["weights"] == {"1": 1.0}
    mover.down = False
    st.sync(_report(st), now=T0 + 4)
    st.tick(now=T0 + 4)
    assert st.status("m", now=T0 + 4)["swap"]["phase"] == "draining"
    assert st.snapshot()["endpoints"]["m"]["weights"] == {"2": 1.0}
    assert mover.moved == [("m", "production", 2)]
