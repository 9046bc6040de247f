"""The driver of a batch run: resolve the model, plan and check the input,
start or resume the output, score the missing partitions on Ray Data's actor
pool, then evaluate and record.

Everything that can be known wrong before the run (a missing column, a
width or dtype the model does not take, an unreadable file footer) fails here,
before Ray starts, naming the file, the column and the expectation.
"""

from __future__ import annotations

import logging
import time
import warnings

import msgspec

from flywheel.batch.job import PredictJob
from flywheel.batch.mapping import InputPlan, plan_inputs
from flywheel.batch.metrics import evaluate, read_columns
from flywheel.batch.model import ModelSource, batch_rows, resolve
from flywheel.batch.output import Manifest, OutputFolder, new_run_id
from flywheel.batch.readers import IMAGE_COLUMN, IMAGE_LABEL_COLUMN, ImageShape, file_schema
from flywheel.batch.report import BatchReport, PartitionFailure, Progress
from flywheel.batch.scorer import PartitionScorer, ScoringPlan, csv_types, output_schema, pyarrow_schema
from flywheel.batch.sources import Partition, detect_format, fingerprint, open_input, plan_partitions
from flywheel.common.settings import load_settings
from flywheel.protocol.errors import ConfigError, FlywheelError, InvalidInputError, UnavailableError

log = logging.getLogger(__name__)



def predict(model: str, input: str, output: str, *, progress: bool = True, **options) -> BatchReport:
    """Score ``input`` with ``model`` into ``output``; see :class:`PredictJob`
    for the options. Starts a local Ray, or joins the one this process (or
    ``RAY_ADDRESS``) already has."""
    from flywheel.batch.job import parse_job

    return run(parse_job({"model": model, "input": input, "output": output, **options}), progress=progress)


def _check_columns(schema, part: Partition, job: PredictJob) -> None:
    names = set(schema.names) | set(part.hive)
    if part.format == "images":
        names.add(job.label)
    for what, col in [*(("keys", k) for k in job.keys), *((("label", job.label),) if job.label else ())]:
        if col not in names:
            raise InvalidInputError(f"input file {part.rel}: no column {col!r} ({what}); it has "
                                    f"{sorted(names)[:12]}")


class InputCheck(msgspec.Struct, frozen=True):
    """What checking the input against the model decided: the input plan,
    the image input's shape (format images), and each input column's Arrow
    type (the first non-null one across the files)."""

    plans: list[InputPlan]
    image: tuple = ()
    types: dict = {}


def plan_run(job: PredictJob, source: ModelSource, parts: list[Partition]) -> InputCheck:
    """The input plan, checked against every input file's schema."""
    from flywheel.protocol.datatypes import numpy_dtype

    sig = source.signature
    fs = _input_fs(job)
    if parts and parts[0].format == "images":
        if len(sig.inputs) != 1:
            raise InvalidInputError(f"format images: the model has {len(sig.inputs)} inputs; images feed one")
        spec = sig.inputs[0]
        shape = ImageShape(tuple(spec.shape), spec.name)
        schema = file_schema(fs, parts[0], shape, numpy_dtype(spec.datatype))
        plans = plan_inputs(schema, sig, "format images", columns={spec.name: [IMAGE_COLUMN]},
                            exclude={IMAGE_LABEL_COLUMN})
        _check_columns(schema, parts[0], job)
        return InputCheck(plans, tuple(spec.shape), {IMAGE_LABEL_COLUMN: schema.field(IMAGE_LABEL_COLUMN).type})
    import pyarrow as pa

    plans: list[InputPlan] | None = None
    types: dict = {}
    seen: set[str] = set()
    for part in parts:
        if part.path in seen:
            continue
        seen.add(part.path)
        schema = file_schema(fs, part)
        _check_columns(schema, part, job)
        for field in schema:
            if not pa.types.is_null(field.type):
                types.setdefault(field.name, field.type)
        exclude = set(job.keys) | set(part.hive) | ({job.label} if job.label else set())
        got = plan_inputs(schema, sig, f"input file {part.rel}", columns=job.columns, exclude=exclude)
        if plans is None:
            plans = got
        elif got != plans:
            raise InvalidInputError(f"input file {part.rel}: its columns feed the model differently from "
                                    f"{parts[0].rel}'s ({_describe(got)} vs {_describe(plans)}); make the files "
                                    "agree or map columns explicitly")
    return InputCheck(plans or [], (), types)


