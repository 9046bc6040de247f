"""The Prometheus alert rules in configs/alerts/: valid for promtool, passing
their own unit tests, and naming only metrics that Flywheel really exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from _metric_names import exported_name_in_source

ROOT = Path(__file__).resolve().parents[3]
ALERTS = ROOT / "configs" / "alerts"
RULES = ALERTS / "flywheel-rules.yaml"
RULE_TESTS = ALERTS / "flywheel-rules.test.yaml"
# the rooms whose source exports metrics the rules may read
EXPORTERS = ("serving", "loops")
EXPECTED_ALERTS = {
    "FlywheelDriftDetected", "FlywheelCanaryRolledBack", "FlywheelHighErrorRate", "FlywheelP99OverSLO",
    "FlywheelTrainingJobFailed", "FlywheelLoopStuck", "FlywheelNotifyDeadLetters",
}

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian's prometheus package; `make test` installs it as root)"
)


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


@needs_promtool
def test_promtool_check_rules_passes():
    proc = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_promtool
def test_promtool_unit_tests_of_the_rules_pass():
    proc = subprocess.run([PROMTOOL, "test", "rules", RULE_TESTS.name], cwd=ALERTS, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_documented_alerts_are_all_there():
    assert {rule["alert"] for rule in rules()} == EXPECTED_ALERTS


def test_every_alert_is_tested_by_the_promtool_cases():
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    tested = {t["alertname"] for case in cases for t in case["alert_rule_test"] if t.get("exp_alerts")}
    assert tested == EXPECTED_ALERTS


@pytest.mark.parametrize("rule", rules(), ids=lambda r: f"{r['alert']}-{r['labels'].get('reason', '')}")
def test_every_alert_has_a_hold_time_a_severity_and_a_templated_text(rule):
    assert "for" in rule
    assert rule["labels"]["severity"] in ("warning", "critical")
    assert "{{ $labels." in rule["annotations"]["summary"]
    assert "{{ $labels." in rule["annotations"]["description"]


def test_every_metric_in_the_rules_is_exported_by_flywheel():
    """Renaming a metric in serving/ or loops/ without the rules fails here."""
    source = "\n".join(p.read_text() for room in EXPORTERS for p in (ROOT / room).rglob("*.py"))
    names = {n for rule in rules() for n in re.findall(r"\bflywheel_\w+", rule["expr"])}
    assert names  # the pattern found the rules' metrics
    missing = sorted(n for n in names if not exported_name_in_source(n, source))
    assert missing == []


def test_the_name_check_catches_an_unknown_metric():
    source = 'Counter("flywheel_loop_runs_finished", ...)\nout.append(f\'flywheel_requests_total{{m}} 1\')'
    assert exported_name_in_source("flywheel_loop_runs_finished_total", source)
    assert exported_name_in_source("flywheel_requests_total", source)
    assert not exported_name_in_source("flywheel_loop_runs_total", source)
    assert not exported_name_in_source("flywheel_loop_runs", source)
