"""Training jobs on real Ray Train (the session's Ray, 2 CPU workers): DDP and
FSDP runs that lose a worker process and finish exactly like uninterrupted
runs, the priority queue, a job resumed after the process running it died,
a job that cannot get its CPUs, and what lands in the registry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest

from flywheel.registry import Registry
from flywheel.common.settings import load_settings
from flywheel.training.api import JobFailedError, TrainingRuntime
from flywheel.training.checkpoint import CheckpointStore
from flywheel.training.loop import job_paths

from _poll import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]

FLYWHEEL = str(Path(sys.executable).with_name("flywheel"))


def spec(name: str, **over) -> dict:
    base = {
        "name": name,
        "model": {"architecture": "mlp", "hparams": {"in_features": 64, "hidden": [32], "out_features": 10}},
        "strategy": "ddp",
        "resources": {"workers": 2, "cpus_per_worker": 1.0, "wait_s": 60},
        "epochs": 3, "batch_size": 64, "seed": 7,
        "optimizer": {"name": "adamw", "lr": 0.01},
        "schedule": {"kind": "cosine"},
        "checkpoint": {"every_steps": 10, "every_epochs": 1, "keep": 2},
        "max_failures": 2,
    }
    for key, value in over.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and key in base else value
    return base


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    home = tmp_path_factory.mktemp("train-home")
    settings = msgspec.structs.replace(
        load_settings(), home=str(home), registry_uri=f"sqlite:///{home}/registry.db",
        artifacts_uri=str(home / "artifacts"), ray_address="",
    )
    rt = TrainingRuntime(settings, stale_s=6.0)
    yield rt
    rt.close()


def _final_weights(job) -> dict:
    return CheckpointStore(job_paths(job.status().storage)["checkpoints"]).latest().model


def _same_run(reference, faulted) -> None:
    a, b = _final_weights(reference), _final_weights(faulted)
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert worst <= 1e-6, worst
    ma, mb = reference.metrics(), faulted.metrics()
    assert [m["epoch"] for m in mb] == [1, 2, 3]
    for x, y in zip(ma, mb):
        for key in ("loss", "val_loss", "val_accuracy"):
            assert abs(x[key] - y[key]) <= 1e-6, (key, x, y)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_killed_worker_resumes_from_the_last_checkpoint_and_ends_like_an_uninterrupted_run(runtime, strategy):
    reference = runtime.submit(spec(f"ref-{strategy}", strategy=strategy))
    assert reference.wait(300).state == "succeeded", reference.logs()
    # same spec and seed; worker 1 dies (os._exit) at step 35, after the step-30 checkpoint
    faulted = runtime.submit(spec(f"fault-{strategy}", strategy=strategy, fault={"kill_rank": 1, "at_step": 35}))
    rec = faulted.wait(300)
    assert rec.state == "succeeded", faulted.logs()
    logs = faulted.logs()
    assert "resumed from checkpoint at step 30" in logs, logs
    assert os.path.exists(job_paths(rec.storage)["fault"])
    _same_run(reference, faulted)
    # keep-last-2: older and abandoned checkpoint folders are gone
    ckpt = job_paths(rec.storage)["checkpoints"]
    assert CheckpointStore(ckpt).steps() == [60, 66]
    assert sorted(os.listdir(ckpt)) == ["LATEST", "step-000000060", "step-000000066"]


def test_what_a_job_trains_lands_in_the_registry_with_its_lineage(runtime):
    (job,) = [j for j in runtime.list_jobs(["succeeded"]) if j.name == "ref-ddp"]
    result = job.result
    reg = Registry.open(runtime.settings.registry_uri, runtime.settings.artifacts_uri)
    try:
        mv = reg.resolve(result["ref"])
        assert set(mv.artifacts) >= {"model.onnx", "model.safetensors", "reference.npy"}
        assert mv.lineage.job_id == job.id
        assert len(mv.lineage.data_fingerprint) == 64
        assert mv.lineage.training_config["strategy"] == "ddp"
        assert mv.lineage.code_commit
        assert mv.metrics["val_accuracy"] > 0.8
        _, onnx_path = reg.artifact_path(mv.ref, "model.onnx")
        _, ref_path = reg.artifact_path(mv.ref, "reference.npy")
    finally:
        reg.close()
    import onnxruntime as ort

    x = np.load(ref_path)[:16]
    logits = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert logits.shape == (16, 10)


def test_an_urgent_job_runs_before_the_ones_waiting_and_a_cancelled_one_never_runs(runtime, tmp_path):
    tiny = {"resources": {"workers": 1, "cpus_per_worker": 1.0}, "epochs": 1, "batch_size": 32,
            "checkpoint": {"every_steps": 0, "every_epochs": 1, "keep": 1}, "export": {"register": False}}
    import ray

    free_before = ray.available_resources().get("CPU", 0)
    first = runtime.submit(spec("long", **tiny))
    wait_for(lambda: first.status().state != "queued", 60, "job 'long' to leave the queue", every_s=0.2)
    # nothing is taken after "long" until all three are queued (else "long"
    # ending between two submits would let "routine" start before "urgent"
    # is queued, and the test would race its own submits)
    runtime.stop_after(first.id)
    # routine: its rows come as a Ray Data dataset, its checkpoints go to a URI
    import pandas as pd
    from sklearn.datasets import load_digits

    digits = load_digits()
    frame = pd.DataFrame(digits.data / 16.0, columns=[f"p{i}" for i in range(64)]).assign(label=digits.target)
    remote = tmp_path / "remote"
    waiting = runtime.submit(spec("routine", dataset={"kind": "ray"}, storage=f"file://{remote}", **tiny),
                             dataset=ray.data.from_pandas(frame), run=False)
    dropped = runtime.submit(spec("dropped", **tiny), run=False)
    urgent = runtime.submit(spec("urgent", priority=10, **tiny), run=False)
    assert dropped.cancel().state == "cancelled"
    runtime.start()
    for job in (first, waiting, urgent):
        assert job.wait(300).state == "succeeded", job.logs()
    assert first.status().started_at < urgent.status().started_at < waiting.status().started_at
    assert dropped.status().started_at is None
    assert dropped.status().state == "cancelled"
    (ckpt,) = list(remote.glob("routine-*/checkpoints"))
    assert CheckpointStore(f"file://{ckpt}").steps()  # the job wrote its checkpoints there
    assert not os.path.exists(job_paths(waiting.status().storage)["checkpoints"])  # and only there
    assert waiting.status().storage.startswith(runtime.settings.home)
    assert waiting.metrics()[-1]["val_accuracy"] > 0.5
    # no trainer or worker actor is left holding a CPU (other test modules'
    # deployments hold what they held before)
    wait_for(lambda: ray.available_resources().get("CPU", 0) >= free_before, 30,
             f"{free_before} CPUs free again", every_s=0.5)
    assert ray.available_resources().get("CPU", 0) == free_before


def test_a_job_that_cannot_get_its_cpus_fails_with_a_clear_message(runtime):
    job = runtime.submit(spec("too-big", resources={"workers": 8, "cpus_per_worker": 1.0, "wait_s": 2}))
    rec = job.wait(120)
    assert rec.state == "failed"
    assert "cannot get 8 worker(s)" in rec.error, rec.error
    assert "resources.wait_s" in rec.error, rec.error
    with pytest.raises(JobFailedError, match="failed"):
        job.result()


def test_a_job_whose_process_died_is_listed_elsewhere_and_resumed_from_its_checkpoint(runtime, tmp_path):
    import ray
    import yaml

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec("orphan", epochs=6, checkpoint={"every_steps": 0, "every_epochs": 1})))
    runtime.stop()  # this process's scheduler must not take the job: the CLI's runs it
    s = runtime.settings
    env = {**os.environ, "FLYWHEEL_HOME": s.home, "FLYWHEEL_REGISTRY_URI": s.registry_uri,
           "FLYWHEEL_ARTIFACTS_URI": s.artifacts_uri, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    cli = subprocess.Popen([FLYWHEEL, "train", str(path)], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        for line in cli.stdout:  # live progress, as a user sees it
            seen.append(line)
            if "epoch 2 step" in line and "loss" in line and "val_accuracy" in "".join(seen):
                break
    finally:
        cli.send_signal(signal.SIGKILL)  # the process running the job dies
        cli.wait(30)
    assert any("submitted job" in line for line in seen), seen
    (job,) = [j for j in runtime.list_jobs() if j.name == "orphan"]

    def no_longer_running() -> bool:
        runtime.list_jobs()  # its heartbeats stopped: after stale_s a listing marks it failed
        return runtime.attach(job.id).status().state != "running"

    wait_for(no_longer_running, 30, "the orphaned job to be marked failed", every_s=0.5)
    assert runtime.attach(job.id).status().state == "failed"
    resumed = runtime.resume(job.id)
    rec = resumed.wait(300)
    assert rec.state == "succeeded", resumed.logs()
    assert rec.attempts == 2
    assert "resumed from checkpoint at step" in resumed.logs()
    assert [m["epoch"] for m in resumed.metrics()][-1] == 6
    with open(os.path.join(rec.storage, "output", "metrics.json")) as f:
        assert json.load(f)["final"]["epoch"] == 6


def test_a_trained_model_can_go_straight_to_a_canary_on_a_running_server(runtime):
    from flywheel.client import Client
    from flywheel.serving import parse_config
    from flywheel.serving.app import deploy, undeploy

    s = runtime.settings
    (first,) = [j for j in runtime.list_jobs(["succeeded"]) if j.name == "ref-ddp"]
    cfg = parse_config({"name": "trained", "server": {"port": 0, "grpc_port": -1},
                        "registry": {"uri": s.registry_uri, "artifacts": s.artifacts_uri},
                        "models": [{"name": "ref-ddp", "ref": first.result["ref"], "num_cpus": 0.05}]})
    dep = deploy(cfg)
    try:
        job = runtime.submit(spec("retrain", epochs=1, resources={"workers": 1, "cpus_per_worker": 1.0},
                                  export={"model_name": "ref-ddp", "canary_url": dep.url,
                                          "canary": {"steps": [10, 100], "hold_s": 600}}))
        rec = job.wait(300)
        assert rec.state == "succeeded", job.logs()
        version = rec.result["ref"].split("/")[1]
        with Client(dep.url) as c:
            status = c.endpoint("ref-ddp")
        assert status["canary"]["status"] == "running"
        assert status["canary"]["config"]["variant"] == version
        assert status["variants"][version]["ref"] == rec.result["ref"]
    finally:
        undeploy(dep)


def test_a_canary_that_cannot_start_leaves_the_version_registered_and_says_why(runtime):
    # no server there: the job does not fail (its resume would register the
    # same weights again); the result says why there is no canary
    job = runtime.submit(spec("no-server", epochs=1, resources={"workers": 1, "cpus_per_worker": 1.0},
                              export={"canary_url": "http://127.0.0.1:1"}))
    rec = job.wait(300)
    assert rec.state == "succeeded", job.logs()
    assert rec.result["ref"].startswith("no-server/"), job.logs()
    assert rec.result["canary_error"], rec.result
    assert "not started" in job.logs(), rec.result


def test_a_stopped_runtime_hands_its_running_job_back_and_the_next_run_resumes_it(runtime):
    tiny = {"resources": {"workers": 1, "cpus_per_worker": 1.0}, "export": {"register": False}}
    job = runtime.submit(spec("handed", epochs=6, checkpoint={"every_steps": 0, "every_epochs": 1}, **tiny))
    later = runtime.submit(spec("later", epochs=1, **tiny), run=False)
    # an epoch done: a checkpoint to resume from
    wait_for(job.metrics, 120, "a first epoch of 'handed'", every_s=0.2)
    runtime.stop(timeout=120)  # e.g. `flywheel train` ending while it runs another process's job
    rec = job.status()
    assert (rec.state, rec.attempts, rec.runner) == ("queued", 1, ""), (rec, job.logs())
    assert "handed back to the queue" in job.logs()
    assert later.status().state == "queued"  # a stopped runtime takes nothing
    runtime.start()
    runtime.stop_after(job.id)  # as `flywheel train` does: its job, not the queue after it
    rec = job.wait(300)
    assert rec.state == "succeeded", job.logs()
    assert rec.attempts == 2, job.logs()
    assert "resumed from checkpoint at step" in job.logs()
    assert [m["epoch"] for m in job.metrics()][-1] == 6
    time.sleep(2.0)  # several scheduler polls: proves the stopped-after runtime takes nothing more
    assert later.status().state == "queued"
    assert later.cancel().state == "cancelled"
