"""The registry's store suite, run against SQLite and a real PostgreSQL."""

from __future__ import annotations

import multiprocessing as mp
import os
import sqlite3
import time

import numpy as np
import psycopg
import pytest

from flywheel.registry import Lineage, Registry, fingerprint_arrays, parse_policy
from flywheel.registry.db import connect
from flywheel.registry.migrations import LATEST, current_version, migrate
from flywheel.protocol.errors import (
    AlreadyExistsError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    PreconditionFailedError,
)


@pytest.fixture
def reg(store_uri, tmp_path):
    r = Registry.open(store_uri, str(tmp_path / "artifacts"), cache_dir=str(tmp_path / "cache"))
    yield r
    r.close()


def _v(reg, name="fraud", data=b"onnx-bytes", actor="alice", **kw):
    return reg.register_version(name, {"model.onnx": data}, actor=actor, **kw)


def test_models_and_versions(reg):
    reg.create_model("fraud", description="card fraud", tags={"team": "risk"}, actor="alice")
    with pytest.raises(AlreadyExistsError, match="already registered"):
        reg.create_model("fraud", actor="bob")
    v1 = _v(reg, metrics={"accuracy": 0.9}, params={"lr": 0.1}, signature={"inputs": []})
    v2 = _v(reg, data=b"other")
    assert (v1.version, v2.version) == (1, 2)
    assert v1.metrics == {"accuracy": 0.9}
    assert v1.params == {"lr": 0.1}
    assert v1.stage == "none"
    import hashlib

    assert v1.artifacts["model.onnx"].sha256 == hashlib.sha256(b"onnx-bytes").hexdigest()
    assert reg.read_artifact("fraud/1", "model.onnx") == b"onnx-bytes"
    m = reg.get_model("fraud")
    assert m.description == "card fraud"
    assert m.tags == {"team": "risk"}
    assert m.latest_version == 2
    assert [x.version for x in reg.list_versions("fraud")] == [1, 2]
    assert reg.resolve("fraud").version == 2
    assert [x.name for x in reg.list_models()] == ["fraud"]


@pytest.mark.parametrize("damage", ["tamper", "truncate"])
def test_damaged_artifact_is_refused(reg, damage):
    mv = _v(reg, data=b"x" * 1000)
    path = mv.artifacts["model.onnx"].uri
    with open(path, "r+b") as f:
        if damage == "tamper":
            f.seek(10)
            f.write(b"y")
        else:
            f.truncate(500)
    with pytest.raises(IntegrityError, match="integrity check"):
        reg.read_artifact("fraud/1", "model.onnx")
    with pytest.raises(IntegrityError, match="integrity check"):
        reg.artifact_path("fraud/1", "model.onnx")


def test_memory_artifact_store(store_uri, tmp_path):
    r = Registry.open(store_uri, "memory://fw-test-artifacts", cache_dir=str(tmp_path / "cache"))
    mv = _v(r, data=b"in-memory")
    assert mv.artifacts["model.onnx"].uri.startswith("memory://")
    assert r.read_artifact("fraud/1", "model.onnx") == b"in-memory"
    _, local = r.artifact_path("fraud/1", "model.onnx")
    assert open(local, "rb").read() == b"in-memory"
    r.close()


def test_lineage_queries(reg):
    data = fingerprint_arrays(np.arange(10))
    lin = Lineage(data_fingerprint=data, code_commit="abc123", code_dirty=True,
                  training_config={"epochs": 3}, job_id="job-7")
    _v(reg, lineage=lin)
    reg.promote("fraud", 1, "staging", actor="alice")
    reg.promote("fraud", 1, "production", actor="alice")
    _v(reg, name="fraud-int8", lineage=Lineage(parent="fraud/1"))
    _v(reg, name="fraud-mobile", lineage=Lineage(parent="fraud-int8/1"))
    report = reg.lineage("fraud@production")
    assert report.version.lineage == lin
    assert report.version.created_by == "alice"
    assert reg.lineage("fraud-mobile/1").ancestors[0].ref == "fraud-int8/1"
    assert [a.ref for a in reg.lineage("fraud-mobile/1").ancestors] == ["fraud-int8/1", "fraud/1"]
    assert [v.ref for v in reg.trained_from(data)] == ["fraud/1"]
    assert [v.ref for v in reg.derivatives("fraud", 1)] == ["fraud-int8/1", "fraud-mobile/1"]
    with pytest.raises(NotFoundError, match="'nope"):
        _v(reg, name="x", lineage=Lineage(parent="nope/1"))


