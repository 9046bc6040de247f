from __future__ import annotations

import subprocess

import numpy as np
import pytest

from flywheel.registry import code_version, fingerprint_arrays, fingerprint_files, load_policy, parse_policy
from flywheel.registry.gates import GateContext, evaluate
from flywheel.protocol.errors import ConfigError


def test_policy_yaml_loads_into_typed_rules(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("rules:\n  - {rule: min, metric: accuracy, value: 0.9}\n  - {rule: approvals, count: 2}\n")
    policy = load_policy(f)
    assert [type(r).__name__ for r in policy.rules] == ["MinRule", "ApprovalsRule"]


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"rules": [{"rule": "bogus"}]}, "bogus"),
        ({"rules": [{"rule": "min", "metric": "a"}]}, "value"),
        ({"rules": [{"rule": "approvals", "count": "two"}]}, "$.rules[0].count"),
    ],
)
def test_invalid_policy_names_the_field(data, fragment):
    with pytest.raises(ConfigError) as info:
        parse_policy(data)
    assert fragment in info.value.message


def test_lower_is_better_rule_and_first_production():
    policy = parse_policy({"rules": [
        {"rule": "not_worse_than_production", "metric": "loss", "tolerance": 0.1, "higher_is_better": False}]})
    ctx = GateContext({"loss": 0.5}, {"loss": 0.3}, frozenset())
    assert evaluate(policy, ctx) == ["not_worse_than_production: loss 0.5 > production 0.3 + tolerance 0.1 = 0.4"]
    assert evaluate(policy, GateContext({"loss": 0.5}, None, frozenset())) == []


def test_fingerprints_are_stable_and_content_sensitive(tmp_path):
    a = np.arange(6, dtype=np.float32)
    assert fingerprint_arrays(a) == fingerprint_arrays(a.copy())
    assert fingerprint_arrays(a) != fingerprint_arrays(a.reshape(2, 3))
    (tmp_path / "x.csv").write_text("1,2\n")
    (tmp_path / "y.csv").write_text("3,4\n")
    files = [tmp_path / "y.csv", tmp_path / "x.csv"]
    first = fingerprint_files(files)
    assert first == fingerprint_files(reversed(files))
    (tmp_path / "x.csv").write_text("1,3\n")
    assert fingerprint_files(files) != first


def test_code_version_reads_git(tmp_path):
    assert code_version(tmp_path) == ("", False)
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "f").write_text("a")
    subprocess.run(["git", "add", "f"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "x"], cwd=tmp_path, check=True)
    commit, dirty = code_version(tmp_path)
    assert len(commit) == 40
    assert dirty is False
    (tmp_path / "f").write_text("b")
    assert code_version(tmp_path) == (commit, True)


def test_example_policy_preset_is_valid():
    from pathlib import Path

    policy = load_policy(Path(__file__).resolve().parents[3] / "configs" / "policy-example.yaml")
    assert len(policy.rules) == 4
