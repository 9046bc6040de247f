"""The training job queue, run against SQLite and a real PostgreSQL."""

from __future__ import annotations

import threading

import pytest

from flywheel.registry.db import connect
from flywheel.protocol.errors import (
    AlreadyExistsError,
    InvalidInputError,
    NotFoundError,
    PreconditionFailedError,
)
from flywheel.training.jobs import JobStore
from flywheel.training.spec import parse_spec, spec_to_dict


class Clock:
    """A settable wall clock, shared by the stores of one test."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(store_uri, clock):
    s = JobStore.open(store_uri, clock=clock)
    yield s
    s.close()


def _spec(name="job", workers=1, cpus=1.0, gpus=0.0):
    return spec_to_dict(parse_spec({
        "name": name, "model": {"architecture": "mlp"},
        "resources": {"workers": workers, "cpus_per_worker": cpus, "gpus_per_worker": gpus},
    }))


def _submit(store, name="job", priority=0, **resources):
    return store.submit(_spec(name, **resources), name=name, priority=priority, storage=f"/ckpt/{name}")


def test_submit_get_and_list(store, clock):
    a = _submit(store, "a")
    clock.now += 1
    b = _submit(store, "b", priority=3)
    assert len(a.id) == 12
    assert int(a.id, 16) >= 0
    assert (a.state, a.attempts, a.runner, a.started_at, a.heartbeat_at, a.cancel_requested) == (
        "queued", 0, "", None, None, False)
    assert a.spec == _spec("a")
    assert a.storage == "/ckpt/a"
    assert a.result == {}
    assert a.error == ""
    assert store.get(a.id) == a
    assert [j.name for j in store.list()] == ["b", "a"]  # newest first
    assert store.list(["running"]) == []
    assert [j.id for j in store.list(("queued",))] == [b.id, a.id]
    with pytest.raises(NotFoundError, match="nope42"):
        store.get("nope42")
    with pytest.raises(InvalidInputError, match="paused"):
        store.list(["paused"])


def test_submit_with_an_id_and_bad_input(store):
    job = store.submit(_spec(), name="job", priority=0, storage="", job_id="resume-me")
    assert job.id == "resume-me"
    with pytest.raises(AlreadyExistsError, match="resume-me"):
        store.submit(_spec(), name="job", priority=0, storage="", job_id="resume-me")
    with pytest.raises(InvalidInputError, match="job id"):
        store.submit(_spec(), name="job", priority=0, storage="", job_id="../escape")
    with pytest.raises(InvalidInputError, match="job name"):
        store.submit(_spec(), name="bad name", priority=0, storage="")
    with pytest.raises(InvalidInputError, match="priority"):
        store.submit(_spec(), name="job", priority=2**40, storage="")
    with pytest.raises(InvalidInputError, match="resources"):
        store.submit({"resources": {"workers": 0}}, name="job", priority=0, storage="")


def test_claims_follow_priority_then_submission_order(store):
    # One clock reading for all: submission order must still decide ties.
    low1, high1, low2, high2 = (_submit(store, n, p) for n, p in [("low1", 0), ("high1", 5), ("low2", 0), ("high2", 5)])
    claimed = [store.claim_next("r1") for _ in range(4)]
    assert [j.id for j in claimed] == [high1.id, high2.id, low1.id, low2.id]
    for j in claimed:
        assert j.state == "running", j.name
        assert j.runner == "r1", j.name
        assert j.attempts == 1, j.name
    assert claimed[0].started_at == claimed[0].heartbeat_at == store.get(high1.id).heartbeat_at
    assert store.claim_next("r1") is None


def test_a_job_that_does_not_fit_is_skipped_for_one_that_does(store):
    big = _submit(store, "big", priority=9, workers=4, cpus=1.0)
    gpu = _submit(store, "gpu", priority=5, workers=2, cpus=0.5, gpus=1.0)
    small = _submit(store, "small", priority=0, workers=2, cpus=0.25)
    assert store.claim_next("r", free_cpus=2.0, free_gpus=1.0).id == small.id
    assert store.claim_next("r", free_cpus=2.0, free_gpus=1.0) is None
    assert store.claim_next("r", free_cpus=1.0, free_gpus=2.0).id == gpu.id
    assert store.claim_next("r", free_cpus=3.99) is None
    assert store.claim_next("r", free_cpus=None, free_gpus=0.0).id == big.id  # None: CPUs not checked


def test_fractional_resources_fit_exactly(store):
    job = _submit(store, "frac", workers=4, cpus=0.1)  # 4 * 0.1 = 0.4000000000000001
    assert store.claim_next("r", free_cpus=0.4).id == job.id


def test_concurrent_claimers_never_share_a_job(store_uri):
    seed = JobStore.open(store_uri)
    ids = {_submit(seed, f"j{i}", priority=i % 3).id for i in range(24)}
    claimed: dict[str, list[str]] = {"A": [], "B": [], "C": []}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(claimed))

    def claimer(runner: str) -> None:
        s = JobStore.open(store_uri)  # its own connection, like another scheduler process
        try:
            barrier.wait()
            while (job := s.claim_next(runner)) is not None:
                claimed[runner].append(job.id)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            s.close()

    threads = [threading.Thread(target=claimer, args=(r,)) for r in claimed]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    everything = [i for got in claimed.values() for i in got]
    assert sorted(everything) == sorted(ids)  # each job exactly once
    for runner, got in claimed.items():
        assert all(seed.get(i).runner == runner for i in got)
    seed.close()


def test_cancel_queued_running_and_terminal(store, clock):
    running = _submit(store, "r")
    clock.now += 1
    queued = _submit(store, "q")
    assert store.claim_next("r1").id == running.id  # the older one
    cancelled = store.request_cancel(queued.id)
    assert (cancelled.state, cancelled.finished_at, cancelled.cancel_requested) == ("cancelled", clock.now, True)
    assert store.claim_next("r1") is None

    asked = store.request_cancel(running.id)
    assert (asked.state, asked.cancel_requested) == ("running", True)
    assert store.request_cancel(running.id).cancel_requested  # repeating it is harmless
    clock.now += 5
    assert store.heartbeat(running.id, "r1") is False  # the runner is told to stop ...
    assert store.get(running.id).heartbeat_at == clock.now  # ... and does not look stale meanwhile
    assert store.stale(1.0) == []
    done = store.finish(running.id, "cancelled", error="cancelled by request")
    assert (done.state, done.error, done.finished_at) == ("cancelled", "cancelled by request", clock.now)

    for job_id in (queued.id, running.id):
        with pytest.raises(PreconditionFailedError, match="already cancelled"):
            store.request_cancel(job_id)
    with pytest.raises(NotFoundError, match="no training job 'missing'"):
        store.request_cancel("missing")


def test_heartbeat_is_refused_to_other_and_finished_runners(store):
    job = _submit(store)
    assert store.heartbeat(job.id, "r1") is False  # queued: nobody runs it
    store.claim_next("r1")
    assert store.heartbeat(job.id, "r1") is True
    assert store.heartbeat(job.id, "r2") is False
    assert store.heartbeat("missing", "r1") is False
    store.finish(job.id, "succeeded", result={"val_accuracy": 0.97, "version": "digits/3"})
    assert store.heartbeat(job.id, "r1") is False


def test_finish(store):
    job = _submit(store)
    with pytest.raises(InvalidInputError, match="succeeded, failed, cancelled"):
        store.finish(job.id, "running")
    store.claim_next("r1")
    with pytest.raises(PreconditionFailedError, match="not running under runner 'r2'"):
        store.finish(job.id, "succeeded", runner="r2")
    done = store.finish(job.id, "failed", error="worker 1 died 3 times", runner="r1")
    assert (done.state, done.error, done.result) == ("failed", "worker 1 died 3 times", {})
    with pytest.raises(PreconditionFailedError, match="already failed"):
        store.finish(job.id, "succeeded")


def test_requeue(store, clock):
    a, b = _submit(store, "a"), _submit(store, "b")
    store.claim_next("r1")
    store.finish(a.id, "failed", error="boom")
    again = store.requeue(a.id)
    assert (again.id, again.storage, again.state, again.attempts, again.error, again.runner) == (
        a.id, a.storage, "queued", 1, "", "")
    assert again.submitted_at == a.submitted_at
    assert again.finished_at is None
    assert store.requeue(a.id) == again  # queued: as it is
    second = store.claim_next("r2")
    assert (second.id, second.attempts, second.runner) == (a.id, 2, "r2")

    store.request_cancel(b.id)
    assert store.requeue(b.id).state == "queued"
    assert not store.get(b.id).cancel_requested

    store.finish(a.id, "succeeded")
    with pytest.raises(PreconditionFailedError, match="succeeded"):
        store.requeue(a.id)


def test_a_runner_hands_its_job_back_and_the_next_claim_resumes_it(store):
    a, _ = _submit(store, "a", priority=5), _submit(store, "b")
    assert store.claim_next("r1").id == a.id
    with pytest.raises(PreconditionFailedError, match="not running under runner 'r2'"):
        store.release(a.id, "r2")
    back = store.release(a.id, "r1")
    assert (back.state, back.runner, back.attempts, back.storage) == ("queued", "", 1, a.storage)
    again = store.claim_next("r2")  # still first in line
    assert (again.id, again.attempts, again.runner) == (a.id, 2, "r2")
    with pytest.raises(PreconditionFailedError):
        store.release(a.id, "r1")
    store.request_cancel(a.id)  # asked while it was stopping: it ends cancelled, not queued
    assert store.release(a.id, "r2").state == "cancelled"


def test_stale_running_jobs_are_found_and_requeued(store, clock):
    dead, alive = _submit(store, "dead"), _submit(store, "alive")
    store.claim_next("r-dead")
    store.claim_next("r-alive")
    clock.now += 30
    assert store.heartbeat(alive.id, "r-alive")
    assert store.stale(60) == []
    clock.now += 45
    assert [j.id for j in store.stale(60)] == [dead.id]  # 75 s without a heartbeat; alive: 45 s
    with pytest.raises(PreconditionFailedError, match="running under runner 'r-alive'"):
        store.requeue(alive.id, stale_after_s=60)
    with pytest.raises(PreconditionFailedError, match="stale_after_s"):
        store.requeue(dead.id)
    store.requeue(dead.id, stale_after_s=60)
    assert store.heartbeat(dead.id, "r-dead") is False  # the old runner learns it lost the job
    taken = store.claim_next("r-new")
    assert (taken.id, taken.attempts) == (dead.id, 2)
    assert store.heartbeat(dead.id, "r-dead") is False
    with pytest.raises(PreconditionFailedError):
        store.finish(dead.id, "failed", runner="r-dead")


def test_a_queued_job_with_a_cancel_request_is_cancelled_when_reached(store, store_uri):
    doomed, next_one = _submit(store, "doomed", priority=1), _submit(store, "next")
    db = connect(store_uri)  # as an older writer could have left it
    db.execute("UPDATE training_jobs SET cancel_requested = 1 WHERE id = ?", (doomed.id,))
    db.close()
    assert store.claim_next("r1").id == next_one.id
    assert store.get(doomed.id).state == "cancelled"


def test_another_store_sees_everything(store, store_uri, clock):
    a = _submit(store, "a", priority=2)
    b = _submit(store, "b")
    store.claim_next("r1")
    store.heartbeat(a.id, "r1")
    store.request_cancel(b.id)
    other = JobStore.open(store_uri, clock=clock)  # a new process's view
    assert other.list() == store.list()
    assert other.get(a.id).runner == "r1"
    assert other.get(b.id).state == "cancelled"
    assert other.heartbeat(a.id, "r1") is True
    other.finish(a.id, "succeeded", result={"metrics": {"loss": 0.1}})
    assert store.get(a.id).result == {"metrics": {"loss": 0.1}}
    other.close()
