"""``flywheel predict``: score files with a model, on Ray Data.

    flywheel predict --model digits@production --input data/ --output scored/
    flywheel predict --model model.onnx --input 's3://bucket/day=*/part-*.parquet' --output s3://bucket/scored/
    flywheel predict --model digits/3 --input holdout.parquet --output eval/ --label y --register
    flywheel predict --config job.yaml

Writes one Parquet file per input partition: ``source`` and ``row`` (where
each row came from), the ``--keys`` columns, the label, the model's outputs,
``model_version`` and ``run_id``. Running the same command again after a
crash resumes it: finished partitions are kept, the rest are scored. The exit
status is 1 when a partition failed (the others are written; re-run to retry
those) or the written output could not be evaluated, and 2 when the run could
not start (the message names the file, column and expectation).
"""

from __future__ import annotations

import argparse
import sys

import msgspec

from flywheel.cli._shared import add_json_flag, add_registry_arguments
from flywheel.protocol.errors import ConfigError

HELP = "score files and data sets with a model on Ray Data (batch inference, evaluation)"


def _mapping(items: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, cols = item.partition("=")
        if not sep or not name or not cols:
            raise ConfigError(f"--map {item!r}: expected INPUT=COLUMN[,COLUMN...] (globs allowed)")
        out[name] = [c for c in cols.split(",") if c]
    return out


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help=HELP, description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a YAML job (the fields of flywheel.batch.PredictJob); flags override it")
    p.add_argument("--model", help="name@alias, name/version or name in the registry, or an .onnx file")
    p.add_argument("--input", help="a file, folder, glob or fsspec URI (Parquet, CSV, .npy or image folders)")
    p.add_argument("--output", help="the folder (or fsspec URI) that receives the Parquet output")
    p.add_argument("--format", choices=("auto", "parquet", "csv", "npy", "images"), help="input format "
                   "(default: from the file extensions)")
    p.add_argument("--map", action="append", default=[], metavar="INPUT=COL[,COL...]",
                   help="the columns (globs allowed) that make a model input; repeat per input")
    p.add_argument("--keys", help="comma-separated input columns copied to the output")
    p.add_argument("--label", help="the label column: evaluate the model over the whole input")
    p.add_argument("--task", choices=("auto", "classification", "regression"), help="evaluation metrics to compute")
    p.add_argument("--score-output", help="the model output that evaluation scores (default: the first)")
    p.add_argument("--classes", help="comma-separated label values in class-index order (string labels)")
    p.add_argument("--register", action="store_true", default=None,
                   help="record the evaluation on the registry version (needs --label)")
    p.add_argument("--dataset", help="the name the evaluation is recorded under (default: the input)")
    p.add_argument("--backend", help="runtime backend (default onnxruntime; torch, tensorrt, or a plug-in)")
    p.add_argument("--artifact", help="which artifact of the registry version to load")
    p.add_argument("--actors", type=int, help="scoring actors (default: as many as free CPUs allow)")
    p.add_argument("--num-cpus", type=float, help="Ray CPUs per actor (default 1)")
    p.add_argument("--num-gpus", type=float, help="Ray GPUs per actor (default 0)")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads per actor (default 1)")
    p.add_argument("--batch-rows", type=int, help="rows per model call (default 8192)")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="discard an earlier run in --output instead of resuming it")
    add_registry_arguments(p)
    add_json_flag(p, [], help="print the report as JSON")
    p.set_defaults(func=_cmd_predict)


_FLAGS = ("model", "input", "output", "format", "label", "task", "score_output", "register", "dataset",
          "backend", "artifact", "actors", "num_cpus", "num_gpus", "threads", "batch_rows", "overwrite")


def _a_mapping(data) -> dict:
    if not isinstance(data, dict):
        raise ConfigError(f"a batch job is a mapping of PredictJob fields, not {type(data).__name__}")
    return data


def job_from_args(args: argparse.Namespace):
    """The PredictJob the flags (over ``--config``) describe."""
    from flywheel.batch import parse_job
    from flywheel.common.yaml_files import load_yaml

    data: dict = dict(load_yaml(args.config, _a_mapping, what="batch job")) if args.config else {}
    for flag in _FLAGS:
        value = getattr(args, flag)
        if value is not None:
            data[flag] = value
    if args.map:
        data["columns"] = _mapping(args.map)
    for flag in ("keys", "classes"):
        if getattr(args, flag):
            data[flag] = [c for c in getattr(args, flag).split(",") if c]
    data.setdefault("registry", args.registry)
    data.setdefault("artifacts", args.artifacts)
    data.setdefault("actor", args.actor)
    missing = [f"--{f}" for f in ("model", "input", "output") if not data.get(f)]
    if missing:
        raise ConfigError(f"give {', '.join(missing)} (or a --config that has them)")
    return parse_job(data)


def _cmd_predict(args: argparse.Namespace) -> None:
    from flywheel.runtime.extras import require_extra

    require_extra("batch", ("pyarrow", "pandas"), "flywheel predict")
    from flywheel.batch import run

    report = run(job_from_args(args), progress=True)
    if args.json:
        print(msgspec.json.encode(report).decode())
    else:
        print(f"run {report.run_id}: {report.model} -> {report.output}")
        print(f"  partitions: {report.partitions} ({report.skipped} already written, {report.scored} scored, "
              f"{len(report.failed)} failed)")
        print(f"  rows: {report.rows:,} in {report.seconds:.1f}s ({report.rows_per_s:,.0f} rows/s) on "
              f"{report.actors} actor(s), {len(report.nodes)} node(s); peak actor RSS {report.peak_rss_mb:.0f} MiB")
        for k, v in report.metrics.items():
            print(f"  {k}: {v:.6g}")
        if report.evaluation_id is not None:
            print(f"  evaluation #{report.evaluation_id} recorded (data fingerprint {report.dataset_fingerprint[:12]})")
        for f in report.failed:
            print(f"  FAILED {f.partition} ({f.source}): {f.error}", file=sys.stderr)
    if report.evaluation_error:
        print(f"evaluation failed: {report.evaluation_error}", file=sys.stderr)
    if report.failed:
        print(f"{len(report.failed)} partition(s) failed; run the same command again to retry them",
              file=sys.stderr)
    if not report.ok:
        raise SystemExit(1)
