"""Evaluation records: a version's metrics on a dataset, their audit entry,
lineage, and the evaluated_on promotion gate (a SQLite registry in tmp_path)."""

from __future__ import annotations

import math

import pytest

from flywheel.protocol.errors import ConfigError, InvalidInputError, NotFoundError, PreconditionFailedError
from flywheel.registry import Evaluation, Lineage, Registry, load_policy, parse_policy
from flywheel.registry.gates import EvaluatedOnRule, GateContext, evaluate

HOLDOUT = "s3://b/holdout/"
FP = "a" * 64
OTHER_FP = "b" * 64


@pytest.fixture
def reg(tmp_path):
    r = Registry.open(f"sqlite:///{tmp_path}/registry.db", str(tmp_path / "artifacts"),
                      cache_dir=str(tmp_path / "cache"))
    r.register_version("fraud", {"model.onnx": b"v1"}, actor="alice")
    r.register_version("fraud", {"model.onnx": b"v2"}, actor="alice")
    yield r
    r.close()


def _eval(reg, version=1, *, dataset=HOLDOUT, fingerprint=FP, metrics=None, rows=1000, run_id="r-1",
          actor="batch"):
    return reg.add_evaluation("fraud", version, dataset=dataset, fingerprint=fingerprint,
                              metrics={"accuracy": 0.93} if metrics is None else metrics, rows=rows,
                              run_id=run_id, actor=actor)


# -- records ------------------------------------------------------------------
def test_add_returns_the_stored_record(reg):
    e = _eval(reg, metrics={"accuracy": 0.93, "n_errors": 7})
    assert isinstance(e, Evaluation)
    assert (e.model, e.version, e.dataset, e.fingerprint) == ("fraud", 1, HOLDOUT, FP)
    assert e.metrics == {"accuracy": 0.93, "n_errors": 7.0}
    assert type(e.metrics["n_errors"]) is float
    assert (e.rows, e.run_id, e.created_by) == (1000, "r-1", "batch")
    assert reg.evaluations("fraud", 1) == [e]


def test_list_is_oldest_first_and_per_version(reg):
    first = _eval(reg, run_id="r-1")
    second = _eval(reg, run_id="r-2")
    other = _eval(reg, version=2, run_id="r-3")
    assert [e.run_id for e in reg.evaluations("fraud", 1)] == ["r-1", "r-2"]
    assert reg.evaluations("fraud", 2) == [other]
    assert reg.evaluations("fraud") == [first, second, other]


def test_dataset_filter_matches_the_string_or_the_fingerprint(reg):
    on_holdout = _eval(reg, run_id="r-1")
    _eval(reg, dataset="/data/train", fingerprint=OTHER_FP, run_id="r-2")
    same_data_elsewhere = _eval(reg, dataset="/mnt/holdout-copy", fingerprint=FP, run_id="r-3")
    assert reg.evaluations("fraud", 1, dataset=HOLDOUT) == [on_holdout]
    assert reg.evaluations("fraud", 1, dataset=FP) == [on_holdout, same_data_elsewhere]
    assert reg.evaluations("fraud", 1, dataset="s3://b/nothing/") == []


def test_evaluated_on_finds_every_version_on_that_data(reg):
    reg.register_version("churn", {"model.onnx": b"c"}, actor="alice")
    _eval(reg, version=2, run_id="r-1")
    _eval(reg, version=1, run_id="r-2")
    reg.add_evaluation("churn", 1, dataset="/data/holdout", fingerprint=FP, metrics={}, rows=5, run_id="r-3",
                       actor="bob")
    _eval(reg, fingerprint=OTHER_FP, run_id="r-4")
    assert [(e.model, e.version, e.run_id) for e in reg.evaluated_on(FP)] == [
        ("churn", 1, "r-3"), ("fraud", 1, "r-2"), ("fraud", 2, "r-1")]
    assert reg.evaluated_on("c" * 64) == []


