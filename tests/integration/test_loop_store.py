"""The loops' durable state on both registry databases (SQLite, and the
tests' own PostgreSQL server): one run per endpoint at a time, phases and
details that a restarted controller reads back, events in order."""

from __future__ import annotations

import pytest

from flywheel.protocol.errors import NotFoundError, PreconditionFailedError
from flywheel.registry import LoopStore

pytestmark = pytest.mark.integration


def test_runs_state_and_events_round_trip(store_uri):
    store = LoopStore.open(store_uri)
    try:
        store.save_state("shop", "keep", {"paused": True, "triggers": {"drift:ab": {"since": 3.5}}})
        assert store.load_state("shop", "keep")["triggers"]["drift:ab"]["since"] == 3.5
        assert [lp for _, lp, _, _ in store.loops("shop")] == ["keep"]
        run = store.start_run("shop", "keep", "fraud", trigger="drift", reason="3 of 5", phase="training")
        with pytest.raises(PreconditionFailedError, match=run.id):
            store.start_run("shop", "other", "fraud", trigger="manual", reason="", phase="training")
        store.update_run(run.id, phase="canary", detail={"version": 4})
        again = LoopStore.open(store_uri)  # another process: what a restarted controller sees
        try:
            got = again.runs("shop", "keep", unfinished=True)[0]
            assert (got.phase, got.detail["version"]) == ("canary", 4)
        finally:
            again.close()
        done = store.update_run(run.id, outcome="promoted", finish=True)
        assert done.finished
        with pytest.raises(PreconditionFailedError, match="already finished"):
            store.update_run(run.id, phase="training")
        store.start_run("shop", "keep", "fraud", trigger="manual", reason="next", phase="training")
        store.add_event("shop", "keep", "run_started", {"n": 1}, run_id=run.id)
        store.add_event("shop", "keep", "trigger_suppressed", {"n": 2})
        events = store.events("shop", "keep")
        assert [(e.kind, e.run_id) for e in events] == [("run_started", run.id), ("trigger_suppressed", "")]
        assert [e.kind for e in store.events("shop", "keep", after_id=events[0].id)] == ["trigger_suppressed"]
        with pytest.raises(NotFoundError):
            store.get_run("nope")
    finally:
        store.close()
