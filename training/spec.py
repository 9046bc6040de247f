"""The typed training job spec: what to train, on what, where, and what then.

Defaults live here; a YAML file or a Python mapping only says what differs.
Every field is validated when the spec is built, and the error names the
field and what is allowed (with msgspec's path, ``$.optimizer``, when the spec
was parsed from data). No Ray here: a spec is plain data that a CLI, a
notebook or the job queue (``training/jobs.py``) can read without a cluster.

Example (``flywheel train job.yaml``-style; only ``name`` and ``model`` are
required)::

    name: digits-mlp
    model:
      architecture: mlp
      hparams: {in_features: 64, hidden: [128, 64], out_features: 10}
    dataset: {kind: digits, validation_fraction: 0.2}
    strategy: ddp
    resources: {workers: 2, cpus_per_worker: 1}
    epochs: 5
    batch_size: 64            # global: 32 rows per worker
    optimizer: {name: adamw, lr: 0.001}
    schedule: {kind: cosine, min_lr: 0.00001}
    checkpoint: {every_epochs: 1, keep: 2}
    export: {onnx: true, register: true, model_name: digits}
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from flywheel.runtime.architectures import ARCHITECTURES
from flywheel.protocol.errors import ConfigError
from flywheel.training.user_code import TASKS, check_import_path

# Same rule as model names in serving/config.py and the registry: a job name
# becomes the registry model name by default, so it must be a valid one.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# Priorities are stored as 32-bit integers (PostgreSQL's INTEGER).
PRIORITY_RANGE = (-(2**31), 2**31 - 1)

DATASET_KINDS = ("digits", "parquet", "csv", "ray", "captured", "npy", "images")
# kinds read from files at dataset.path
PATH_KINDS = ("parquet", "csv", "captured", "npy", "images")
IMAGE_MODES = ("rgb", "grayscale")
STRATEGIES = ("ddp", "fsdp")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine")
# resources.placement -> Ray's placement group strategy (Train's ScalingConfig.placement_strategy)
# a user metric is reported as val_<name>: a plain identifier
METRIC_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
PLACEMENTS = {"pack": "PACK", "spread": "SPREAD", "strict_spread": "STRICT_SPREAD"}


def _require(ok: bool, message: str) -> None:
    # Checks are written as "ok" conditions so that NaN (for which every
    # comparison is false) fails them instead of slipping through.
    if not ok:
        raise ConfigError(message)


def _finite(x: float) -> bool:
    return math.isfinite(x)


class ModelSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The network to train: a built-in architecture, or a user factory
    (exactly one of the two).

    architecture: a builder of ``flywheel.runtime.architectures``
        (``mlp``, ``small_cnn``, ``patch_cnn``); the trained weights are
        saved as safetensors and rebuilt from this name and ``hparams``.
    hparams: keyword arguments of that builder. Unknown names are refused
        here; missing ones are left for the runtime (it may infer sizes such
        as ``in_features`` from the dataset) and fail when the model is built.
    factory: ``"package.module:callable"`` returning a ``torch.nn.Module``,
        from the job's ``code`` folder or an installed package; it is
        imported and called when the job starts (a failure fails the job
        then, naming model.factory), never when a spec is read.
    kwargs: keyword arguments of the factory (JSON values).
    input_shape: factory models only: the shape of one input row, e.g.
        ``[1, 8, 8]``; empty = the dataset's rows as they are (a vector of
        features). The model takes FP32 ``[batch, *input_shape]``.
    """

    architecture: str = ""
    hparams: dict[str, Any] = {}
    factory: str = ""
    kwargs: dict[str, Any] = {}
    input_shape: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _require(bool(self.architecture) != bool(self.factory),
                 "model: set exactly one of model.architecture (a built-in: "
                 f"{', '.join(sorted(ARCHITECTURES))}) and model.factory (an import path 'package.module:callable')")
        if self.factory:
            check_import_path(self.factory, "model.factory")
            _require(not self.hparams, "model.hparams is for model.architecture; a factory takes model.kwargs")
            _require(all(d >= 1 for d in self.input_shape), "model.input_shape: every dimension must be >= 1")
            return
        _require(not self.kwargs and not self.input_shape,
                 "model.kwargs and model.input_shape are for model.factory; an architecture takes model.hparams")
        builder = ARCHITECTURES.get(self.architecture)
        _require(
            builder is not None,
            f"model.architecture {self.architecture!r} is unknown; known: {', '.join(sorted(ARCHITECTURES))}",
        )
        try:
            inspect.signature(builder).bind_partial(**self.hparams)
        except TypeError as exc:
            allowed = ", ".join(inspect.signature(builder).parameters)
            raise ConfigError(
                f"model.hparams for {self.architecture!r}: {exc}; its hyper-parameters are: {allowed}"
            ) from None

    @property
    def label(self) -> str:
        """How logs and errors name the model."""
        return f"factory {self.factory}" if self.factory else f"architecture {self.architecture}"


class DatasetSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where the training rows come from.

    kind: ``digits`` (scikit-learn's bundled 8x8 digits, built in),
        ``parquet`` or ``csv`` (files at ``path``), ``ray`` (a Ray Data
        dataset handed to ``submit()`` from Python; nothing to read here),
        or ``captured`` (labelled inference captures of a served endpoint,
        serving's ``capture:``; see common/capture_files.py).
    path: a local file, folder or glob (on storage every node can read,
        on a cluster); for ``captured`` the capture root (a folder or an
        fsspec URI). Required for
        parquet/csv/captured and refused for the other kinds (a path with kind digits
        is almost always a forgotten ``kind``).
    features: input columns, in order; empty = every column but ``label``.
    label: the target column.
    validation_fraction: share of rows held out for validation, in [0, 0.9].
    reference_rows: rows of training inputs kept as the drift monitor's
        reference sample (registered with the model), >= 0 (0 = none).

    Kind ``captured`` only:

    endpoint: the served endpoint (model name) whose captures are read.
    since / until: epoch seconds; rows captured at ``since <= ts < until``
        (until 0 = no bound). Only rows with a label are used.
    input: the captured input tensor that becomes the features (flattened
        per row); empty = the only one.
    mix: the original training data, a dataset of its own (any kind but
        ``captured`` and ``ray``), e.g. ``{kind: digits}``; unset = captured
        rows only.
    captured_fraction: with ``mix``, the share of captured rows in the
        training set, in (0, 1]. Every captured row is used and the original
        rows are subsampled (seeded by the job's seed) to make that share;
        when there are too few original rows for it, all of them are used
        and the captured rows are subsampled instead. Rows are never
        repeated. The data fingerprint covers the mixed rows.

    Streamed data (training/streamed.py: larger than the driver's memory).
    Kinds ``npy`` and ``images`` are always streamed; ``parquet`` and
    ``csv`` are streamed with ``stream: true`` (else read into memory, as
    above). Ray Data reads the files lazily on the cluster and streams
    batches to the Train workers; the driver reads only metadata (schema,
    file headers and listings), a bounded sample (up to ``reference_rows``
    rows, at least 2: the first training rows in reading order, which for
    parquet/csv is the files' order, so not a random sample) and, for
    parquet/csv, per-batch row counts from one streamed pass. Rows are split
    by a seeded hash of each row (the row's index in its file for npy, the
    file's path for images, the row's values for parquet/csv), so about
    ``validation_fraction`` of them are held out, the same ones every
    attempt. The fingerprint covers the files' names, sizes and mtimes.

    stream: parquet/csv (and ray: ``submit()`` writes it out as Parquet
        files, with Ray Data) only: stream the rows (see above).
    labels_path: kind ``npy``: the labels. ``path`` names the features (a
        ``.npy`` file, a folder of them, or a glob; files sorted by name),
        each ``[rows, *row_shape]`` of numbers; ``labels_path`` names one
        1-D ``.npy`` of ``rows`` labels per features file (paired in sorted
        order; row counts must match).
    image_size: kind ``images``: ``[height, width]`` every image is resized
        to. ``path`` is a folder with one subfolder per class (the sorted
        subfolder names are class ids 0, 1, ...) holding PNG/JPEG files;
        they are decoded with Pillow on the cluster into FP32
        ``[channels, height, width]`` in [0, 1].
    image_mode: ``rgb`` (3 channels, the default) or ``grayscale`` (1).
    transform: streamed kinds only: ``"package.module:fn"`` (from the job's
        ``code`` folder or an installed package) called on each training
        batch on the workers as ``fn(x)`` with ``x`` FP32 ``[batch,
        *row_shape]``; it returns an array of the same shape (e.g. an
        augmentation). Validation batches and the reference sample are not
        transformed, as a served model's inputs are not.
    """

    kind: str = "digits"
    path: str = ""
    features: tuple[str, ...] = ()
    label: str = "label"
    validation_fraction: float = 0.2
    reference_rows: int = 500
    endpoint: str = ""
    since: float = 0.0
    until: float = 0.0
    input: str = ""
    mix: DatasetSpec | None = None
    captured_fraction: float = 0.5
    stream: bool = False
    labels_path: str = ""
    image_size: tuple[int, ...] = ()
    image_mode: str = ""
    transform: str = ""

    def __post_init__(self) -> None:
        _require(self.kind in DATASET_KINDS,
                 f"dataset.kind {self.kind!r} must be one of {', '.join(DATASET_KINDS)}")
        if self.kind in PATH_KINDS:
            what = {"captured": "the capture root", "images": "a folder with one subfolder per class",
                    "npy": "the features: a .npy file, folder or glob"}.get(self.kind, "a file, folder or glob")
            _require(bool(self.path), f"dataset.path is required for kind {self.kind!r} ({what})")
        else:
            _require(not self.path,
                     f"dataset.path is only for kinds {', '.join(PATH_KINDS)}; set dataset.kind (now {self.kind!r})")
        self._check_streamed()
        _require(bool(self.label), "dataset.label must name the label column")
        _require(all(self.features), "dataset.features: column names must be non-empty")
        _require(len(set(self.features)) == len(self.features), "dataset.features: a column is listed twice")
        _require(self.label not in self.features,
                 f"dataset.features must not include the label column {self.label!r}")
        _require(0 <= self.validation_fraction <= 0.9, "dataset.validation_fraction must lie in [0, 0.9]")
        _require(self.reference_rows >= 0, "dataset.reference_rows must be >= 0 (0 = no reference sample)")
        self._check_captured()

    @property
    def streamed(self) -> bool:
        """Whether the rows stream from Ray Data to the workers (never held
        by the driver) rather than being loaded into memory."""
        return self.kind in ("npy", "images") or (self.stream and self.kind in ("parquet", "csv"))

    def _check_streamed(self) -> None:
        _require(not self.stream or self.kind in ("parquet", "csv", "ray", "npy", "images"),
                 f"dataset.stream is for kinds parquet, csv and ray (npy and images always stream); "
                 f"kind is {self.kind!r}")
        _require(bool(self.labels_path) == (self.kind == "npy"),
                 "dataset.labels_path is required for kind 'npy' (a .npy file, folder or glob of 1-D labels)"
                 if self.kind == "npy" else f"dataset.labels_path is only for kind npy (kind is {self.kind!r})")
        if self.kind == "images":
            _require(len(self.image_size) == 2 and all(d >= 1 for d in self.image_size),
                     f"dataset.image_size must be [height, width], each >= 1 (got {list(self.image_size)})")
            _require(not self.image_mode or self.image_mode in IMAGE_MODES,
                     f"dataset.image_mode {self.image_mode!r} must be one of {', '.join(IMAGE_MODES)}")
        else:
            _require(not self.image_size and not self.image_mode,
                     f"dataset.image_size and image_mode are only for kind images (kind is {self.kind!r})")
        if self.transform:
            _require(self.streamed,
                     "dataset.transform is for streamed data (kinds npy, images, or parquet/csv with stream: true)")
            check_import_path(self.transform, "dataset.transform")

    def _check_captured(self) -> None:
        if self.kind != "captured":
            _require(not self.endpoint and self.mix is None and not self.input and not self.since and not self.until,
                     f"dataset.endpoint, since, until, input and mix are only for kind captured (kind is {self.kind!r})")
            return
        _require(bool(NAME_RE.match(self.endpoint)),
                 f"dataset.endpoint {self.endpoint!r} must name the served endpoint (a model name) for kind captured")
        _require(_finite(self.since) and self.since >= 0, "dataset.since must be epoch seconds >= 0 (0 = all)")
        _require(_finite(self.until) and (self.until == 0 or self.until > self.since),
                 "dataset.until must be 0 (no bound) or epoch seconds after dataset.since")
        _require(0 < self.captured_fraction <= 1, "dataset.captured_fraction must lie in (0, 1]")
        if self.mix is not None:
            _require(self.mix.kind not in ("captured", "ray") and not self.mix.streamed,
                     f"dataset.mix.kind {self.mix.kind!r}: the original data must be digits, parquet or csv "
                     "(read into memory, not streamed)")


class OptimizerSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """name: sgd, adam or adamw (torch.optim). lr: the base learning rate
    (> 0). weight_decay: >= 0. momentum: sgd only, in [0, 1)."""

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.0

    def __post_init__(self) -> None:
        _require(self.name in OPTIMIZERS, f"optimizer.name {self.name!r} must be one of {', '.join(OPTIMIZERS)}")
        _require(self.lr > 0 and _finite(self.lr), "optimizer.lr must be a finite number > 0")
        _require(self.weight_decay >= 0 and _finite(self.weight_decay),
                 "optimizer.weight_decay must be a finite number >= 0")
        _require(0 <= self.momentum < 1, "optimizer.momentum must lie in [0, 1)")
        _require(self.momentum == 0 or self.name == "sgd",
                 f"optimizer.momentum is for sgd only (optimizer.name is {self.name!r}); leave it 0")


class ScheduleSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The learning rate over epochs.

    kind: ``constant``; ``step`` (multiply by ``gamma`` every ``step_epochs``
        epochs); ``cosine`` (anneal from optimizer.lr to ``min_lr`` over the
        run).
    step_epochs: >= 1. gamma: in (0, 1]. min_lr: >= 0 and <= optimizer.lr.
    """

    kind: str = "constant"
    step_epochs: int = 1
    gamma: float = 0.1
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        _require(self.kind in SCHEDULES, f"schedule.kind {self.kind!r} must be one of {', '.join(SCHEDULES)}")
        _require(self.step_epochs >= 1, "schedule.step_epochs must be >= 1")
        _require(0 < self.gamma <= 1, "schedule.gamma must lie in (0, 1]")
        _require(self.min_lr >= 0 and _finite(self.min_lr), "schedule.min_lr must be a finite number >= 0")


class CheckpointSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """When to checkpoint (into the job's storage) and how many to keep.

    every_steps: every N optimizer steps (0 = off). every_epochs: at the end
    of every N epochs (0 = off); at least one of the two must be on, since a
    job that fails resumes from its last checkpoint. keep: newest
    checkpoints kept, >= 1.
    """

    every_steps: int = 0
    every_epochs: int = 1
    keep: int = 2

    def __post_init__(self) -> None:
        _require(self.every_steps >= 0, "checkpoint.every_steps must be >= 0 (0 = off)")
        _require(self.every_epochs >= 0, "checkpoint.every_epochs must be >= 0 (0 = off)")
        _require(self.every_steps > 0 or self.every_epochs > 0,
                 "checkpoint: turn on checkpoint.every_steps or checkpoint.every_epochs (both are 0)")
        _require(self.keep >= 1, "checkpoint.keep must be >= 1")


class ResourcesSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The Ray Train workers.

    workers: data-parallel workers, >= 1. cpus_per_worker: > 0 (fractions
    are fine on a small machine). gpus_per_worker: >= 0 (0 = CPU training).
    wait_s: how long the job may wait for its workers' resources before it
    fails with a message that says what was missing, > 0.
    placement: where the workers go on a cluster (Ray placement group
        strategies): ``pack`` (as few nodes as fit, the default: DDP's
        all-reduce stays on one node where it can), ``spread`` (across
        nodes where it can, else packed), or ``strict_spread`` (one worker
        per node, never two on one: the job waits for ``workers`` nodes,
        and fails after ``wait_s`` with fewer).
    """

    workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    wait_s: float = 120.0
    placement: str = "pack"

    def __post_init__(self) -> None:
        _require(self.workers >= 1, "resources.workers must be >= 1")
        _require(self.cpus_per_worker > 0 and _finite(self.cpus_per_worker),
                 "resources.cpus_per_worker must be a finite number > 0")
        _require(self.gpus_per_worker >= 0 and _finite(self.gpus_per_worker),
                 "resources.gpus_per_worker must be a finite number >= 0")
        _require(self.wait_s > 0 and _finite(self.wait_s), "resources.wait_s must be a finite number > 0 (seconds)")
        _require(self.placement in PLACEMENTS,
                 f"resources.placement {self.placement!r} must be one of {', '.join(PLACEMENTS)}")

    @property
    def total_cpus(self) -> float:
        return self.workers * self.cpus_per_worker

    @property
    def total_gpus(self) -> float:
        return self.workers * self.gpus_per_worker


class ExportSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What happens to the trained model.

    onnx: export ``model.onnx`` next to the safetensors weights.
    register: add a registry version (with lineage: data fingerprint, spec,
        metrics, reference sample).
    model_name: the registry model name ("" = the job name).
    canary_url: a running Flywheel server; the new version is added as a
        variant of endpoint ``model_name`` there and a canary started ("" =
        no). Needs ``register`` (the server loads the version by reference).
    canary: canary settings passed through to that server as they are.
    """

    onnx: bool = True
    register: bool = True
    model_name: str = ""
    canary_url: str = ""
    canary: dict[str, Any] = {}

    def __post_init__(self) -> None:
        _require(not self.model_name or bool(NAME_RE.match(self.model_name)),
                 f"export.model_name {self.model_name!r} must match {NAME_RE.pattern} (or be empty)")
        _require(not self.canary_url or self.canary_url.startswith(("http://", "https://")),
                 f"export.canary_url {self.canary_url!r} must be an http:// or https:// URL (or empty)")
        _require(not self.canary_url or self.register,
                 "export.canary_url needs export.register: true (the server deploys the registry version)")
        _require(not self.canary or bool(self.canary_url),
                 "export.canary settings are given but export.canary_url is empty")


class FaultSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A test hook for fault tolerance: worker ``kill_rank`` calls
    ``os._exit(1)`` once, when the global step reaches ``at_step``. Both -1
    (off, the default) or both >= 0."""

    kill_rank: int = -1
    at_step: int = -1

    def __post_init__(self) -> None:
        _require(self.kill_rank >= -1 and self.at_step >= -1, "fault.kill_rank and fault.at_step must be >= -1")
        _require((self.kill_rank == -1) == (self.at_step == -1),
                 "fault: set both fault.kill_rank and fault.at_step (>= 0), or neither (-1)")

    @property
    def enabled(self) -> bool:
        return self.kill_rank >= 0


class JobSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One training job.

    name: the job's name (letters, digits, ``_.-``; also the default
        registry model name).
    model / dataset: see ModelSpec, DatasetSpec.
    strategy: ``ddp`` (every worker holds the whole model) or ``fsdp``
        (parameters sharded across workers).
    resources: workers and what each needs (ResourcesSpec).
    epochs: passes over the training rows, >= 1.
    batch_size: the global batch, >= 1, split evenly across the workers, so
        it must be divisible by resources.workers.
    optimizer / schedule: see OptimizerSpec, ScheduleSpec.
    seed: seeds the data split, the shuffling and the initial weights.
    checkpoint: see CheckpointSpec.
    max_failures: worker failures the job survives (it resumes from its last
        checkpoint), >= 0.
    priority: higher runs first in the queue (any integer).
    storage: where the job keeps its files ("" = ``<FLYWHEEL_HOME>/training``):
        a local (or shared) folder holds the job's folder, checkpoints
        included; an fsspec URI (``s3://...``, ``file://...``) takes the
        checkpoints and, where pyarrow reads it (s3, gs, hdfs), Ray Train's
        own run folder (so that a node that dies takes none of the run
        with it), the rest (log, metrics,
        outputs) stays under ``<FLYWHEEL_HOME>/training``, which on a
        cluster of several nodes must be a folder they all share: the
        worker of rank 0 writes there, on whichever node it runs.
    export: what to do with the trained model (ExportSpec). A factory
        model that cannot be exported to ONNX is still registered (weights,
        metrics, lineage); the job's result says why under ``onnx_error``.
    fault: a test hook (FaultSpec); off by default.

    User code (training/user_code.py has the contracts):

    code: a local folder of Python modules shipped with the job ("" =
        none: import paths then name installed packages); relative to the
        YAML file's folder in a job file, else to the current folder. Every Ray Train
        worker, on every node, runs with it as its ``working_dir`` (so it
        is on their import path); ``submit()`` checks that it exists and
        stores it as an absolute path.
    task: ``classification`` (integer class labels; cross-entropy; metric
        ``val_accuracy``) or ``regression`` (labels as float32, one value
        per row; mean squared error; metrics ``val_mse``, ``val_mae``).
    loss: ``"package.module:fn"``, ``fn(outputs, targets)`` returning a
        scalar tensor, in place of the task's loss ("" = the task's).
    metrics: ``{name: "package.module:fn"}``, each ``fn(outputs, targets)``
        returning a number on the validation split, reported as
        ``val_<name>`` beside the task's metrics.
    train_step: ``"package.module:fn"``, called as
        ``fn(model, (inputs, targets), ctx)`` in place of the built-in
        forward + loss; it returns the loss tensor (or a dict with ``loss``
        and other scalars, reported as ``train_<name>``). Flywheel still
        does backward, the optimizer and scheduler steps, checkpoints,
        exact resume, metrics and cancellation.

    Example of a user model::

        code: ./src                       # holds mypkg/models.py
        model: {factory: "mypkg.models:make_net", kwargs: {width: 32}}
        task: regression
        metrics: {within_1: "mypkg.metrics:within_1"}
        train_step: "mypkg.steps:step"
    """

    name: str
    model: ModelSpec
    dataset: DatasetSpec = DatasetSpec()
    strategy: str = "ddp"
    resources: ResourcesSpec = ResourcesSpec()
    epochs: int = 5
    batch_size: int = 64
    optimizer: OptimizerSpec = OptimizerSpec()
    schedule: ScheduleSpec = ScheduleSpec()
    seed: int = 0
    checkpoint: CheckpointSpec = CheckpointSpec()
    max_failures: int = 2
    priority: int = 0
    storage: str = ""
    export: ExportSpec = ExportSpec()
    fault: FaultSpec = FaultSpec()
    code: str = ""
    task: str = "classification"
    loss: str = ""
    metrics: dict[str, str] = {}
    train_step: str = ""

    def __post_init__(self) -> None:
        self._check_user_code()
        _require(bool(NAME_RE.match(self.name)),
                 f"name {self.name!r} must match {NAME_RE.pattern} (letters, digits, _.-)")
        _require(self.strategy in STRATEGIES, f"strategy {self.strategy!r} must be one of {', '.join(STRATEGIES)}")
        _require(self.epochs >= 1, "epochs must be >= 1")
        _require(self.batch_size >= 1, "batch_size must be >= 1")
        workers = self.resources.workers
        _require(
            self.batch_size % workers == 0,
            f"batch_size {self.batch_size} is the global batch and must be divisible by resources.workers "
            f"({workers}); e.g. {max(workers, self.batch_size // workers * workers)}",
        )
        _require(self.max_failures >= 0, "max_failures must be >= 0")
        _require(PRIORITY_RANGE[0] <= self.priority <= PRIORITY_RANGE[1],
                 f"priority must lie in [{PRIORITY_RANGE[0]}, {PRIORITY_RANGE[1]}]")
        _require(self.schedule.kind != "cosine" or self.schedule.min_lr <= self.optimizer.lr,
                 f"schedule.min_lr {self.schedule.min_lr:g} must not exceed optimizer.lr {self.optimizer.lr:g}")
        _require(not self.fault.enabled or self.fault.kill_rank < workers,
                 f"fault.kill_rank {self.fault.kill_rank} must be a worker rank in [0, {workers - 1}]")

    def _check_user_code(self) -> None:
        _require(self.task in TASKS, f"task {self.task!r} must be one of {', '.join(TASKS)}")
        if self.loss:
            check_import_path(self.loss, "loss")
        if self.train_step:
            check_import_path(self.train_step, "train_step")
        builtin = ("loss", "mse", "mae") if self.task == "regression" else ("loss", "accuracy")
        for name, path in self.metrics.items():
            _require(bool(METRIC_NAME_RE.match(name)),
                     f"metrics: name {name!r} must be an identifier (letters, digits, _); it is reported as val_<name>")
            _require(name not in builtin,
                     f"metrics.{name}: val_{name} is already reported for task {self.task!r}; choose another name")
            check_import_path(path, f"metrics.{name}")

    @property
    def model_name(self) -> str:
        """The registry model name: export.model_name, else the job name."""
        return self.export.model_name or self.name


def parse_spec(data: Mapping[str, Any]) -> JobSpec:
    """Validate a plain mapping (from YAML, JSON or code) into a JobSpec.

    Raises ConfigError whose message names the bad field (msgspec's path,
    e.g. ``$.optimizer``, plus the field and its allowed values or range).
    Lenient about scalar types the way YAML needs (``"5"`` for an int)."""
    try:
        return msgspec.convert(data, JobSpec, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid job spec: {exc}") from None


def load_spec(path: str | Path) -> JobSpec:
    """Read and validate a YAML job spec; every ConfigError names the file
    (and the field). Unreadable files and bad YAML are ConfigErrors too. A
    relative ``code`` folder is taken relative to the file's folder."""
    # Imported here: serving.config does not import Ray, but importing it
    # loads the serving package (gRPC, SciPy), which spec users rarely need.
    from flywheel.common.yaml_files import load_yaml

    spec = load_yaml(path, parse_spec, what="job spec")
    if spec.code and not Path(spec.code).expanduser().is_absolute():
        # a job file names its code beside itself, wherever it is run from
        folder = Path(path).resolve().parent / spec.code
        spec = msgspec.structs.replace(spec, code=str(folder))
    return spec


def spec_to_dict(spec: JobSpec) -> dict[str, Any]:
    """The spec as JSON builtins (every field, defaults included; sequences
    as lists); ``parse_spec(spec_to_dict(s)) == s``."""
    # Through JSON rather than msgspec.to_builtins, which keeps tuples: a
    # dict with lists compares equal to itself after a trip through the job
    # store (JSON in the database), one with tuples does not.
    return msgspec.json.decode(msgspec.json.encode(spec))
