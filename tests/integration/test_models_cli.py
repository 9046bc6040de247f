"""`flywheel models ...` end to end, as a user runs it (a real SQLite file)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FLYWHEEL = str(Path(sys.executable).with_name("flywheel"))


@pytest.fixture
def cli(tmp_path):
    env = {**os.environ, "FLYWHEEL_HOME": str(tmp_path / "home"), "FLYWHEEL_ACTOR": "alice"}
    (tmp_path / "m.onnx").write_bytes(b"model-bytes")

    def run(*args, actor=None, ok=True):
        e = dict(env, FLYWHEEL_ACTOR=actor) if actor else env
        proc = subprocess.run([FLYWHEEL, "models", *args], cwd=tmp_path, env=e, capture_output=True, text=True,
                              timeout=60)
        if ok:
            assert proc.returncode == 0, proc.stderr
        return proc

    return run


def test_register_promote_and_inspect(cli, tmp_path):
    cli("register", "fraud", "--artifact", "model.onnx=m.onnx", "--metric", "accuracy=0.9",
        "--data-fingerprint", "abc", "--job-id", "j1")
    cli("register", "fraud", "--artifact", "model.onnx=m.onnx", "--parent", "fraud/1", actor="bob")
    cli("promote", "fraud", "1", "staging")
    cli("promote", "fraud", "1", "production")
    models = json.loads(cli("--json", "list").stdout)
    assert models[0]["name"] == "fraud"
    assert models[0]["aliases"] == {"production": 1, "staging": 1}
    table = cli("show", "fraud").stdout
    assert "production" in table
    assert "accuracy=0.9" in table
    version = json.loads(cli("--json", "show", "fraud@production").stdout)
    assert version["version"] == 1
    assert version["lineage"]["job_id"] == "j1"
    lineage = json.loads(cli("--json", "lineage", "fraud/2").stdout)
    assert [a["version"] for a in lineage["ancestors"]] == [1]
    cli("alias", "fraud", "champion", "2")
    assert json.loads(cli("--json", "show", "fraud@champion").stdout)["version"] == 2
    audit = json.loads(cli("--json", "audit", "--model", "fraud", "--by", "bob").stdout)
    assert [e["action"] for e in audit] == ["register"]


def test_gates_refusal_and_approvals_from_the_cli(cli, tmp_path):
    (tmp_path / "policy.yaml").write_text("rules:\n  - {rule: approvals, count: 1}\n")
    cli("register", "fraud", "--artifact", "model.onnx=m.onnx")
    cli("policy", "fraud", "policy.yaml")
    cli("promote", "fraud", "1", "staging")
    refused = cli("promote", "fraud", "1", "production", ok=False)
    assert refused.returncode == 2
    assert "refused: approvals: 0 distinct approval(s) [], need 1" in refused.stderr
    cli("approve", "fraud", "1", "--comment", "ok", actor="bob")
    assert "now in production" in cli("promote", "fraud", "1", "production").stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("show", "ghost"), "unknown model 'ghost'"),
        (("register", "fraud", "--artifact", "../x=m.onnx"), "artifact name '../x'"),
        (("register", "fraud", "--artifact", "model.onnx=missing.onnx"), "is not a file"),
        (("alias", "fraud", "Bad!", "1"), "alias 'Bad!' must match"),
    ],
)
def test_bad_input_is_a_clear_error(cli, args, fragment):
    proc = cli(*args, ok=False)
    assert proc.returncode == 2
    assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr


def test_evaluations_and_an_iso_audit_window(cli, tmp_path):
    cli("register", "fraud", "--artifact", "model.onnx=m.onnx")
    assert json.loads(cli("evaluations", "fraud/1", "--json").stdout) == []
    assert cli("evaluations", "fraud").stdout.split()[:8] == [
        "id", "dataset", "fingerprint", "rows", "metrics", "run_id", "when", "by"]
    missing = cli("evaluations", "fraud/7", ok=False)
    assert missing.returncode == 2
    assert "no version 7" in missing.stderr
    since = json.loads(cli("--json", "audit", "--since", "2000-01-01T00:00:00").stdout)
    assert [e["action"] for e in since] == ["create_model", "register"]
