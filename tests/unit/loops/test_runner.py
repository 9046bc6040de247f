"""The loop runner's phases against a real SQLite registry and loop store.

The training queue and the endpoint are stand-ins at their process
boundaries (a queue whose jobs the test finishes, an endpoint whose canary
the test moves), so that each phase's decision is checked on its own; the
whole loop on real Ray, real training and a real endpoint is
tests/integration/test_loop_end_to_end.py.
"""

from __future__ import annotations

import types

import pytest

from flywheel.loops.operate import list_loops, request
from flywheel.loops.runner import REPEAT_S, LoopRunner, endpoint_busy
from flywheel.loops.spec import parse_loop
from flywheel.protocol.errors import ConfigError
from flywheel.registry import LoopStore, Registry, parse_policy

JOB = {"name": "digits", "model": {"architecture": "mlp", "hparams": {}}, "dataset": {"kind": "digits"}}


class Queue:
    """Jobs by id; the test sets their end."""

    def __init__(self, registry):
        self.reg = registry
        self.jobs: dict[str, types.SimpleNamespace] = {}
        self.submitted: list[dict] = []
        self.resumed: list[str] = []

    def submit(self, spec, *, run=True):
        job_id = f"job{len(self.jobs) + 1}"
        self.jobs[job_id] = types.SimpleNamespace(id=job_id, name=spec["name"], state="running", error="",
                                                  result=None)
        self.submitted.append(spec)
        return types.SimpleNamespace(id=job_id)

    def find(self, name):
        return next((j for j in self.jobs.values() if j.name == name), None)

    def cancel(self, job_id):
        self.jobs[job_id].state = "cancelled"

    def resume(self, job_id, *, run=True):
        self.resumed.append(job_id)
        self.jobs[job_id].state = "running"

    def job(self, job_id):
        return self.jobs[job_id]

    def succeed(self, job_id, model="digits", accuracy=0.9):
        mv = self.reg.register_version(model, {"model.onnx": b"onnx"}, actor="training-job",
                                       metrics={"val_accuracy": accuracy})
        self.jobs[job_id].state = "succeeded"
        self.jobs[job_id].result = {"ref": mv.ref, "metrics": {"val_accuracy": accuracy}}
        return mv.version


class Endpoint:
    def __init__(self):
        self.variants = {"1": {"status": "ready"}}
        self.canary = None
        self.events: list[dict] = []
        self.calls: list[tuple] = []

    def status(self, endpoint):
        return {"variants": dict(self.variants), "weights": {"1": 1.0}, "canary": self.canary, "swap": None,
                "events": list(self.events)}

    def add_variant(self, endpoint, model):
        self.calls.append(("add_variant", model))
        self.variants[model["version"]] = {"status": "loading"}

    def remove_variant(self, endpoint, version):
        self.calls.append(("remove_variant", version))
        self.variants.pop(version, None)

    def start_canary(self, endpoint, canary):
        self.calls.append(("start_canary", canary))
        self.canary = {"variant": canary["variant"], "status": "running", "history": []}

    def abort_canary(self, endpoint):
        self.calls.append(("abort_canary", endpoint))
        self.canary = {**self.canary, "status": "aborted"}


class Signals:
    def __init__(self):
        self.windows = []

    def drift_windows(self, endpoint):
        return list(self.windows)

    def quality(self, endpoint, window_s):
        raise AssertionError("not used")

    def list_files(self, pattern):
        return []


class Notes:
    def __init__(self):
        self.events: list[str] = []

    def notify(self, event, payload):
        self.events.append(event)


@pytest.fixture()
def world(tmp_path):
    uri = f"sqlite:///{tmp_path / 'reg.db'}"
    reg = Registry.open(uri, str(tmp_path / "artifacts"))
    store = LoopStore.open(uri)
    reg.register_version("digits", {"model.onnx": b"v1"}, actor="t", metrics={"val_accuracy": 0.8})
    reg.promote("digits", 1, "staging", actor="t")
    reg.promote("digits", 1, "production", actor="t")
    w = types.SimpleNamespace(reg=reg, store=store, queue=Queue(reg), ep=Endpoint(), signals=Signals(),
                              notes=Notes(), evaluated=[], now=[1_000_000.0])

    def make(**spec_fields):
        spec = parse_loop({"name": "keep", "endpoint": "digits", "job": JOB,
                           "canary": {"steps": [50, 100], "hold_s": 1}, **spec_fields})

        def evaluator(model, cand, prod, job, run_id):
            w.evaluated.append((model, cand, prod, job["dataset"]))
            return {"candidate_val_accuracy": 0.9, "production_val_accuracy": 0.8}

        return LoopRunner(spec, deployment="d", store=store, registry=reg, jobs=w.queue, endpoint=w.ep,
                          signals=w.signals, evaluator=evaluator, notifier=w.notes, clock=lambda: w.now[0])

    w.make = make
    yield w
    store.close()
    reg.close()