def test_evaluations_round_trip(reg):
    data = fingerprint_arrays(np.arange(10))
    _v(reg)
    _v(reg, data=b"2")
    big = 5_000_000_000  # past 32 bits: rows is a BIGINT
    e1 = reg.add_evaluation("fraud", 1, dataset="s3://b/holdout/", fingerprint=data,
                            metrics={"accuracy": 0.1 + 0.2, "loss": 1e-300}, rows=big, run_id="r-1", actor="batch")
    e2 = reg.add_evaluation("fraud", 1, dataset="/mnt/holdout", fingerprint=data, metrics={"accuracy": 0.95},
                            rows=10, run_id="r-2", actor="batch")
    e3 = reg.add_evaluation("fraud", 2, dataset="s3://b/holdout/", fingerprint=data, metrics={}, rows=0,
                            run_id="r-3", actor="carol")
    assert e1.id < e2.id < e3.id
    assert reg.evaluations("fraud", 1) == [e1, e2]  # floats and the timestamp round-trip exactly
    assert reg.evaluations("fraud", 1)[0].rows == big
    assert reg.evaluations("fraud", 1, dataset="s3://b/holdout/") == [e1]
    assert reg.evaluations("fraud", dataset=data) == [e1, e2, e3]
    assert reg.evaluated_on(data) == [e1, e2, e3]
    assert reg.lineage("fraud/1").evaluations == [e1, e2]
    evaluate_entries = [e for e in reg.audit(model="fraud") if e.action == "evaluate"]
    assert [e.after["run_id"] for e in evaluate_entries] == ["r-1", "r-2", "r-3"]
    reg.set_policy("fraud", parse_policy({"rules": [
        {"rule": "evaluated_on", "dataset": data, "metric": "accuracy", "min": 0.9}]}), actor="alice")
    assert reg.check_gates("fraud", 1) == []  # the newest, r-2, decides
    assert reg.check_gates("fraud", 2) == [
        f"evaluated_on: metric 'accuracy' is missing from the newest evaluation on dataset {data!r} (run r-3)"]
    reg.delete_version("fraud", 1, actor="alice")
    assert reg.evaluated_on(data) == [e3]
    with pytest.raises(NotFoundError, match="no version 1"):
        reg.add_evaluation("fraud", 1, dataset="d", fingerprint=data, metrics={}, rows=1, run_id="r", actor="x")


def test_aliases_move_atomically(reg):
    _v(reg)
    _v(reg, data=b"2")
    reg.set_alias("fraud", "champion", 1, actor="alice")
    assert reg.resolve("fraud@champion").version == 1
    reg.set_alias("fraud", "champion", 2, actor="bob")
    assert reg.resolve("fraud@champion").version == 2
    assert reg.get_model("fraud").aliases == {"champion": 2}
    with pytest.raises(InvalidInputError, match="alias"):
        reg.set_alias("fraud", "Bad Alias!", 1, actor="alice")
    with pytest.raises(NotFoundError, match="no alias 'nope'"):
        reg.resolve("fraud@nope")
    reg.delete_alias("fraud", "champion", actor="alice")
    assert reg.get_model("fraud").aliases == {}


def test_stage_machine_and_rollback(reg):
    for data in (b"1", b"2"):
        _v(reg, data=data)
    with pytest.raises(PreconditionFailedError, match="stage 'none'"):
        reg.promote("fraud", 1, "production", actor="alice")
    reg.promote("fraud", 1, "staging", actor="alice")
    reg.promote("fraud", 1, "production", actor="alice")
    reg.promote("fraud", 2, "staging", actor="alice")
    reg.promote("fraud", 2, "production", actor="bob")
    assert reg.get_version("fraud", 1).stage == "archived"
    assert reg.resolve("fraud@production").version == 2
    back = reg.rollback("fraud", actor="carol")
    assert back.version == 1
    assert back.stage == "production"
    assert reg.get_version("fraud", 2).stage == "archived"
    assert reg.resolve("fraud@production").version == 1
    with pytest.raises(InvalidInputError, match="stage 'live'"):
        reg.promote("fraud", 1, "live", actor="alice")


