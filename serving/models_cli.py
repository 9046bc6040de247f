"""``flywheel models ...``: the registry from the command line.

Every subcommand prints a human-readable table, or JSON with ``--json``.
Errors print ``error: <message>`` and exit 2.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Sequence

import msgspec

from flywheel.registry import Lineage, Registry, code_version, load_policy
from flywheel.serving.settings import load_settings


def _table(headers: Sequence[str], rows: list[Sequence[object]]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


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


def _versions_table(versions) -> str:
    return _table(
        ["version", "stage", "aliases", "created", "by", "metrics"],
        [(v.version, v.stage, ",".join(v.aliases), _when(v.created_at), v.created_by,
          " ".join(f"{k}={x:g}" for k, x in v.metrics.items())) for v in versions],
    )


def cmd_list(reg: Registry, args) -> None:
    models = reg.list_models()
    _emit(args, models, _table(
        ["name", "latest", "aliases", "created by", "description"],
        [(m.name, m.latest_version, " ".join(f"{a}->{v}" for a, v in m.aliases.items()), m.created_by,
          m.description) for m in models]))


def cmd_show(reg: Registry, args) -> None:
    if "@" in args.ref or "/" in args.ref:
        v = reg.resolve(args.ref)
        arts = _table(["artifact", "size", "sha256"], [(a.name, a.size, a.sha256) for a in v.artifacts.values()])
        _emit(args, v, f"{v.ref}  stage={v.stage}  aliases={','.join(v.aliases) or '-'}\n"
                        f"created {_when(v.created_at)} by {v.created_by}\nmetrics {v.metrics}\nparams {v.params}\n"
                        f"tags {v.tags}\n\n{arts}")
        return
    versions = reg.list_versions(args.ref)
    _emit(args, versions, _versions_table(versions))


def cmd_lineage(reg: Registry, args) -> None:
    report = reg.lineage(args.ref)
    rows = []
    for v in [report.version, *report.ancestors]:
        lin = v.lineage
        rows.append((v.ref, lin.data_fingerprint[:16] or "-",
                     (lin.code_commit[:12] + ("+dirty" if lin.code_dirty else "")) or "-",
                     lin.job_id or "-", lin.parent or "-", v.created_by, _when(v.created_at)))
    text = _table(["version", "data", "code", "job", "parent", "by", "created"], rows)
    cfg = report.version.lineage.training_config
    if cfg:
        text += f"\n\ntraining config of {report.version.ref}: {msgspec.json.encode(cfg).decode()}"
    _emit(args, report, text)


def cmd_register(reg: Registry, args) -> None:
    artifacts = _pairs(args.artifact, "artifact")
    commit, dirty = code_version(".")
    lineage = Lineage(data_fingerprint=args.data_fingerprint, code_commit=commit, code_dirty=dirty,
                      parent=args.parent, job_id=args.job_id)
    metrics = {k: float(v) for k, v in _pairs(args.metric, "metric").items()}
    v = reg.register_version(args.name, artifacts, actor=args.actor, metrics=metrics,
                             params=_pairs(args.param, "param"), tags=_pairs(args.tag, "tag"), lineage=lineage)
    _emit(args, v, f"registered {v.ref}")


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
    v = reg.rollback(args.name, actor=args.actor)
    _emit(args, v, f"rolled back: {v.ref} is in production again")


def cmd_approve(reg: Registry, args) -> None:
    reg.approve(args.name, args.version, actor=args.actor, comment=args.comment)
    _emit(args, {"approved": f"{args.name}/{args.version}", "by": args.actor},
          f"{args.actor} approved {args.name}/{args.version}")


def cmd_policy(reg: Registry, args) -> None:
    policy = load_policy(args.file)
    reg.set_policy(args.name, policy, actor=args.actor)
    _emit(args, policy, f"policy of {args.name}: {len(policy.rules)} rule(s)")


def cmd_audit(reg: Registry, args) -> None:
    entries = reg.audit(model=args.model, actor=args.by, since=args.since, until=args.until, limit=args.limit)
    _emit(args, entries, _table(
        ["id", "time", "actor", "action", "model", "version", "before", "after"],
        [(e.id, _when(e.ts), e.actor, e.action, e.model, e.version if e.version is not None else "-",
          msgspec.json.encode(e.before).decode(), msgspec.json.encode(e.after).decode()) for e in entries]))


def add_parser(sub: argparse._SubParsersAction) -> None:
    settings = load_settings()
    p = sub.add_parser("models", help="the model registry: list, show, lineage, alias, promote, approve, audit")
    p.add_argument("--registry", default=settings.registry_uri, help="registry URI (default: %(default)s)")
    p.add_argument("--artifacts", default=settings.artifacts_uri, help="artifact store (default: %(default)s)")
    p.add_argument("--actor", default=settings.actor, help="who acts, for the audit log (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    cmds = p.add_subparsers(dest="models_command", required=True)
    c = cmds.add_parser("list", help="registered models")
    c.set_defaults(models_func=cmd_list)
    c = cmds.add_parser("show", help="a model's versions (NAME) or one version (NAME/V or NAME@ALIAS)")
    c.add_argument("ref")
    c.set_defaults(models_func=cmd_show)
    c = cmds.add_parser("lineage", help="how a version was produced, and what it derives from")
    c.add_argument("ref")
    c.set_defaults(models_func=cmd_lineage)
    c = cmds.add_parser("register", help="register a new version from local files")
    c.add_argument("name")
    c.add_argument("--artifact", action="append", required=True, help="name=path (repeatable)")
    c.add_argument("--metric", action="append", help="key=number (repeatable)")
    c.add_argument("--param", action="append", help="key=value (repeatable)")
    c.add_argument("--tag", action="append", help="key=value (repeatable)")
    c.add_argument("--data-fingerprint", default="")
    c.add_argument("--parent", default="", help="name/version this derives from")
    c.add_argument("--job-id", default="")
    c.set_defaults(models_func=cmd_register)
    c = cmds.add_parser("alias", help="point NAME@ALIAS at VERSION (or --delete it)")
    c.add_argument("name")
    c.add_argument("alias")
    c.add_argument("version", type=int, nargs="?")
    c.add_argument("--delete", action="store_true")
    c.set_defaults(models_func=cmd_alias)
    c = cmds.add_parser("promote", help="move a version to a stage (production checks the gates)")
    c.add_argument("name")
    c.add_argument("version", type=int)
    c.add_argument("stage", choices=["staging", "production", "archived", "none"])
    c.set_defaults(models_func=cmd_promote)
    c = cmds.add_parser("rollback", help="put the previous production version back")
    c.add_argument("name")
    c.set_defaults(models_func=cmd_rollback)
    c = cmds.add_parser("approve", help="approve a version for production")
    c.add_argument("name")
    c.add_argument("version", type=int)
    c.add_argument("--comment", default="")
    c.set_defaults(models_func=cmd_approve)
    c = cmds.add_parser("policy", help="set a model's promotion gates from a YAML file")
    c.add_argument("name")
    c.add_argument("file")
    c.set_defaults(models_func=cmd_policy)
    c = cmds.add_parser("audit", help="the audit log, oldest first")
    c.add_argument("--model")
    c.add_argument("--by", help="only this actor")
    c.add_argument("--since", type=_time_arg, help="epoch seconds or ISO time (UTC unless given)")
    c.add_argument("--until", type=_time_arg)
    c.add_argument("--limit", type=int, default=1000)
    c.set_defaults(models_func=cmd_audit)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    reg = Registry.open(args.registry, args.artifacts)
    try:
        args.models_func(reg, args)
    finally:
        reg.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: flywheel models ...")