def _trigger(w):
    w.store.save_state("d", "keep", {})
    request(w.store, w.reg, "d", "keep", "trigger", actor="os:tester")


def _run(w):
    return w.store.runs("d", "keep", limit=1)[0]


def test_a_manual_run_goes_from_job_to_promoted_canary_with_one_audit_chain(world):
    w = world
    runner = w.make()
    _trigger(w)
    runner.tick()
    run = _run(w)
    assert (run.trigger, run.phase) == ("manual", "training")
    job = w.queue.submitted[0]
    assert job["export"]["model_name"] == "digits"
    assert job["export"]["canary_url"] == ""
    runner.tick()  # the job still runs
    assert _run(w).phase == "training"
    v = w.queue.succeed(run.detail["job_id"])
    runner.tick()
    assert _run(w).phase == "evaluating"
    runner.tick()
    assert w.evaluated == [("digits", v, 1, {"kind": "digits"})]
    assert _run(w).phase == "gating"
    runner.tick()
    assert _run(w).phase == "canary"
    runner.tick()
    assert w.ep.calls[0] == ("add_variant", {"version": str(v), "ref": f"digits/{v}"})
    runner.tick()  # the variant is still loading: no canary yet
    assert len(w.ep.calls) == 1
    w.ep.variants[str(v)]["status"] = "ready"
    runner.tick()
    assert w.ep.calls[1] == ("start_canary", {"steps": [50, 100], "hold_s": 1, "variant": str(v)})
    w.ep.canary = {"variant": str(v), "status": "promoted",
                   "history": [{"action": "advance", "percent": 100}, {"action": "promote", "reason": "healthy"}]}
    runner.tick()
    run = w.store.get_run(run.id)
    assert (run.outcome, run.finished) == ("promoted", True)
    actions = [e.action for e in w.reg.audit(loop_run=run.id)]
    assert actions == ["loop_trigger", "loop_job", "loop_version", "loop_evaluation", "loop_gates", "loop_canary",
                       "loop_outcome"]
    assert w.notes.events == ["run_started", "canary_promoted", "run_finished"]


def test_a_gate_failure_refuses_the_candidate_and_says_why(world):
    w = world
    w.reg.set_policy("digits", parse_policy({"rules": [{"rule": "min", "metric": "val_accuracy", "value": 0.95}]}),
                     actor="t")
    runner = w.make()
    _trigger(w)
    runner.tick()
    w.queue.succeed(_run(w).detail["job_id"], accuracy=0.9)
    for _ in range(3):
        runner.tick()
    run = w.store.get_run(_run(w).id)
    assert run.outcome == "refused"
    assert "min: val_accuracy 0.9 < 0.95" in run.detail["outcome_reason"]
    assert "gate_refused" in w.notes.events
    assert not any(c[0] == "add_variant" for c in w.ep.calls)


def test_a_run_waits_for_approval_then_goes_on(world):
    w = world
    w.reg.set_policy("digits", parse_policy({"rules": [{"rule": "approvals", "count": 1}]}), actor="t")
    runner = w.make()
    _trigger(w)
    runner.tick()
    v = w.queue.succeed(_run(w).detail["job_id"])
    for _ in range(4):
        runner.tick()
    assert _run(w).phase == "awaiting_approval"
    assert w.notes.events.count("approval_needed") == 1
    w.reg.approve("digits", v, actor="key:alice")
    runner.tick()
    assert _run(w).phase == "canary"


def test_an_unapproved_run_ends_refused_after_the_timeout(world):
    w = world
    w.reg.set_policy("digits", parse_policy({"rules": [{"rule": "approvals", "count": 1}]}), actor="t")
    runner = w.make(approval_timeout_s=60)
    _trigger(w)
    runner.tick()
    w.queue.succeed(_run(w).detail["job_id"])
    for _ in range(4):
        runner.tick()
    assert _run(w).phase == "awaiting_approval"
    # the store stamps the phase's start with the wall clock: judge the timeout from it
    run = _run(w)
    w.now[0] = run.detail["phase_since"] + 61
    runner.tick()
    assert w.store.get_run(run.id).outcome == "refused"