def scoring_plan(job: PredictJob, source: ModelSource, parts: list[Partition], fmt: str,
                 run_id: str = "") -> ScoringPlan:
    """What every actor is told: the checked input plan, the output schema,
    the batch size for the backend."""
    check = plan_run(job, source, parts)
    hive_keys = sorted({k for p in parts for k in p.hive})
    return ScoringPlan(
        job=job, model=source, inputs=check.plans, run_id=run_id,
        batch_rows=batch_rows(source.backend, job.batch_rows), image=check.image, hive_keys=hive_keys,
        output_schema=output_schema(job, source, hive_keys, check.types, fmt).serialize().to_pybytes(),
        csv_types=csv_types(job, check.plans, check.types).serialize().to_pybytes() if fmt == "csv" else b"",
    )


def _describe(plans: list[InputPlan]) -> str:
    return "; ".join(f"{p.name} <- {p.list_column or ', '.join(p.columns[:4])}" for p in plans)


def _input_fs(job: PredictJob):
    import fsspec

    return fsspec.core.url_to_fs(job.input)[0]


def _actors(job: PredictJob, pending: int) -> int:
    import ray

    if job.actors:
        # more than the whole cluster holds would wait for actors forever
        total = ray.cluster_resources()
        for what, each in (("CPU", job.num_cpus), ("GPU", job.num_gpus)):
            if each and job.actors * each > total.get(what, 0) + 1e-9:
                raise UnavailableError(
                    f"actors {job.actors} x num_{what.lower()}s {each:g} = {job.actors * each:g} {what}s; the "
                    f"cluster has {total.get(what, 0):g}. Ask for fewer actors or smaller shares"
                )
        return min(job.actors, pending)
    free = ray.available_resources()
    if job.num_gpus:
        n = int(free.get("GPU", 0) // job.num_gpus)
        if n < 1:
            raise UnavailableError(f"num_gpus {job.num_gpus}: the cluster has no free GPU share that large")
    else:
        n = int(free.get("CPU", 0) // job.num_cpus)
        if n < 1:
            raise UnavailableError(f"num_cpus {job.num_cpus}: the cluster has {free.get('CPU', 0):g} free CPUs")
    return max(1, min(n, pending))


def run(job: PredictJob, *, progress: bool | Progress = True) -> BatchReport:
    """Run (or resume) ``job``; returns its report. Failed partitions are in
    the report, not raised: the others were written."""
    settings = load_settings()
    registry = job.registry or settings.registry_uri
    artifacts = job.artifacts or settings.artifacts_uri
    started = time.perf_counter()

    source = resolve(job, registry, artifacts)
    if job.register and not source.ref:
        raise ConfigError("register: the model is a file; an evaluation is recorded on a registry version")
    fs, root, files = open_input(job.input)
    fmt = detect_format(files, job.format)
    parts = plan_partitions(fs, root, files, fmt, job.partition_rows)
    plan = scoring_plan(job, source, parts, fmt)
    score = ""
    if job.label:
        label_type = pyarrow_schema(plan.output_schema).field(job.label).type
        score = check_evaluation(job, source, None if fmt == "images" else label_type)

    out = OutputFolder(job.output)
    options = {"format": fmt, "columns": job.columns, "keys": job.keys, "label": job.label,
               "artifact": source.artifact, "backend": source.backend, "settings": job.settings,
               "partition_rows": job.partition_rows}
    manifest = Manifest(run_id=new_run_id(), model=source.label, model_sha256=source.sha256, options=options,
                        partitions={p.name: p.stamp for p in parts}, created_at=time.time())
    manifest, done = out.begin(manifest, job.overwrite)
    out.sweep()
    pending = [p for p in parts if p.name not in done]
    if done:
        log.warning("resuming run %s: %d of %d partitions already written", manifest.run_id, len(done), len(parts))
    plan = msgspec.structs.replace(plan, run_id=manifest.run_id)

    summaries, actors = _score(plan, pending, progress) if pending else ([], 0)
    by_name = {p.name: p for p in pending}
    failed = [PartitionFailure(s["name"], by_name[s["name"]].rel, s["error"]) for s in summaries if s["error"]]
    answered = {s["name"] for s in summaries}
    failed += [PartitionFailure(p.name, p.rel, f"{p.rel}: the actor scoring it died twice (a crash or the "
                                               "out-of-memory killer); see the Ray worker logs")
               for p in pending if p.name not in answered]
    scored = [s for s in summaries if not s["error"]]
    rows = sum(int(s["rows"]) for s in scored)
    seconds = time.perf_counter() - started

    metrics: dict[str, float] = {}
    data_fp = ""
    evaluation_id = None
    evaluation_error = ""
    if job.label and not failed:
        try:
            labels, scores = read_columns(out.fs, [out.part_path(p.name) for p in parts], job.label, score)
            metrics = evaluate(labels, scores, job.task, job.classes)
            if job.register:
                data_fp = fingerprint(fs, files, root)
                evaluation_id = _register(job, source, registry, artifacts, metrics, data_fp, manifest.run_id)
        except FlywheelError as exc:  # the output is written; say why its evaluation is not
            evaluation_error = exc.message
    report = BatchReport(
        run_id=manifest.run_id, model=source.label, model_sha256=source.sha256, output=job.output,
        partitions=len(parts), skipped=len(done), scored=len(scored), failed=failed, rows=rows,
        seconds=seconds, rows_per_s=rows / seconds if seconds > 0 else 0.0, actors=actors,
        nodes=sorted({str(s["node"]) for s in summaries}),
        peak_rss_mb=max((float(s["peak_rss_mb"]) for s in summaries), default=0.0),
        busy_s=sum(float(s["seconds"]) for s in summaries),
        metrics=metrics, dataset_fingerprint=data_fp, evaluation_id=evaluation_id,
        evaluation_error=evaluation_error,
    )
    out.write_json("report.json", report)
    return report


def _score(plan: ScoringPlan, pending: list[Partition], progress: bool | Progress) -> tuple[list[dict], int]:
    import ray

    from flywheel.common.ray_cluster import start_ray

    start_ray(load_settings(), log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    # our own progress line replaces Ray Data's bars and start-up chatter
    # (Ray Data sets its loggers' levels when it loads: after that)
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # a partition whose actor dies twice (a native crash, the OOM killer) is
    # skipped, not the run's end: it is reported failed like a corrupt file
    ctx.max_errored_blocks = len(pending)

    job = plan.job
    actors = _actors(job, len(pending))
    total_rows = sum(p.rows for p in pending) if all(p.rows >= 0 for p in pending) else None
    bar = progress if isinstance(progress, Progress) else (
        Progress(len(pending), total_rows, sum(p.size for p in pending)) if progress else None)
    sizes = {p.name: p.size for p in pending}
    items = [{"partition": msgspec.json.encode(p).decode()} for p in pending]
    with warnings.catch_warnings():
        # Ray 2.60 deprecates extra remote args without naming a replacement
        # for max_restarts / max_task_retries; Ray is pinned, so this holds
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            PartitionScorer,
            fn_constructor_args=(msgspec.msgpack.encode(plan),),
            batch_size=1,
            batch_format="numpy",
            # two partitions per actor: the next one waits in the actor, where one
            # at a time left it idle 100-200 ms between partitions (Ray Data's
            # dispatch); a run's tail can then wait on at most one partition
            compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=2),
            num_cpus=job.num_cpus,
            num_gpus=job.num_gpus or None,
            # a dead actor is replaced and its partition tried once more (Ray
            # Data's default retries forever: a poison partition would never end)
            max_restarts=-1,
            max_task_retries=1,
        )
    summaries = []
    try:
        for row in ds.iter_rows():
            summaries.append(row)
            if bar is not None:
                bar.advance(int(row["rows"]), sizes.get(row["name"], 0))
    except Exception as exc:  # noqa: BLE001 - the actor pool itself failed (the model did not load)
        cause = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise UnavailableError(f"batch run {plan.run_id}: the scoring actors failed: {cause}") from None
    return summaries, actors


def check_evaluation(job: PredictJob, source: ModelSource, label_type) -> str:
    """The output that evaluation scores, checked before the run: it exists,
    and the task fits it and the label's type (ConfigError naming the field)."""
    import pyarrow as pa

    outputs = {t.name: t for t in source.signature.outputs}
    score = job.score_output or next(iter(outputs))
    if score not in outputs:
        raise ConfigError(f"score_output {score!r} is not an output of the model; its outputs are {list(outputs)}")
    width = 1
    for d in outputs[score].shape[1:]:
        width *= d
    if job.task == "regression" and width != 1:
        raise ConfigError(f"task regression: output {score!r} has shape {list(outputs[score].shape)}; regression "
                          "scores one value per row (name another with score_output)")
    text = label_type is not None and (pa.types.is_string(label_type) or pa.types.is_large_string(label_type)
                                       or pa.types.is_dictionary(label_type))
    if text and job.task == "regression":
        raise ConfigError(f"task regression: label {job.label!r} is {label_type}; regression needs numbers")
    return score


def _register(job: PredictJob, source: ModelSource, registry: str, artifacts: str, metrics: dict[str, float],
              data_fp: str, run_id: str) -> int:
    from flywheel.registry import Registry

    name, _, version = source.ref.partition("/")
    reg = Registry.open(registry, artifacts)
    try:
        dataset = job.dataset or job.input
        for ev in reg.evaluations(name, int(version), dataset=data_fp):
            if ev.run_id == run_id and ev.dataset == dataset:  # a re-run of a finished run: recorded already
                return ev.id
        ev = reg.add_evaluation(name, int(version), dataset=dataset, fingerprint=data_fp,
                                metrics={k: v for k, v in metrics.items() if k != "rows"},
                                rows=int(metrics.get("rows", 0)), run_id=run_id, actor=job.actor)
        return ev.id
    finally:
        reg.close()
