"""``flywheel loops``, in-process against a SQLite registry (no Ray): it lists
what the loop store holds and queues pause / resume / trigger requests as
loop events, each an audit entry under the OS user."""

from __future__ import annotations

import json

import pytest

from flywheel.cli import main
from flywheel.cli._shared import os_identity
from flywheel.registry import LoopStore, Registry

ME = os_identity()


@pytest.fixture
def loops(tmp_path, capsys):
    uri, artifacts = f"sqlite:///{tmp_path}/registry.db", str(tmp_path / "artifacts")
    store = LoopStore.open(uri)
    store.save_state("shop", "keep", {"paused": False})
    run = store.start_run("shop", "keep", "fraud", trigger="drift", reason="drift in 3 of 5", phase="training")
    store.add_event("shop", "keep", "run_started", {"trigger": "drift"}, run_id=run.id)
    store.update_run(run.id, phase="canary", detail={"version": 4})

    def cli(*args: str, rc: int = 0) -> str:
        capsys.readouterr()
        got = main(["loops", "--registry", uri, "--artifacts", artifacts, "--deployment", "shop", *args])
        out = capsys.readouterr()
        assert got == rc, out.err
        return out.out if rc == 0 else out.err

    yield cli, store, run, (uri, artifacts)
    store.close()


def test_list_shows_the_current_run_and_its_phase(loops):
    cli, _, run, _ = loops
    out = cli("list")
    assert "keep" in out
    assert run.id in out
    assert "canary" in out
    doc = json.loads(cli("list", "--json"))
    assert doc[0]["current_run"]["detail"]["version"] == 4


def test_show_prints_the_runs_timeline(loops):
    cli, _, run, _ = loops
    out = cli("show", "keep")
    assert f"timeline of {run.id}" in out
    assert "run_started" in out


def test_pause_and_trigger_are_queued_and_audited_as_the_os_user(loops):
    cli, store, _, (uri, artifacts) = loops
    assert "requested by" in cli("pause", "keep")
    cli("trigger", "keep", "--note", "new labels arrived")
    kinds = [(e.kind, e.detail["actor"]) for e in store.events("shop", "keep") if e.kind.endswith("_requested")]
    assert kinds == [("pause_requested", ME), ("trigger_requested", ME)]
    reg = Registry.open(uri, artifacts)
    try:
        assert [e.action for e in reg.audit(actor=ME)] == ["loop_pause", "loop_trigger"]
    finally:
        reg.close()


def test_an_unknown_loop_is_an_error_naming_it(loops):
    cli, _, _, _ = loops
    err = cli("pause", "nope", rc=2)
    assert "no loop 'nope'" in err
