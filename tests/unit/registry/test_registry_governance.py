"""Governance through the Python API: every way to move production passes the
gates or is refused naming the rule, stage and alias never disagree, and an
approving identity counts once (a SQLite registry in tmp_path)."""

from __future__ import annotations

import pytest

from flywheel.protocol.errors import AlreadyExistsError, InvalidInputError, PreconditionFailedError
from flywheel.registry import Registry, parse_policy
from flywheel.registry.registry import identity

FP = "f" * 64
OTHER_FP = "e" * 64


@pytest.fixture
def reg(tmp_path):
    r = Registry.open(f"sqlite:///{tmp_path}/registry.db", str(tmp_path / "artifacts"),
                      cache_dir=str(tmp_path / "cache"))
    for acc in (0.90, 0.85, 0.95):
        r.register_version("fraud", {"model.onnx": f"v{acc}".encode()}, actor="alice", metrics={"accuracy": acc})
    yield r
    r.close()


def _policy(reg, *rules):
    reg.set_policy("fraud", parse_policy({"rules": list(rules)}), actor="alice")


def _agree(reg) -> int | None:
    """The production version, asserting that stage and alias name the same one."""
    staged = [v.version for v in reg.list_versions("fraud") if v.stage == "production"]
    alias = reg.get_model("fraud").aliases.get("production")
    assert len(staged) <= 1, staged
    assert (staged[0] if staged else None) == alias, (staged, alias)
    return alias


def test_set_alias_production_passes_the_gates_and_moves_the_stage(reg):
    _policy(reg, {"rule": "approvals", "count": 1})
    with pytest.raises(PreconditionFailedError, match=r"approvals: 0 distinct approval\(s\) \[\], need 1"):
        reg.set_alias("fraud", "production", 1, actor="mallory")
    assert _agree(reg) is None
    reg.approve("fraud", 1, actor="os:bob")
    reg.set_alias("fraud", "production", 1, actor="alice")
    assert reg.get_version("fraud", 1).stage == "production"
    assert _agree(reg) == 1
    assert reg.production_version("fraud") == 1


def test_the_alias_path_and_promote_refuse_the_same_failed_rule(reg):
    reg.set_alias("fraud", "production", 1, actor="alice")  # no policy yet: nothing to pass
    _policy(reg, {"rule": "not_worse_than_production", "metric": "accuracy"})
    reg.promote("fraud", 2, "staging", actor="alice")
    for move in (lambda: reg.set_alias("fraud", "production", 2, actor="alice"),
                 lambda: reg.promote("fraud", 2, "production", actor="alice")):
        with pytest.raises(PreconditionFailedError, match=r"not_worse_than_production: accuracy 0.85 < production 0.9"):
            move()
        assert _agree(reg) == 1
    reg.set_alias("fraud", "production", 3, actor="alice")
    assert _agree(reg) == 3
    assert reg.get_version("fraud", 1).stage == "archived"


def test_other_aliases_stay_plain_pointers(reg):
    _policy(reg, {"rule": "approvals", "count": 3})
    reg.set_alias("fraud", "champion", 2, actor="alice")
    assert reg.resolve("fraud@champion").version == 2
    assert reg.get_version("fraud", 2).stage == "none"
    reg.delete_alias("fraud", "champion", actor="alice")


def test_the_production_alias_cannot_be_deleted_while_a_version_is_in_production(reg):
    reg.promote("fraud", 1, "staging", actor="alice")
    reg.promote("fraud", 1, "production", actor="alice")
    with pytest.raises(PreconditionFailedError, match="would make them disagree; archive it instead"):
        reg.delete_alias("fraud", "production", actor="alice")
    assert _agree(reg) == 1
    reg.promote("fraud", 1, "archived", actor="alice")  # out of production: the alias goes with it
    assert _agree(reg) is None
    assert [e.action for e in reg.audit(model="fraud")][-2:] == ["stage", "delete_alias"]


def test_an_archived_version_comes_back_only_by_rollback(reg):
    reg.set_alias("fraud", "production", 1, actor="alice")
    reg.set_alias("fraud", "production", 3, actor="alice")
    with pytest.raises(PreconditionFailedError, match="is archived: bring it back with `rollback`"):
        reg.set_alias("fraud", "production", 1, actor="alice")
    _policy(reg, {"rule": "approvals", "count": 5})  # rollback is the emergency exit: no gates
    assert reg.rollback("fraud", actor="oncall", to=1).version == 1
    assert _agree(reg) == 1
    with pytest.raises(PreconditionFailedError, match="fraud/2 was never in production"):
        reg.rollback("fraud", actor="oncall", to=2)
    assert reg.rollback("fraud", actor="oncall", to=1).version == 1  # already there: nothing moves
    assert _agree(reg) == 1


