"""The router controller's promotions pass the registry's gates (no Ray):
ControlState wired to a real SQLite registry the way serving/controller.py
wires it. A refused promotion or canary start changes neither traffic nor the
registry; a canary whose final promotion is refused rolls back saying why."""

from __future__ import annotations

import pytest

from flywheel.protocol.errors import PreconditionFailedError
from flywheel.registry import Registry, parse_policy
from flywheel.serving.config import EndpointConfig, ModelConfig
from flywheel.serving.controller import _alias_ops
from flywheel.serving.policy_config import FixedPolicy

from test_control_state import T0, control, report, window

CANARY = {"variant": "2", "steps": [100], "hold_s": 5, "gates": {"min_requests": 10}}


@pytest.fixture
def reg(tmp_path):
    r = Registry.open(f"sqlite:///{tmp_path}/registry.db", str(tmp_path / "art"), cache_dir=str(tmp_path / "c"))
    r.register_version("m", {"model.onnx": b"1"}, actor="t", metrics={"accuracy": 0.9})
    r.register_version("m", {"model.onnx": b"2"}, actor="t", metrics={"accuracy": 0.95})
    r.set_alias("m", "production", 1, actor="t")
    r.set_policy("m", parse_policy({"rules": [{"rule": "approvals", "count": 1}]}), actor="t")
    yield r
    r.close()


def _state(reg, *, alias: str = "production", refs: bool = True):
    ms = [ModelConfig(name="m", version=v, **({"ref": f"m/{v}"} if refs else {"path": f"/m/{v}.onnx"}))
          for v in ("1", "2")]
    ep = EndpointConfig(name="m", policy=FixedPolicy(weights={"1": 1.0}), promote_alias=alias)
    st = control("d", "id1", [ep], ms, **_alias_ops(reg), now=T0)
    st.sync(report("r1", 0), now=T0)
    return st


def _production(reg) -> tuple[int | None, int | None]:
    return reg.production_version("m"), reg.get_model("m").aliases.get("production")


def test_a_promotion_the_gates_refuse_moves_nothing(reg):
    st = _state(reg)
    with pytest.raises(PreconditionFailedError, match=r"approvals: 0 distinct approval\(s\) \[\], need 1"):
        st.promote("m", "2", now=T0 + 1)
    assert st.status("m", now=T0 + 1)["weights"] == {"1": 1.0}
    assert _production(reg) == (1, 1)
    reg.approve("m", 2, actor="key:alice")
    assert st.promote("m", "2", now=T0 + 2)["weights"] == {"2": 1.0}
    assert _production(reg) == (2, 2)


def test_a_canary_that_could_never_be_promoted_does_not_start(reg):
    st = _state(reg)
    with pytest.raises(PreconditionFailedError, match="canary of 'm' refused: m/2 may not become m@production: "
                                                      "approvals: 0"):
        st.start_canary("m", CANARY, now=T0)
    assert st.status("m", now=T0)["canary"] is None


def test_a_canary_whose_final_promotion_is_refused_rolls_back_with_the_reason(reg):
    reg.approve("m", 2, actor="key:alice")
    st = _state(reg)
    st.start_canary("m", CANARY, now=T0)
    reg.set_policy("m", parse_policy({"rules": [{"rule": "approvals", "count": 2}]}), actor="t")  # meanwhile
    st.sync(report("r1", st.version, windows={"m": {"1": window(50), "2": window(50)}}), now=T0 + 6)
    st.tick(now=T0 + 6)
    status = st.status("m", now=T0 + 6)
    assert status["canary"]["status"] == "rolled_back"
    assert "the promotion was refused" in status["canary"]["history"][-1]["reason"]
    assert "approvals: 1 distinct approval(s) ['key:alice'], need 2" in status["events"][-1]["detail"]
    assert status["weights"] == {"1": 1.0}
    assert _production(reg) == (1, 1)


def test_rolling_back_a_promotion_restores_production_without_gates(reg):
    reg.approve("m", 2, actor="key:alice")
    st = _state(reg)
    st.start_canary("m", CANARY, now=T0)
    st.sync(report("r1", st.version, windows={"m": {"1": window(50), "2": window(50)}}), now=T0 + 6)
    st.tick(now=T0 + 6)
    assert st.status("m", now=T0 + 6)["canary"]["status"] == "promoted"
    assert _production(reg) == (2, 2)
    reg.set_policy("m", parse_policy({"rules": [{"rule": "approvals", "count": 9}]}), actor="t")
    st.rollback("m", now=T0 + 7)
    assert st.status("m", now=T0 + 7)["weights"] == {"1": 1.0}
    assert _production(reg) == (1, 1)


@pytest.mark.parametrize("alias, refs", [("", True), ("production", False)])
def test_no_alias_or_no_registry_variant_moves_no_alias_and_checks_no_gates(reg, alias, refs):
    st = _state(reg, alias=alias, refs=refs)
    assert st.promote("m", "2", now=T0 + 1)["weights"] == {"2": 1.0}
    assert _production(reg) == (1, 1)


def test_a_canary_of_an_archived_version_does_not_start(reg):
    reg.set_policy("m", parse_policy({"rules": []}), actor="t")
    reg.promote("m", 2, "archived", actor="t")
    with pytest.raises(PreconditionFailedError, match="m/2 is archived"):
        _state(reg).start_canary("m", CANARY, now=T0)


def test_a_swap_is_a_promotion_refused_by_the_gates_and_moving_the_alias_when_allowed(reg):
    reg.register_version("m", {"model.onnx": b"3"}, actor="t", metrics={"accuracy": 0.96})
    st = _state(reg)
    with pytest.raises(PreconditionFailedError, match="swap of 'm' refused: m/3 may not become m@production"):
        st.swap("m", {"version": "3", "ref": "m/3"}, now=T0)
    assert st.status("m", now=T0)["swap"] is None
    reg.approve("m", 3, actor="key:alice")
    st.swap("m", {"version": "3", "ref": "m/3"}, now=T0 + 1)
    st.sync(report("r1", st.version, loaded={"m": {"1": "ready", "2": "ready", "3": "ready"}}), now=T0 + 2)
    st.tick(now=T0 + 2)
    st.tick(now=T0 + 2)
    assert st.status("m", now=T0 + 2)["swap"]["phase"] == "draining"
    assert _production(reg) == (3, 3)


def test_a_swap_whose_alias_move_is_refused_when_ready_leaves_the_old_variant_serving(reg):
    reg.register_version("m", {"model.onnx": b"3"}, actor="t", metrics={"accuracy": 0.96})
    reg.approve("m", 3, actor="key:alice")
    st = _state(reg)
    st.swap("m", {"version": "3", "ref": "m/3"}, now=T0)
    reg.set_policy("m", parse_policy({"rules": [{"rule": "approvals", "count": 2}]}), actor="t")  # meanwhile
    st.sync(report("r1", st.version, loaded={"m": {"1": "ready", "2": "ready", "3": "ready"}}), now=T0 + 1)
    st.tick(now=T0 + 1)
    st.tick(now=T0 + 1)
    status = st.status("m", now=T0 + 1)
    assert status["swap"]["phase"] == "failed"
    assert "approvals" in status["swap"]["error"]
    assert status["weights"] == {"1": 1.0}
    assert _production(reg) == (1, 1)
