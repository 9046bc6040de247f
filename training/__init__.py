"""Flywheel training: jobs on Ray Train (DDP or FSDP) with priorities,
checkpoints that are never lost, recovery from worker failure, and the
trained model registered with its lineage. See training/api.py."""

from flywheel.training.api import (
    JobFailedError,
    JobHandle,
    TrainingRuntime,
    attach,
    list_jobs,
    resume,
    submit,
)
from flywheel.training.digits import DigitsResult, train_digits
from flywheel.training.spec import JobSpec, load_spec, parse_spec

__all__ = [
    "DigitsResult",
    "JobFailedError",
    "JobHandle",
    "JobSpec",
    "TrainingRuntime",
    "attach",
    "list_jobs",
    "load_spec",
    "parse_spec",
    "resume",
    "submit",
    "train_digits",
]
