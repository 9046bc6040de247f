"""What a batch prediction run is asked to do: one typed, validated job."""

from __future__ import annotations

from typing import Any

import msgspec

from flywheel.protocol.errors import ConfigError

FORMATS = ("auto", "parquet", "csv", "npy", "images")
TASKS = ("auto", "classification", "regression")
# output columns Flywheel adds; an input column of the same name is refused
SOURCE_COLUMN = "source"
ROW_COLUMN = "row"
VERSION_COLUMN = "model_version"
RUN_COLUMN = "run_id"
RESERVED = (SOURCE_COLUMN, ROW_COLUMN, VERSION_COLUMN, RUN_COLUMN)


class PredictJob(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One batch prediction run.

    model: ``name@alias``, ``name/version`` or ``name`` (its latest version)
        in the registry, or the path of a model file (``.onnx``).
    input: a file, a folder (searched recursively; ``key=value`` folders are
        Hive partitions whose values become key columns), a glob, or any
        fsspec URI of those. Every node must be able to read it.
    output: a folder (local or fsspec URI) that receives one Parquet file per
        input partition, written atomically, plus ``_flywheel/`` (the run's
        manifest and report). Re-running into the same folder resumes.
    format: ``parquet``, ``csv``, ``npy`` (arrays whose first axis is rows),
        ``images`` (a folder per label holding PNG/JPEG files), or ``auto``
        (from the file extensions).
    columns: model input -> the columns that make it, in order; a name may
        be a glob (``pixel_*``). Unmapped, a model with one input takes the
        column named like the input, else every numeric column that is not
        a key or the label, in file order.
    keys: input columns copied to the output beside ``source`` and ``row``
        (which always identify a row: the file it came from and its index).
    label: the label column: evaluation mode (metrics over the whole run).
    task: ``classification`` (accuracy, AUC), ``regression`` (RMSE, MAE,
        R²) or ``auto`` (classification when the scored output has a
        column per class).
    score_output: the model output that evaluation scores (default: the
        model's only output, else the first).
    classes: label values in class-index order, for string labels (default:
        the sorted distinct labels; image folders: the sorted folder names).
    artifact / backend: which artifact of a registry version to load and
        with which runtime backend (default ``model.onnx`` on
        ``onnxruntime``; ``model.safetensors`` for ``torch``; any backend of
        the registry, plug-ins included).
    settings: a plug-in backend's settings (its model config's ``settings:``).
    actors: scoring actors (0: as many as the cluster's free CPUs allow).
    num_cpus / num_gpus: Ray resources of each actor.
    threads: ONNX Runtime intra-op threads in each actor.
    batch_rows: rows per model call (0: the backend's default: 8192, 1024
        for a TensorRT engine, which is built for that batch profile).
    partition_rows: a Parquet file with more rows is split into partitions
        of whole row groups of about this many rows, so that one large file
        still spreads over the actors.
    register: record the evaluation on the registry version (needs a
        registry model and a label).
    dataset: the name the evaluation is recorded under (default: input).
    overwrite: discard an earlier run in ``output`` instead of resuming it.
    registry / artifacts: the registry location (default: the settings').
    actor: who acts, for the registry's audit log.
    """

    model: str
    input: str
    output: str
    format: str = "auto"
    columns: dict[str, list[str]] = {}
    keys: list[str] = []
    label: str = ""
    task: str = "auto"
    score_output: str = ""
    classes: list[str] = []
    artifact: str = ""
    backend: str = "onnxruntime"
    settings: dict[str, Any] = {}
    actors: int = 0
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    threads: int = 1
    batch_rows: int = 0
    partition_rows: int = 262_144
    register: bool = False
    dataset: str = ""
    overwrite: bool = False
    registry: str = ""
    artifacts: str = ""
    actor: str = "unknown"

    def __post_init__(self) -> None:
        for field in ("model", "input", "output"):
            if not getattr(self, field):
                raise ConfigError(f"{field}: required")
        if self.format not in FORMATS:
            raise ConfigError(f"format {self.format!r} unknown; allowed: {', '.join(FORMATS)}")
        if self.task not in TASKS:
            raise ConfigError(f"task {self.task!r} unknown; allowed: {', '.join(TASKS)}")
        for field in ("actors", "threads", "batch_rows"):
            if getattr(self, field) < 0:
                raise ConfigError(f"{field} must be >= 0, got {getattr(self, field)}")
        if self.partition_rows < 1:
            raise ConfigError(f"partition_rows must be >= 1, got {self.partition_rows}")
        if self.num_cpus < 0 or self.num_gpus < 0 or self.num_cpus + self.num_gpus == 0:
            raise ConfigError("num_cpus / num_gpus: each actor needs a CPU or GPU share > 0")
        for name, cols in self.columns.items():
            if not cols:
                raise ConfigError(f"columns.{name}: name at least one column")
        taken = [c for c in (*self.keys, self.label) if c in RESERVED]
        if taken:
            raise ConfigError(f"keys / label: {taken[0]!r} is a column Flywheel writes itself ({', '.join(RESERVED)})")
        if self.register and not self.label:
            raise ConfigError("register: an evaluation needs a label column (label)")


def parse_job(data: dict) -> PredictJob:
    """A mapping (YAML, CLI) as a PredictJob; ConfigError names the field."""
    try:
        return msgspec.convert(data, PredictJob)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid batch job: {exc}") from None