def test_gates_refuse_with_numbers_then_pass(reg):
    _v(reg, metrics={"accuracy": 0.95, "p99_ms": 10})
    reg.promote("fraud", 1, "staging", actor="alice")
    reg.promote("fraud", 1, "production", actor="alice")
    reg.set_policy("fraud", parse_policy({"rules": [
        {"rule": "required_metrics", "metrics": ["accuracy", "p99_ms"]},
        {"rule": "not_worse_than_production", "metric": "accuracy", "tolerance": 0.005},
        {"rule": "max", "metric": "p99_ms", "value": 20},
        {"rule": "approvals", "count": 2},
    ]}), actor="alice")
    _v(reg, data=b"2", metrics={"accuracy": 0.93, "p99_ms": 25})
    reg.promote("fraud", 2, "staging", actor="alice")
    with pytest.raises(PreconditionFailedError) as info:
        reg.promote("fraud", 2, "production", actor="alice")
    msg = info.value.message
    assert "accuracy 0.93 < production 0.95 - tolerance 0.005 = 0.945" in msg
    assert "p99_ms 25 > 20" in msg
    assert "0 distinct approval(s)" in msg
    assert reg.get_version("fraud", 2).stage == "staging"  # nothing changed
    _v(reg, data=b"3", metrics={"accuracy": 0.947, "p99_ms": 12})
    reg.promote("fraud", 3, "staging", actor="alice")
    reg.approve("fraud", 3, actor="bob")
    with pytest.raises(AlreadyExistsError, match="bob already approved fraud/3"):
        reg.approve("fraud", 3, actor="bob")
    assert reg.check_gates("fraud", 3) == ["approvals: 1 distinct approval(s) ['bob'], need 2"]
    reg.approve("fraud", 3, actor="carol", comment="looks good")
    assert reg.promote("fraud", 3, "production", actor="alice").stage == "production"


def test_audit_log_records_everything_and_cannot_be_edited(reg, store_uri):
    t0 = time.time()
    reg.create_model("fraud", actor="alice")
    _v(reg, actor="bob")
    reg.set_alias("fraud", "champion", 1, actor="carol")
    reg.set_tag("fraud", 1, "owner", "risk", actor="alice")
    reg.approve("fraud", 1, actor="dave")
    reg.promote("fraud", 1, "staging", actor="alice")
    reg.delete_alias("fraud", "champion", actor="alice")
    _v(reg, data=b"2", actor="bob")
    reg.delete_version("fraud", 2, actor="erin")
    entries = reg.audit(model="fraud")
    actions = [e.action for e in entries]
    assert actions == ["create_model", "register", "alias", "tag", "approve", "stage", "alias",
                       "delete_alias", "register", "delete_version"]
    alias = entries[2]
    assert (alias.actor, alias.before, alias.after) == ("carol", {"alias": "champion", "version": None},
                                                        {"alias": "champion", "version": 1})
    assert [e.action for e in reg.audit(actor="bob")] == ["register", "register"]
    assert reg.audit(since=time.time() + 60) == []
    assert len(reg.audit(since=t0, until=time.time())) == len(entries)
    assert not hasattr(reg, "delete_audit")
    db = connect(store_uri)
    # the trigger's RAISE: an integrity error in SQLite, a raised exception in PostgreSQL
    refused = {"sqlite": sqlite3.IntegrityError, "postgresql": psycopg.errors.RaiseException}[db.dialect]
    with pytest.raises(refused, match="append-only"):
        db.execute("UPDATE audit SET actor = 'mallory'")
    with pytest.raises(refused, match="append-only"):
        db.execute("DELETE FROM audit")
    db.close()


