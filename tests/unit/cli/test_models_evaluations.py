"""``flywheel models evaluations`` and the evaluations in ``models lineage``,
run in-process against a SQLite registry in tmp_path (no Ray)."""

from __future__ import annotations

import json

import pytest

from flywheel.cli import build_parser, main
from flywheel.registry import Registry

HOLDOUT = "s3://b/holdout/"
FP = "0123456789abcdef" * 4


@pytest.fixture
def models(tmp_path, capsys):
    """Runs ``flywheel models ... ARGS`` on a registry holding fraud/1 with two
    evaluations (one on the holdout set, one on other data); returns stdout
    (or stderr, when ``rc`` is the expected non-zero exit status)."""
    uri, artifacts = f"sqlite:///{tmp_path}/registry.db", str(tmp_path / "artifacts")
    reg = Registry.open(uri, artifacts, cache_dir=str(tmp_path / "cache"))
    try:
        reg.register_version("fraud", {"model.onnx": b"m"}, actor="alice")
        reg.add_evaluation("fraud", 1, dataset=HOLDOUT, fingerprint=FP, metrics={"accuracy": 0.93}, rows=1000,
                           run_id="r-1", actor="batch")
        reg.add_evaluation("fraud", 1, dataset="/data/train", fingerprint="f" * 64, metrics={"accuracy": 0.99},
                           rows=50, run_id="r-2", actor="batch")
    finally:
        reg.close()

    def run(*args: str, rc: int = 0) -> str:
        capsys.readouterr()
        got = main(["models", "--registry", uri, "--artifacts", artifacts, *args])
        captured = capsys.readouterr()
        assert got == rc, captured.err
        return captured.out if rc == 0 else captured.err

    return run


def test_table_lists_the_versions_evaluations(models):
    lines = models("evaluations", "fraud/1").splitlines()
    assert lines[0].split() == ["id", "dataset", "fingerprint", "rows", "metrics", "run_id", "when", "by"]
    assert len(lines) == 4  # header, dashes, two evaluations
    first = lines[2].split()
    assert first[:6] == ["1", HOLDOUT, FP[:12], "1000", "accuracy=0.93", "r-1"]
    assert first[-1] == "batch"


@pytest.mark.parametrize("dataset", [HOLDOUT, FP])
def test_dataset_filter_by_string_or_fingerprint(models, dataset):
    listed = json.loads(models("evaluations", "fraud", "--dataset", dataset, "--json"))
    assert [e["run_id"] for e in listed] == ["r-1"]
    assert listed[0]["fingerprint"] == FP
    assert listed[0]["metrics"] == {"accuracy": 0.93}


@pytest.mark.parametrize("argv", [["evaluations", "fraud/1", "--json"], ["--json", "evaluations", "fraud/1"]])
def test_json_on_either_side(models, argv):
    assert [e["id"] for e in json.loads(models(*argv))] == [1, 2]


def test_json_flag_parses_on_either_side():
    parser = build_parser()
    assert parser.parse_args(["models", "evaluations", "fraud/1", "--json"]).json is True
    assert parser.parse_args(["models", "--json", "evaluations", "fraud/1"]).json is True
    assert parser.parse_args(["models", "evaluations", "fraud/1"]).json is False


def test_lineage_shows_the_evaluations(models):
    text = models("lineage", "fraud/1")
    assert "evaluations of fraud/1:" in text
    assert "accuracy=0.93" in text
    report = json.loads(models("--json", "lineage", "fraud/1"))
    assert [e["run_id"] for e in report["evaluations"]] == ["r-1", "r-2"]


def test_unknown_version_is_a_clear_error(models):
    err = models("evaluations", "fraud/9", rc=2)
    assert "model 'fraud' has no version 9" in err
    assert "Traceback" not in err


def test_audit_since_takes_an_iso_time(models):
    entries = json.loads(models("audit", "--since", "2000-01-01T00:00:00", "--json"))
    assert [e["action"] for e in entries] == ["create_model", "register", "evaluate", "evaluate"]
    assert json.loads(models("audit", "--since", "2999-01-01", "--json")) == []
