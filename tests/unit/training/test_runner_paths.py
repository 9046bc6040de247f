"""Where a job's checkpoints and Ray Train's run folder go (training/runner.py)."""

from __future__ import annotations

from types import SimpleNamespace

from flywheel.training.runner import checkpoint_root, run_root


def _record(storage: str) -> SimpleNamespace:
    return SimpleNamespace(spec={"storage": storage}, storage="/home/fw/training/digits-abc", name="digits", id="abc")


def test_a_local_storage_keeps_both_in_the_job_folder():
    rec = _record("")
    assert checkpoint_root(rec) == "/home/fw/training/digits-abc/checkpoints"
    assert run_root(rec) == "/home/fw/training/digits-abc/ray"


def test_an_s3_storage_takes_the_checkpoints_and_ray_trains_folder():
    rec = _record("s3://bucket/jobs/")
    assert checkpoint_root(rec) == "s3://bucket/jobs/digits-abc/checkpoints"
    assert run_root(rec) == "s3://bucket/jobs/digits-abc/ray"


def test_a_uri_pyarrow_cannot_read_keeps_ray_trains_folder_local():
    rec = _record("memory://jobs")
    assert checkpoint_root(rec) == "memory://jobs/digits-abc/checkpoints"
    assert run_root(rec) == "/home/fw/training/digits-abc/ray"