def test_a_failed_job_is_resumed_once_then_the_run_fails(world):
    w = world
    runner = w.make()
    _trigger(w)
    runner.tick()
    job_id = _run(w).detail["job_id"]
    w.queue.jobs[job_id].state = "failed"
    w.queue.jobs[job_id].error = "its runner stopped"
    runner.tick()
    assert w.queue.resumed == [job_id]
    w.queue.jobs[job_id].state = "failed"
    runner.tick()
    run = w.store.get_run(_run(w).id)
    assert run.outcome == "failed"
    assert "its runner stopped" in run.detail["outcome_reason"]
    assert w.notes.events[-1] == "run_failed"


def test_a_restarted_runner_resumes_the_run_without_submitting_again(world):
    w = world
    _trigger(w)
    w.make().tick()
    run = _run(w)
    fresh = w.make()  # a new controller process: nothing but the store
    fresh.tick()
    assert len(w.queue.submitted) == 1
    w.queue.succeed(run.detail["job_id"])
    fresh.tick()
    assert w.store.get_run(run.id).phase == "evaluating"


def test_drift_fires_once_and_a_second_firing_during_the_run_is_suppressed(world):
    from flywheel.loops.triggers import DriftWindow

    w = world
    runner = w.make(triggers=[{"kind": "drift", "k": 2, "n": 3}])
    w.signals.windows = [DriftWindow(1.0, True), DriftWindow(2.0, True)]
    runner.tick()
    run = _run(w)
    assert run.trigger == "drift"
    assert "drift_detected" in w.notes.events
    w.signals.windows += [DriftWindow(3.0, True), DriftWindow(4.0, True)]
    runner.tick()
    suppressed = [e for e in w.store.events("d", "keep") if e.kind == "trigger_suppressed"]
    assert len(suppressed) == 1
    assert run.id in suppressed[0].detail["suppressed"]
    for t in (5.0, 6.0):  # fires again each time: recorded once per REPEAT_S, with the count
        w.signals.windows += [DriftWindow(t, True), DriftWindow(t + 0.5, True)]
        runner.tick()
    assert len([e for e in w.store.events("d", "keep") if e.kind == "trigger_suppressed"]) == 1
    w.now[0] += REPEAT_S + 1
    w.signals.windows += [DriftWindow(8.0, True), DriftWindow(9.0, True)]
    runner.tick()
    later = [e for e in w.store.events("d", "keep") if e.kind == "trigger_suppressed"]
    assert [e.detail["repeats_before"] for e in later] == [0, 2]


def test_pause_stops_triggers_and_resume_lets_them_fire(world):
    from flywheel.loops.triggers import DriftWindow

    w = world
    runner = w.make(triggers=[{"kind": "drift", "k": 1, "n": 1}])
    w.store.save_state("d", "keep", {})
    request(w.store, w.reg, "d", "keep", "pause", actor="os:tester")
    w.signals.windows = [DriftWindow(1.0, True)]
    runner.tick()
    assert w.store.runs("d", "keep") == []
    assert list_loops(w.store, "d")[0]["paused"] is True
    request(w.store, w.reg, "d", "keep", "resume", actor="os:tester")
    runner.tick()
    assert _run(w).trigger == "drift"
    assert [e.action for e in w.reg.audit(actor="os:tester")] == ["loop_pause", "loop_resume"]


def test_a_canary_in_progress_keeps_a_trigger_from_starting_a_run(world):
    w = world
    w.ep.canary = {"variant": "7", "status": "running", "history": []}
    runner = w.make()
    _trigger(w)
    runner.tick()
    assert w.store.runs("d", "keep") == []
    ev = [e for e in w.store.events("d", "keep") if e.kind == "trigger_suppressed"][0]
    assert "canary" in ev.detail["suppressed"]


def test_endpoint_busy_reads_canary_and_swap():
    assert endpoint_busy({"canary": {"status": "running", "variant": "3"}}) == "a canary of version 3 is in progress"
    assert endpoint_busy({"canary": {"status": "promoted"}, "swap": None}) is None


