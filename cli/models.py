"""``flywheel models ...``: the registry from the command line.

Every subcommand prints a human-readable table, or JSON with ``--json``.
Errors print ``error: <message>`` and exit 2.

Governance: ``alias NAME production V`` is the same gated move as ``promote
NAME V production`` (refused, naming the failed rule, unless the gates pass);
``approve`` records the OS user running it as ``os:<user>`` and refuses an
``--actor`` naming anyone else (an approval must come from who is there).

``register --from-xgboost FILE`` / ``--from-lightgbm FILE`` /
``--from-sklearn MODULE:FUNCTION`` convert the model to ONNX
(flywheel.runtime.convert, the convert extra), check it against the original
on sample rows and register ``model.onnx`` with its signature, the source
file and tags naming the framework and the source's sha256.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math

import msgspec

from flywheel.cli._shared import add_json_flag, add_registry_arguments, os_identity, table, when
from flywheel.common.settings import load_settings
from flywheel.protocol.errors import ConfigError, PermissionDeniedError
from flywheel.registry import Lineage, Registry, code_version, load_policy
from flywheel.registry.registry import identity
from flywheel.runtime.convert import DEFAULT_TOLERANCE


def _time_arg(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither epoch seconds nor an ISO date/time") from None
    return (t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)).timestamp()


def _pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --{what} {item!r} must look like key=value")
        out[key] = value
    return out


def _emit(args, data, text: str) -> None:
    print(msgspec.json.encode(data).decode() if args.json else text)


def _versionstable(versions) -> str:
    return table(
        ["version", "stage", "aliases", "created", "by", "metrics"],
        [(v.version, v.stage, ",".join(v.aliases), when(v.created_at), v.created_by,
          " ".join(f"{k}={x:g}" for k, x in v.metrics.items())) for v in versions],
    )


def _evaluationstable(evaluations) -> str:
    return table(
        ["id", "dataset", "fingerprint", "rows", "metrics", "run_id", "when", "by"],
        [(e.id, e.dataset, e.fingerprint[:12], e.rows, " ".join(f"{k}={x:g}" for k, x in e.metrics.items()),
          e.run_id or "-", when(e.created_at), e.created_by) for e in evaluations],
    )


def cmd_list(reg: Registry, args) -> None:
    models = reg.list_models()
    _emit(args, models, table(
        ["name", "latest", "aliases", "created by", "description"],
        [(m.name, m.latest_version, " ".join(f"{a}->{v}" for a, v in m.aliases.items()), m.created_by,
          m.description) for m in models]))


def cmd_show(reg: Registry, args) -> None:
    if "@" in args.ref or "/" in args.ref:
        v = reg.resolve(args.ref)
        arts = table(["artifact", "size", "sha256"], [(a.name, a.size, a.sha256) for a in v.artifacts.values()])
        _emit(args, v, f"{v.ref}  stage={v.stage}  aliases={','.join(v.aliases) or '-'}\n"
                        f"created {when(v.created_at)} by {v.created_by}\nmetrics {v.metrics}\nparams {v.params}\n"
                        f"tags {v.tags}\n\n{arts}")
        return
    versions = reg.list_versions(args.ref)
    _emit(args, versions, _versionstable(versions))


def cmd_lineage(reg: Registry, args) -> None:
    report = reg.lineage(args.ref)
    rows = []
    for v in [report.version, *report.ancestors]:
        lin = v.lineage
        rows.append((v.ref, lin.data_fingerprint[:16] or "-",
                     (lin.code_commit[:12] + ("+dirty" if lin.code_dirty else "")) or "-",
                     lin.job_id or "-", lin.parent or "-", v.created_by, when(v.created_at)))
    text = table(["version", "data", "code", "job", "parent", "by", "created"], rows)
    cfg = report.version.lineage.training_config
    if cfg:
        text += f"\n\ntraining config of {report.version.ref}: {msgspec.json.encode(cfg).decode()}"
    if report.evaluations:
        text += f"\n\nevaluations of {report.version.ref}:\n{_evaluationstable(report.evaluations)}"
    _emit(args, report, text)


def cmd_evaluations(reg: Registry, args) -> None:
    v = reg.resolve(args.ref)
    evaluations = reg.evaluations(v.name, v.version, dataset=args.dataset)
    _emit(args, evaluations, _evaluationstable(evaluations))


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number >= 0 (e.g. 1e-4)")
    return value


def _convert(args):
    """The converted model a ``--from-*`` flag names (None without one)."""
    from flywheel.runtime.convert import convert_file, convert_sklearn_factory

    if args.from_sklearn:
        return convert_sklearn_factory(args.from_sklearn, sample=args.sample, tolerance=args.tolerance)
    for framework in ("xgboost", "lightgbm"):
        path = getattr(args, f"from_{framework}")
        if path:
            return convert_file(framework, path, sample=args.sample, tolerance=args.tolerance)
    if args.sample or args.tolerance != DEFAULT_TOLERANCE:
        raise ConfigError("--sample and --tolerance go with --from-sklearn, --from-xgboost or --from-lightgbm")
    return None


def cmd_register(reg: Registry, args) -> None:
    artifacts = _pairs(args.artifact, "artifact")
    converted = _convert(args)
    if converted is None and not artifacts:
        raise ConfigError("register needs --artifact NAME=PATH, or a model to convert: --from-sklearn, "
                          "--from-xgboost or --from-lightgbm")
    commit, dirty = code_version(".")
    lineage = Lineage(data_fingerprint=args.data_fingerprint, code_commit=commit, code_dirty=dirty,
                      parent=args.parent, job_id=args.job_id)
    metrics = {k: float(v) for k, v in _pairs(args.metric, "metric").items()}
    params, tags = _pairs(args.param, "param"), _pairs(args.tag, "tag")
    if converted is None:
        v = reg.register_version(args.name, artifacts, actor=args.actor, metrics=metrics, params=params,
                                 tags=tags, lineage=lineage)
        _emit(args, v, f"registered {v.ref}")
        return
    v = converted.register(reg, args.name, actor=args.actor, lineage=lineage, artifacts=artifacts,
                           metrics=metrics, params=params, tags=tags)
    p = converted.parity
    _emit(args, v, f"registered {v.ref}: ONNX converted from {converted.framework} "
                   f"{converted.source_file or '(in memory)'}; parity on {p.rows} rows ({p.sample}): "
                   f"max abs diff {p.max_abs_diff:.3g}, tolerance {p.tolerance:g}")


def cmd_alias(reg: Registry, args) -> None:
    if args.delete:
        reg.delete_alias(args.name, args.alias, actor=args.actor)
        _emit(args, {"deleted": f"{args.name}@{args.alias}"}, f"deleted {args.name}@{args.alias}")
        return
    if args.version is None:
        raise SystemExit("error: alias needs a VERSION (or --delete)")
    reg.set_alias(args.name, args.alias, args.version, actor=args.actor)
    _emit(args, {"alias": f"{args.name}@{args.alias}", "version": args.version},
          f"{args.name}@{args.alias} -> {args.version}")


def cmd_promote(reg: Registry, args) -> None:
    v = reg.promote(args.name, args.version, args.stage, actor=args.actor)
    _emit(args, v, f"{v.ref} is now in {v.stage}")


def cmd_rollback(reg: Registry, args) -> None:
    v = reg.rollback(args.name, actor=args.actor, to=args.to)
    _emit(args, v, f"rolled back: {v.ref} is in production again")


def approver() -> str:
    """The approver the CLI records: the OS account running it, as ``os:<account>``."""
    return identity(os_identity())


def cmd_approve(reg: Registry, args) -> None:
    who = approver()
    if args.actor != load_settings().actor:  # given on the command line: nobody approves for someone else
        raise PermissionDeniedError(
            f"approvals are recorded as the OS user running the command ({who}); --actor {args.actor!r} "
            "cannot name the approver"
        )
    reg.approve(args.name, args.version, actor=who, comment=args.comment)
    _emit(args, {"approved": f"{args.name}/{args.version}", "by": who},
          f"{who} approved {args.name}/{args.version}")


def cmd_policy(reg: Registry, args) -> None:
    policy = load_policy(args.file)
    reg.set_policy(args.name, policy, actor=args.actor)
    _emit(args, policy, f"policy of {args.name}: {len(policy.rules)} rule(s)")


def cmd_audit(reg: Registry, args) -> None:
    entries = reg.audit(model=args.model, actor=args.by, since=args.since, until=args.until,
                        loop_run=args.loop_run, limit=args.limit)
    _emit(args, entries, table(
        ["id", "time", "actor", "action", "model", "version", "loop_run", "before", "after"],
        [(e.id, when(e.ts), e.actor, e.action, e.model, e.version if e.version is not None else "-",
          e.loop_run or "-", msgspec.json.encode(e.before).decode(), msgspec.json.encode(e.after).decode())
         for e in entries]))


HELP = ("the model registry: list, show, lineage, evaluations, register, alias, promote, rollback, approve, "
        "policy, audit")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help=HELP, description=__doc__)
    add_registry_arguments(p)
    cmds = p.add_subparsers(dest="models_command", required=True, metavar="SUBCOMMAND")
    leaves = []

    def leaf(name: str, help: str, func) -> argparse.ArgumentParser:
        c = cmds.add_parser(name, help=help, description=help)
        c.set_defaults(models_func=func)
        leaves.append(c)
        return c

    leaf("list", "registered models", cmd_list)
    c = leaf("show", "a model's versions (NAME) or one version (NAME/V or NAME@ALIAS)", cmd_show)
    c.add_argument("ref", help="NAME, NAME/VERSION or NAME@ALIAS")
    c = leaf("lineage", "how a version was produced, what it derives from and its evaluations",
             cmd_lineage)
    c.add_argument("ref", help="NAME/VERSION or NAME@ALIAS")
    c = leaf("evaluations", "a version's evaluations on datasets, oldest first", cmd_evaluations)
    c.add_argument("ref", help="NAME/VERSION, NAME@ALIAS or NAME (its latest version)")
    c.add_argument("--dataset", help="only evaluations on this dataset (its URI/name or its fingerprint)")
    c = leaf("register", "register a new version from local files, or from a scikit-learn, XGBoost or LightGBM "
                         "model converted to ONNX (model.onnx) after a parity check", cmd_register)
    c.add_argument("name", help="the model's name")
    c.add_argument("--artifact", action="append",
                   help="name=path of a file to store with the version (repeatable; needed without --from-*)")
    source = c.add_mutually_exclusive_group()
    source.add_argument("--from-xgboost", metavar="FILE",
                        help="convert an XGBoost model saved by XGBoost itself (.json or .ubj)")
    source.add_argument("--from-lightgbm", metavar="FILE", help="convert a LightGBM text model file (.txt)")
    source.add_argument("--from-sklearn", metavar="MODULE:FUNCTION",
                        help="convert the fitted scikit-learn estimator this function returns (called with no "
                             "arguments; MODULE from the current folder first). Pickle files are refused: "
                             "loading one runs its code")
    c.add_argument("--sample", metavar="FILE",
                   help="rows (.npy, or .csv of numbers) to check the ONNX model against the original on "
                        "(default: 64 rows generated from the model's split thresholds, or standard normal)")
    c.add_argument("--tolerance", type=_tolerance, default=DEFAULT_TOLERANCE,
                   help="largest difference allowed in the parity check: absolute for values up to 1 "
                        "(probabilities), relative beyond (default: %(default)g)")
    c.add_argument("--metric", action="append", help="key=number (repeatable)")
    c.add_argument("--param", action="append", help="key=value (repeatable)")
    c.add_argument("--tag", action="append", help="key=value (repeatable)")
    c.add_argument("--data-fingerprint", default="", help="fingerprint of the training data, for lineage")
    c.add_argument("--parent", default="", help="name/version this derives from")
    c.add_argument("--job-id", default="", help="the training job that produced it, for lineage")
    c = leaf("alias", "point NAME@ALIAS at VERSION (or --delete it); 'production' passes the gates like "
                      "promote, and cannot be deleted while a version is in production", cmd_alias)
    c.add_argument("name", help="the model's name")
    c.add_argument("alias", help="the alias (e.g. champion)")
    c.add_argument("version", type=int, nargs="?", help="the version it points at (omit with --delete)")
    c.add_argument("--delete", action="store_true", help="remove the alias")
    c = leaf("promote", "move a version to a stage (production checks the gates)", cmd_promote)
    c.add_argument("name", help="the model's name")
    c.add_argument("version", type=int, help="the version to move")
    c.add_argument("stage", choices=["staging", "production", "archived", "none"], help="the stage it moves to")
    c = leaf("rollback", "put the previous production version back (no gates: the emergency exit, only to a "
                         "version that was in production before)", cmd_rollback)
    c.add_argument("name", help="the model's name")
    c.add_argument("--to", type=int, help="the former production version to restore (default: the latest)")
    c = leaf("approve", "approve a version for production, as the OS user running this (recorded as "
                        "os:USER; --actor is refused here: nobody approves for someone else)", cmd_approve)
    c.add_argument("name", help="the model's name")
    c.add_argument("version", type=int, help="the version approved")
    c.add_argument("--comment", default="", help="why, for the audit log")
    c = leaf("policy", "set a model's promotion gates from a YAML file", cmd_policy)
    c.add_argument("name", help="the model's name")
    c.add_argument("file", help="the gate policy (YAML)")
    c = leaf("audit", "the audit log, oldest first", cmd_audit)
    c.add_argument("--model", help="only this model")
    c.add_argument("--by", help="only this actor")
    c.add_argument("--loop-run", help="only the entries of this loop run (its id)")
    c.add_argument("--since", type=_time_arg, help="epoch seconds or ISO time (UTC unless given)")
    c.add_argument("--until", type=_time_arg, help="epoch seconds or ISO time (UTC unless given)")
    c.add_argument("--limit", type=int, default=1000, help="at most this many entries (default: %(default)s)")
    add_json_flag(p, leaves)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    reg = Registry.open(args.registry, args.artifacts)
    try:
        args.models_func(reg, args)
    finally:
        reg.close()