def test_add_writes_an_audit_entry(reg):
    _eval(reg, metrics={"accuracy": 0.9}, rows=12, run_id="r-9", actor="batch")
    entry = reg.audit(model="fraud")[-1]
    assert (entry.action, entry.actor, entry.version, entry.before) == ("evaluate", "batch", 1, None)
    assert entry.after == {"dataset": HOLDOUT, "fingerprint": FP, "metrics": {"accuracy": 0.9}, "rows": 12,
                           "run_id": "r-9"}


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"dataset": ""}, "dataset must be a non-empty string"),
        ({"dataset": "  "}, "dataset must be a non-empty string"),
        ({"fingerprint": ""}, "fingerprint must be a non-empty string"),
        ({"metrics": {"accuracy": math.nan}}, r"metrics\['accuracy'\] must be a finite number, got nan"),
        ({"metrics": {"loss": math.inf}}, r"metrics\['loss'\] must be a finite number"),
        ({"metrics": {"accuracy": "0.9"}}, r"metrics\['accuracy'\] must be a finite number"),
        ({"metrics": {"ok": True}}, r"metrics\['ok'\] must be a finite number"),
        ({"metrics": {"": 1.0}}, "metrics: name '' must be a non-empty string"),
        ({"rows": -1}, "rows must be a non-negative integer"),
        ({"rows": 2.5}, "rows must be a non-negative integer"),
        ({"run_id": None}, "run_id must be a string"),
    ],
)
def test_invalid_input_names_the_field_and_records_nothing(reg, change, fragment):
    before = len(reg.audit())
    with pytest.raises(InvalidInputError, match=fragment):
        _eval(reg, **change)
    assert reg.evaluations("fraud") == []
    assert len(reg.audit()) == before


def test_unknown_model_or_version_is_not_found(reg):
    with pytest.raises(NotFoundError, match="no version 9"):
        _eval(reg, version=9)
    with pytest.raises(NotFoundError, match="unknown model 'ghost'"):
        reg.add_evaluation("ghost", 1, dataset=HOLDOUT, fingerprint=FP, metrics={}, rows=1, run_id="r",
                           actor="batch")
    with pytest.raises(NotFoundError, match="no version 9"):
        reg.evaluations("fraud", 9)
    with pytest.raises(NotFoundError, match="unknown model 'ghost'"):
        reg.evaluations("ghost")


def test_deleting_a_version_deletes_its_evaluations(reg):
    _eval(reg, version=1)
    kept = _eval(reg, version=2)
    reg.delete_version("fraud", 1, actor="alice")
    assert reg.evaluated_on(FP) == [kept]
    assert reg.evaluations("fraud") == [kept]


def test_lineage_carries_the_versions_own_evaluations(reg):
    reg.register_version("fraud-int8", {"model.onnx": b"q"}, actor="alice", lineage=Lineage(parent="fraud/1"))
    on_parent = _eval(reg, version=1)
    on_child = reg.add_evaluation("fraud-int8", 1, dataset=HOLDOUT, fingerprint=FP, metrics={"accuracy": 0.92},
                                  rows=1000, run_id="r-q", actor="batch")
    assert reg.lineage("fraud/1").evaluations == [on_parent]
    report = reg.lineage("fraud-int8/1")
    assert report.evaluations == [on_child]
    assert [a.ref for a in report.ancestors] == ["fraud/1"]
    assert reg.lineage("fraud/2").evaluations == []


# -- the evaluated_on gate rule ---------------------------------------------------
def _record(i, *, dataset=HOLDOUT, fingerprint=FP, metrics=None, run_id=None):
    return Evaluation(i, "fraud", 1, dataset, fingerprint, {"accuracy": 0.95} if metrics is None else metrics,
                      100, f"r-{i}" if run_id is None else run_id, 1000.0 + i, "batch")


def _check(rule: dict, *evaluations: Evaluation) -> list[str]:
    return evaluate(parse_policy({"rules": [{"rule": "evaluated_on", **rule}]}),
                    GateContext({}, None, frozenset(), tuple(evaluations)))


