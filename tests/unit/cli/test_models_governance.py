"""``flywheel models`` governance, in-process against a SQLite registry in
tmp_path (no Ray): the alias and promote paths to production pass the gates
or are refused naming the rule, approvals are recorded as the OS user, and
the audit log filters by loop run."""

from __future__ import annotations

import json

import pytest

from flywheel.cli import main
from flywheel.cli._shared import os_identity
from flywheel.registry import Registry, parse_policy

ME = os_identity().lower()


@pytest.fixture
def models(tmp_path, capsys):
    """Runs ``flywheel models ... ARGS`` on a registry holding fraud/1 and
    fraud/2 under a policy that wants one approval; returns stdout (or
    stderr, when ``rc`` is the expected non-zero exit status)."""
    uri, artifacts = f"sqlite:///{tmp_path}/registry.db", str(tmp_path / "artifacts")
    reg = Registry.open(uri, artifacts, cache_dir=str(tmp_path / "cache"))
    try:
        reg.register_version("fraud", {"model.onnx": b"1"}, actor="alice", metrics={"accuracy": 0.9})
        reg.register_version("fraud", {"model.onnx": b"2"}, actor="alice", metrics={"accuracy": 0.91})
        reg.set_policy("fraud", parse_policy({"rules": [{"rule": "approvals", "count": 1}]}), actor="alice")
        reg.record("loop", "loop_trigger", "fraud", detail={"why": "drift"}, loop_run="run-7")
    finally:
        reg.close()

    def run(*args: str, rc: int = 0) -> str:
        capsys.readouterr()
        got = main(["models", "--registry", uri, "--artifacts", artifacts, *args])
        captured = capsys.readouterr()
        assert got == rc, captured.err
        return captured.out if rc == 0 else captured.err

    def production() -> tuple[list[int], int | None]:
        versions = json.loads(run("show", "fraud", "--json"))
        alias = json.loads(run("list", "--json"))[0]["aliases"].get("production")
        return [v["version"] for v in versions if v["stage"] == "production"], alias

    run.production = production
    return run


def test_alias_and_promote_to_production_are_refused_naming_the_rule(models):
    err = models("alias", "fraud", "production", "1", rc=2)
    assert "approvals: 0 distinct approval(s) [], need 1" in err
    models("promote", "fraud", "1", "staging")
    assert "approvals: 0 distinct" in models("promote", "fraud", "1", "production", rc=2)
    assert models.production() == ([], None)


def test_an_approval_is_the_os_user_and_opens_the_gate_for_the_alias_path(models):
    assert models("approve", "fraud", "2", "--comment", "looked at it") == f"{ME} approved fraud/2\n"
    assert "already approved" in models("approve", "fraud", "2", rc=2)
    assert models("alias", "fraud", "production", "2") == "fraud@production -> 2\n"
    assert models.production() == ([2], 2)
    entry = json.loads(models("audit", "--model", "fraud", "--json"))
    approve = next(e for e in entry if e["action"] == "approve")
    assert approve["actor"] == ME
    err = models("alias", "fraud", "production", "--delete", rc=2)
    assert "would make them disagree" in err
    assert models.production() == ([2], 2)


def test_approve_refuses_an_actor_naming_someone_else(models):
    err = models("--actor", "mallory", "approve", "fraud", "1", rc=2)
    assert f"approvals are recorded as the OS user running the command ({ME})" in err
    assert "--actor 'mallory' cannot name the approver" in err
    assert "approvals: 0 distinct" in models("alias", "fraud", "production", "1", rc=2)


def test_rollback_restores_a_named_former_production_version_without_gates(models):
    models("approve", "fraud", "1")
    models("approve", "fraud", "2")
    models("alias", "fraud", "production", "1")
    models("alias", "fraud", "production", "2")
    assert "fraud/1 is in production again" in models("rollback", "fraud", "--to", "1")
    assert models.production() == ([1], 1)


def test_audit_filters_by_loop_run_and_shows_the_column(models):
    lines = models("audit", "--loop-run", "run-7").splitlines()
    assert lines[0].split()[:7] == ["id", "time", "actor", "action", "model", "version", "loop_run"]
    assert len(lines) == 3  # header, dashes, one entry
    assert "run-7" in lines[2].split()
    listed = json.loads(models("audit", "--loop-run", "run-7", "--json"))
    assert [(e["action"], e["loop_run"]) for e in listed] == [("loop_trigger", "run-7")]
    assert json.loads(models("audit", "--loop-run", "other", "--json")) == []


def test_an_approval_cannot_take_another_name_from_the_environment(models, monkeypatch):
    monkeypatch.setenv("USER", "mallory")
    monkeypatch.setenv("LOGNAME", "mallory")
    assert models("approve", "fraud", "2") == f"{ME} approved fraud/2\n"