def test_stage_and_alias_agree_after_every_operation(reg):
    steps = [
        lambda: reg.set_alias("fraud", "production", 1, actor="a"),
        lambda: reg.promote("fraud", 2, "staging", actor="a"),
        lambda: reg.promote("fraud", 2, "production", actor="a"),
        lambda: reg.set_alias("fraud", "production", 2, actor="a"),  # already there
        lambda: reg.rollback("fraud", actor="a"),
        lambda: reg.set_alias("fraud", "production", 3, actor="a"),
        lambda: reg.delete_version("fraud", 2, actor="a"),
        lambda: reg.rollback("fraud", actor="a"),
        lambda: reg.promote("fraud", 1, "archived", actor="a"),
        lambda: reg.register_version("fraud", {"model.onnx": b"v4"}, actor="a", metrics={"accuracy": 0.99}),
        lambda: reg.set_alias("fraud", "production", 4, actor="a"),
        lambda: reg.set_alias("fraud", "staging", 4, actor="a"),
    ]
    refused = [
        lambda: reg.delete_alias("fraud", "production", actor="a"),
        lambda: reg.delete_version("fraud", 4, actor="a"),
        lambda: reg.set_alias("fraud", "production", 3, actor="a"),  # archived by now
    ]
    seen = []
    for step in steps:
        step()
        seen.append(_agree(reg))
    assert seen == [1, 1, 2, 2, 1, 3, 3, 1, None, None, 4, 4]
    for step in refused:
        with pytest.raises(PreconditionFailedError):
            step()
        assert _agree(reg) == 4


def test_one_identity_counts_once(reg):
    _policy(reg, {"rule": "approvals", "count": 2})
    reg.approve("fraud", 1, actor="key:alice")
    with pytest.raises(AlreadyExistsError, match="key:alice already approved fraud/1; an identity counts once"):
        reg.approve("fraud", 1, actor="  KEY:Alice ")
    assert reg.check_gates("fraud", 1) == ["approvals: 1 distinct approval(s) ['key:alice'], need 2"]
    reg.approve("fraud", 1, actor="os:alice")  # another way of authenticating: another identity
    assert reg.approvals("fraud", 1) == ["key:alice", "os:alice"]
    assert reg.check_gates("fraud", 1) == []
    with pytest.raises(InvalidInputError, match="non-empty identity"):
        reg.approve("fraud", 1, actor="   ")


def test_identity_normalises_case_and_whitespace():
    assert identity("  Key:Alice \t Smith ") == "key:alice smith"


def test_not_worse_compares_the_newest_common_evaluation_dataset(reg):
    reg.set_alias("fraud", "production", 1, actor="alice")
    _policy(reg, {"rule": "not_worse_than_production", "metric": "accuracy"})
    # by training metrics 3 (0.95) beats 1 (0.90); on the same held-out data it does not
    assert reg.check_gates("fraud", 3) == []
    reg.add_evaluation("fraud", 1, dataset="old-holdout", fingerprint=OTHER_FP, metrics={"accuracy": 0.5},
                       rows=10, run_id="r0", actor="loop")
    reg.add_evaluation("fraud", 1, dataset="holdout", fingerprint=FP, metrics={"accuracy": 0.92},
                       rows=100, run_id="r1", actor="loop")
    reg.add_evaluation("fraud", 3, dataset="holdout", fingerprint=FP, metrics={"accuracy": 0.91},
                       rows=100, run_id="r1", actor="loop")
    assert reg.check_gates("fraud", 3) == [
        "not_worse_than_production: accuracy 0.91 < production 0.92 - tolerance 0 = 0.92 "
        f"on dataset 'holdout' (fingerprint {FP[:12]})"]
    with pytest.raises(PreconditionFailedError, match="on dataset 'holdout'"):
        reg.set_alias("fraud", "production", 3, actor="alice")
    # a newer common dataset decides
    reg.add_evaluation("fraud", 3, dataset="old-holdout", fingerprint=OTHER_FP, metrics={"accuracy": 0.6},
                       rows=10, run_id="r2", actor="loop")
    assert reg.check_gates("fraud", 3) == []