def test_bad_input_leaves_nothing_half_written(reg):
    with pytest.raises(InvalidInputError, match="artifact name '../evil'"):
        reg.register_version("fraud", {"../evil": b"x"}, actor="alice")
    with pytest.raises(InvalidInputError, match="metrics is"):
        reg.register_version("fraud", {"m": b"x"}, actor="alice", metrics={f"k{i}": 1.0 for i in range(10000)})
    with pytest.raises(InvalidInputError, match="model name"):
        reg.register_version("bad name", {"m": b"x"}, actor="alice")
    with pytest.raises(NotFoundError, match="unknown model 'ghost'"):
        reg.get_model("ghost")
    assert reg.list_models() == []  # nothing was created by the refused calls
    assert reg.audit() == []
    _v(reg)
    with pytest.raises(NotFoundError, match="no version 9"):
        reg.get_version("fraud", 9)
    with pytest.raises(InvalidInputError, match="lineage.parent"):
        _v(reg, lineage=Lineage(parent="fraud"))
    assert [v.version for v in reg.list_versions("fraud")] == [1]


def _register_many(uri: str, artifacts: str, n: int, out) -> None:
    r = Registry.open(uri, artifacts)
    got = [r.register_version("race", {"m": os.urandom(8)}, actor=f"p{os.getpid()}").version for _ in range(n)]
    out.put(got)
    r.close()


def test_concurrent_writers_get_distinct_consecutive_versions(store_uri, tmp_path):
    artifacts = str(tmp_path / "artifacts")
    Registry.open(store_uri, artifacts).create_model("race", actor="setup")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_register_many, args=(store_uri, artifacts, 5, out)) for _ in range(8)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    versions = sorted(v for r in results for v in r)
    assert versions == list(range(1, 41))
    assert [v.version for v in Registry.open(store_uri, artifacts).list_versions("race")] == versions


def test_opening_an_older_schema_upgrades_it(store_uri, tmp_path):
    db = connect(store_uri)
    assert migrate(db, target=1) == 1
    db.execute("INSERT INTO registered_models (name, description, tags, next_version, policy, created_at, created_by) "
               "VALUES ('old', '', '{}', 1, NULL, 0, 'v1-user')")
    missing = {"sqlite": sqlite3.OperationalError, "postgresql": psycopg.errors.UndefinedTable}[db.dialect]
    with pytest.raises(missing, match="approvals"):  # the v2 table is not there yet
        db.execute("SELECT * FROM approvals")
    db.close()
    r = Registry.open(store_uri, str(tmp_path / "artifacts"))
    assert current_version(connect(store_uri)) == LATEST == 8
    assert r.get_model("old").created_by == "v1-user"
    _v(r, name="old")
    r.approve("old", 1, actor="bob")  # the v2 table works
    r.add_evaluation("old", 1, dataset="/data/holdout", fingerprint="f" * 64, metrics={"accuracy": 0.9}, rows=1,
                     run_id="r-1", actor="bob")  # the v6 table works
    r.record("loop:keep", "loop_trigger", "old", detail={"why": "drift"}, loop_run="run-1")  # v8: loop runs
    assert [e.action for e in r.audit(loop_run="run-1")] == ["loop_trigger"]
    assert {e.loop_run for e in r.audit(model="old")} == {"", "run-1"}
    r.close()


def test_sqlite_uses_wal(tmp_path):
    Registry.open(str(tmp_path / "r.db"), str(tmp_path / "a"))
    mode = sqlite3.connect(tmp_path / "r.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_router_state_is_saved_replaced_and_forgotten_per_deployment(store_uri):
    from flywheel.registry import RouterStateStore

    store = RouterStateStore.open(store_uri)
    try:
        store.save("d1", "digits", {"policy": {"kind": "fixed", "weights": {"1": 1.0}}, "events": []})
        store.save("d1", "digits", {"policy": {"kind": "ucb1"}, "events": [{"kind": "policy"}]})
        store.save("d1", "other", {"n": 1})
        store.save("d2", "digits", {"n": 2})
        again = RouterStateStore.open(store_uri)  # another process's view
        assert again.load("d1") == {"digits": {"policy": {"kind": "ucb1"}, "events": [{"kind": "policy"}]},
                                    "other": {"n": 1}}
        again.delete("d1", "other")
        assert set(again.load("d1")) == {"digits"}
        again.delete("d1")
        assert again.load("d1") == {}
        assert again.load("d2") == {"digits": {"n": 2}}
        again.close()
    finally:
        store.close()
