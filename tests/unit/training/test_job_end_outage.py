"""A job's end while the registry's database is unreachable: recorded once it
is back, not turned into a failure; given up only when the scheduler stops."""

from __future__ import annotations

import threading

import msgspec
import pytest

from flywheel.common import load_settings
from flywheel.registry.db import DatabaseUnreachable
from flywheel.training import api
from flywheel.training.api import TrainingRuntime


class FlakyFinish:
    """store.finish failing as an unreachable database ``outages`` times."""

    def __init__(self, finish, outages: int) -> None:
        self._finish, self.outages, self.calls = finish, outages, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls <= self.outages:
            raise DatabaseUnreachable("registry database postgresql://h/db is unreachable: refused")
        return self._finish(*args, **kwargs)


@pytest.fixture
def runtime(tmp_path, monkeypatch):
    monkeypatch.setattr(api, "FINISH_RETRY_S", 0.01)
    settings = msgspec.structs.replace(load_settings(), home=str(tmp_path), registry_uri=f"sqlite:///{tmp_path}/r.db",
                                       artifacts_uri=str(tmp_path / "art"))
    rt = TrainingRuntime(settings)
    yield rt
    rt.store.close()


def _running(rt: TrainingRuntime):
    rt.submit({"name": "j", "model": {"architecture": "mlp"}}, run=False)
    return rt.store.claim_next(rt.runner_id)


def test_the_end_of_a_job_is_recorded_once_the_database_is_back(runtime):
    rec = _running(runtime)
    flaky = FlakyFinish(runtime.store.finish, outages=3)
    runtime.store.finish = flaky
    runtime._finish(rec, threading.Event(), "succeeded", result={"accuracy": 0.9})
    assert flaky.calls == 4
    done = runtime.store.get(rec.id)
    assert done.state == "succeeded" and done.result == {"accuracy": 0.9}


def test_a_scheduler_that_stops_gives_up_and_leaves_the_job_to_the_stale_check(runtime):
    rec = _running(runtime)
    runtime.store.finish = FlakyFinish(runtime.store.finish, outages=10**6)
    stop = threading.Event()
    stop.set()
    runtime._finish(rec, stop, "succeeded", result={})
    assert runtime.store.get(rec.id).state == "running"