@pytest.mark.parametrize("bad, field", [
    ({"job": {"name": "x"}}, "loops.keep.job"),
    ({"canary": {"variant": "2"}}, "loops.keep.canary.variant"),
    ({"policy": {"rules": [{"rule": "bogus"}]}}, "loops.keep.policy"),
    ({"triggers": [{"kind": "cron"}]}, "kind"),
])
def test_a_bad_loop_names_the_field(bad, field):
    with pytest.raises(ConfigError) as info:
        parse_loop({"name": "keep", "endpoint": "digits", "job": JOB, **bad})
    assert field in info.value.message


def test_a_promotion_makes_the_drift_trigger_forget_earlier_windows(world):
    from flywheel.loops.triggers import DriftWindow

    w = world
    runner = w.make(triggers=[{"kind": "drift", "k": 1, "n": 5}], guards={"cooldown_s": 0})
    w.signals.windows = [DriftWindow(1.0, True)]
    runner.tick()
    run = _run(w)
    v = w.queue.succeed(run.detail["job_id"])
    for _ in range(4):
        runner.tick()
    w.ep.variants[str(v)]["status"] = "ready"
    runner.tick()
    w.signals.windows.append(DriftWindow(w.now[0] - 10, True))  # scored before the promotion
    w.ep.canary = {"variant": str(v), "status": "promoted", "history": [{"action": "promote", "reason": "ok"}]}
    runner.tick()
    assert w.store.get_run(run.id).outcome == "promoted"
    runner.tick()
    assert len(w.store.runs("d", "keep")) == 1
    w.signals.windows.append(DriftWindow(w.now[0] + 10, True))
    runner.tick()
    assert len(w.store.runs("d", "keep")) == 2


def test_a_controller_that_died_between_naming_and_submitting_finds_its_job(world):
    w = world
    _trigger(w)
    runner = w.make()
    runner.tick()
    run = _run(w)
    # as if the job id had never been written: the job is found by its name
    w.store.update_run(run.id, detail={"job_id": ""})
    w.make().tick()
    assert len(w.queue.submitted) == 1
    assert w.store.get_run(run.id).detail["job_id"] == "job1"


def _to_canary(w, runner):
    """Drive a manual run to its canary phase with the candidate added."""
    _trigger(w)
    runner.tick()
    v = w.queue.succeed(_run(w).detail["job_id"])
    for _ in range(4):
        runner.tick()
    assert _run(w).phase == "canary"
    return v


def test_cancel_during_training_cancels_the_job(world):
    w = world
    runner = w.make()
    _trigger(w)
    runner.tick()
    run = _run(w)
    request(w.store, w.reg, "d", "keep", "cancel", actor="os:tester", note="wrong data")
    runner.tick()
    done = w.store.get_run(run.id)
    assert done.outcome == "cancelled"
    assert done.detail["outcome_reason"] == "cancelled by os:tester: wrong data in phase training"
    assert w.queue.jobs[run.detail["job_id"]].state == "cancelled"


def test_cancel_during_the_canary_aborts_it_and_unloads_the_candidate(world):
    w = world
    runner = w.make()
    v = _to_canary(w, runner)
    w.ep.variants[str(v)]["status"] = "ready"
    runner.tick()
    request(w.store, w.reg, "d", "keep", "cancel", actor="os:tester")
    runner.tick()
    assert [c[0] for c in w.ep.calls][-2:] == ["abort_canary", "remove_variant"]
    assert w.store.get_run(_run(w).id).outcome == "cancelled"


def test_a_candidate_the_endpoint_dropped_ends_the_run_with_the_endpoints_reason(world):
    w = world
    runner = w.make()
    v = _to_canary(w, runner)
    runner.tick()  # seen loading
    del w.ep.variants[str(v)]
    w.ep.events = [{"time": 1.0, "kind": "variant", "detail": f"variant {v} failed to load: bad file"}]
    runner.tick()
    run = w.store.get_run(_run(w).id)
    assert run.outcome == "failed"
    assert "bad file" in run.detail["outcome_reason"]


def test_a_canary_started_by_a_lost_call_is_watched_not_started_again(world):
    w = world
    runner = w.make()
    v = _to_canary(w, runner)
    w.ep.variants[str(v)]["status"] = "ready"
    w.ep.canary = {"variant": str(v), "status": "running", "history": []}  # started; the answer was lost
    runner.tick()
    assert not any(c[0] == "start_canary" for c in w.ep.calls)
    assert _run(w).detail["canary_started"] is True


