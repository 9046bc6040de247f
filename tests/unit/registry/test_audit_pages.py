"""What the console reads of the registry: the audit log newest first and
filtered by action, and approvals with their comments."""

from __future__ import annotations

import pytest

from flywheel.protocol.errors import NotFoundError
from flywheel.registry import Registry


@pytest.fixture
def reg(tmp_path):
    reg = Registry.open(f"sqlite:///{tmp_path}/registry.db", str(tmp_path / "artifacts"))
    reg.register_version("m", {"a": b"1"}, actor="os:bob")
    reg.approve("m", 1, actor="key:Alice", comment="fine")
    yield reg
    reg.close()


def test_audit_reads_newest_first_and_filters_by_action(reg):
    assert [e.action for e in reg.audit(model="m", newest_first=True)] == ["approve", "register", "create_model"]
    assert [e.action for e in reg.audit(model="m")] == ["create_model", "register", "approve"]
    assert [(e.actor, e.action) for e in reg.audit(action="approve")] == [("key:alice", "approve")]
    assert [e.action for e in reg.audit(limit=1, newest_first=True)] == ["approve"]


def test_approvals_carry_their_comment(reg):
    assert [(a.actor, a.comment) for a in reg.approval_records("m", 1)] == [("key:alice", "fine")]
    with pytest.raises(NotFoundError):
        reg.approval_records("m", 9)