def test_rule_parses_from_yaml(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(f"rules:\n  - {{rule: evaluated_on, dataset: '{HOLDOUT}', metric: accuracy, min: 0.9}}\n")
    (rule,) = load_policy(f).rules
    assert rule == EvaluatedOnRule(dataset=HOLDOUT, metric="accuracy", min=0.9)


def test_rule_passes_on_an_evaluation_by_dataset_or_fingerprint():
    assert _check({"dataset": HOLDOUT}, _record(1)) == []
    assert _check({"dataset": FP}, _record(1, dataset="/mnt/elsewhere")) == []


def test_rule_fails_without_an_evaluation_on_that_dataset():
    expected = [f"evaluated_on: no evaluation on dataset {HOLDOUT!r}"]
    assert _check({"dataset": HOLDOUT}) == expected
    assert _check({"dataset": HOLDOUT}, _record(1, dataset="/data/train", fingerprint=OTHER_FP)) == expected


def test_rule_bounds_the_metric_with_its_numbers():
    low = _record(1, metrics={"accuracy": 0.81}, run_id="r-123")
    assert _check({"dataset": HOLDOUT, "metric": "accuracy", "min": 0.9}, low) == [
        f"evaluated_on: accuracy 0.81 < 0.9 on dataset {HOLDOUT!r} (run r-123)"]
    slow = _record(1, metrics={"p99_ms": 31.5}, run_id="r-7")
    assert _check({"dataset": HOLDOUT, "metric": "p99_ms", "max": 20}, slow) == [
        f"evaluated_on: p99_ms 31.5 > 20 on dataset {HOLDOUT!r} (run r-7)"]
    assert _check({"dataset": HOLDOUT, "metric": "accuracy", "min": 0.9, "max": 1.0}, _record(1)) == []


def test_rule_fails_when_the_newest_evaluation_lacks_the_metric():
    assert _check({"dataset": HOLDOUT, "metric": "f1", "min": 0.5}, _record(4)) == [
        f"evaluated_on: metric 'f1' is missing from the newest evaluation on dataset {HOLDOUT!r} (run r-4)"]


def test_the_newest_evaluation_on_the_dataset_decides():
    good, bad = _record(1, metrics={"accuracy": 0.95}), _record(2, metrics={"accuracy": 0.85})
    rule = {"dataset": HOLDOUT, "metric": "accuracy", "min": 0.9}
    assert _check(rule, good, bad) == [f"evaluated_on: accuracy 0.85 < 0.9 on dataset {HOLDOUT!r} (run r-2)"]
    assert _check(rule, bad, _record(3, metrics={"accuracy": 0.91})) == []
    # a newer evaluation on other data does not count
    assert _check(rule, good, _record(5, dataset="/other", fingerprint=OTHER_FP, metrics={"accuracy": 0.1})) == []


@pytest.mark.parametrize(
    "rule, fragment",
    [
        ({"dataset": HOLDOUT, "metric": "accuracy"}, "metric 'accuracy' needs a min and/or a max"),
        ({"dataset": HOLDOUT, "min": 0.9}, "min/max need the metric they bound"),
        ({"dataset": HOLDOUT, "max": 0.9}, "min/max need the metric they bound"),
        ({"dataset": ""}, "dataset must be a non-empty"),
        ({"dataset": HOLDOUT, "metric": "accuracy", "min": 0.9, "max": 0.5}, "min 0.9 > max 0.5"),
        ({"dataset": HOLDOUT, "metric": "accuracy", "min": math.nan}, "min must be a finite number"),
        ({"metric": "accuracy", "min": 0.9}, "dataset"),
        ({"dataset": HOLDOUT, "minimum": 0.9}, "minimum"),
    ],
)
def test_invalid_rule_is_a_config_error_at_parse_time(rule, fragment):
    with pytest.raises(ConfigError, match="invalid gate policy") as info:
        parse_policy({"rules": [{"rule": "evaluated_on", **rule}]})
    assert fragment in info.value.message
    assert "$.rules[0]" in info.value.message


def test_existing_gate_context_callers_need_no_evaluations():
    assert GateContext({"a": 1.0}, None, frozenset()).evaluations == ()


# -- through promote() -------------------------------------------------------------
def test_promote_is_refused_until_the_version_is_evaluated(reg):
    reg.set_policy("fraud", parse_policy({"rules": [
        {"rule": "evaluated_on", "dataset": HOLDOUT, "metric": "accuracy", "min": 0.9}]}), actor="alice")
    reg.promote("fraud", 1, "staging", actor="alice")
    with pytest.raises(PreconditionFailedError, match=f"no evaluation on dataset '{HOLDOUT}'"):
        reg.promote("fraud", 1, "production", actor="alice")
    _eval(reg, metrics={"accuracy": 0.81}, run_id="r-123")
    with pytest.raises(PreconditionFailedError, match=r"accuracy 0.81 < 0.9 .* \(run r-123\)"):
        reg.promote("fraud", 1, "production", actor="alice")
    assert reg.get_version("fraud", 1).stage == "staging"
    _eval(reg, metrics={"accuracy": 0.94}, run_id="r-124")
    assert reg.check_gates("fraud", 1) == []
    assert reg.promote("fraud", 1, "production", actor="alice").stage == "production"


def test_another_versions_evaluation_does_not_open_the_gate(reg):
    reg.set_policy("fraud", parse_policy({"rules": [{"rule": "evaluated_on", "dataset": FP}]}), actor="alice")
    _eval(reg, version=1)
    assert reg.check_gates("fraud", 1) == []
    assert reg.check_gates("fraud", 2) == [f"evaluated_on: no evaluation on dataset {FP!r}"]


def test_policy_with_the_rule_survives_storage(reg):
    policy = parse_policy({"rules": [{"rule": "evaluated_on", "dataset": HOLDOUT, "metric": "accuracy",
                                      "min": 0.9}, {"rule": "evaluated_on", "dataset": FP}]})
    reg.set_policy("fraud", policy, actor="alice")
    assert reg.get_policy("fraud") == policy