def test_a_refusal_ends_the_run_and_unloads_the_candidate(world):
    from flywheel.protocol.errors import PreconditionFailedError as Refused

    w = world
    runner = w.make()
    v = _to_canary(w, runner)
    w.ep.variants[str(v)]["status"] = "ready"

    def refuse(endpoint, canary):
        raise Refused("promotion gates refuse digits/2: min: val_accuracy 0.9 < 0.95")

    w.ep.start_canary = refuse
    runner.tick()
    run = w.store.get_run(_run(w).id)
    assert run.outcome == "refused"
    assert "min: val_accuracy" in run.detail["outcome_reason"]
    assert w.ep.calls[-1] == ("remove_variant", str(v))


def test_a_step_that_keeps_failing_transiently_ends_after_stuck_after_s(world):
    from flywheel.protocol.errors import UnavailableError

    w = world
    runner = w.make(stuck_after_s=60)
    v = _to_canary(w, runner)
    w.ep.variants[str(v)]["status"] = "ready"

    def down(endpoint, canary):
        raise UnavailableError("503: no answer")

    w.ep.start_canary = down
    for _ in range(3):
        runner.tick()
    assert _run(w).finished is False
    assert len([e for e in w.store.events("d", "keep") if e.kind == "error"]) == 1
    w.now[0] += 61
    runner.tick()
    run = w.store.get_run(_run(w).id)
    assert run.outcome == "failed"
    assert "still failing after" in run.detail["outcome_reason"]


def test_an_unknown_endpoint_status_keeps_a_trigger_from_starting_a_run(world):
    from flywheel.protocol.errors import UnavailableError

    w = world

    def down(endpoint):
        raise UnavailableError("no answer")

    w.ep.status = down
    runner = w.make()
    _trigger(w)
    runner.tick()
    assert w.store.runs("d", "keep") == []
    ev = [e for e in w.store.events("d", "keep") if e.kind == "trigger_suppressed"][0]
    assert "status is unavailable" in ev.detail["suppressed"]


def test_a_second_firing_in_the_same_tick_is_recorded_as_suppressed(world):
    from flywheel.loops.triggers import DriftWindow

    w = world
    runner = w.make(triggers=[{"kind": "drift", "k": 1, "n": 1}])
    w.signals.windows = [DriftWindow(1.0, True)]
    _trigger(w)  # a manual request and a drift firing in one tick
    runner.tick()
    assert _run(w).trigger == "manual"
    ev = [e for e in w.store.events("d", "keep") if e.kind == "trigger_suppressed"]
    assert [e.detail["trigger"] for e in ev] == ["drift"]


def test_the_loop_policy_reaches_a_model_its_first_job_registers(tmp_path):
    uri = f"sqlite:///{tmp_path / 'reg.db'}"
    reg, store = Registry.open(uri, str(tmp_path / "a")), LoopStore.open(uri)
    queue = Queue(reg)
    spec = parse_loop({"name": "keep", "endpoint": "fresh", "job": JOB, "data": {"captured": False},
                       "policy": {"rules": [{"rule": "min", "metric": "val_accuracy", "value": 0.95}]}})
    runner = LoopRunner(spec, deployment="d", store=store, registry=reg, jobs=queue, endpoint=Endpoint(),
                        signals=Signals(), evaluator=lambda *a: {}, clock=lambda: 1.0)
    runner.ensure_policy()  # nothing registered yet: nothing to set
    store.save_state("d", "keep", {})
    request(store, reg, "d", "keep", "trigger", actor="os:tester")
    runner.tick()
    queue.succeed(_run_of(store).detail["job_id"], model="fresh", accuracy=0.9)
    for _ in range(3):
        runner.tick()
    run = _run_of(store)
    assert run.outcome == "refused"
    assert "min: val_accuracy 0.9 < 0.95" in run.detail["outcome_reason"]
    store.close()
    reg.close()


def _run_of(store):
    return store.runs("d", "keep", limit=1)[0]


def test_a_captured_dataset_is_frozen_at_submission():
    from flywheel.loops.runner import captured_dataset

    got = captured_dataset({"kind": "digits", "validation_fraction": 0.1}, path="/c", endpoint="e", since=5.0,
                           fraction=0.4)
    assert got["kind"] == "captured"
    assert got["since"] == 5.0
    assert got["until"] > got["since"]
    assert got["mix"] == {"kind": "digits", "validation_fraction": 0.1}
    assert got["validation_fraction"] == 0.1
