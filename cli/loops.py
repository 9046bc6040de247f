"""``flywheel loops ...``: continuous-training loops from the command line.

Reads and requests go to the registry's database, as ``flywheel models``
does, so they work whether or not the server is up; the loop controller
applies a pause, resume or trigger at its next tick. Changes are recorded in
the audit log under the OS account that ran the command (``os:<account>``).
"""

from __future__ import annotations

import argparse

import msgspec

from flywheel.cli._shared import add_json_flag, add_registry_arguments, os_identity, table, when
from flywheel.loops.operate import list_loops, loop_runs, request, show_loop, timeline
from flywheel.registry import LoopStore, Registry

HELP = "continuous-training loops: list, show, runs, trigger, pause, resume, cancel"


def _emit(args, data, text: str) -> None:
    print(msgspec.json.encode(data).decode() if args.json else text)


def _runs_table(runs: list[dict]) -> str:
    return table(
        ["run", "trigger", "phase", "outcome", "started", "version", "reason"],
        [(r["id"], r["trigger"], r["phase"], r["outcome"] or "-", when(r["started_at"]),
          r["detail"].get("version", "-"), (r["detail"].get("outcome_reason") or r["reason"])[:80])
         for r in runs])


def cmd_list(store, reg, args) -> None:
    loops = list_loops(store, args.deployment)
    _emit(args, loops, table(
        ["loop", "paused", "current run", "phase", "last outcome"],
        [(lp["name"], "yes" if lp["paused"] else "no",
          lp["current_run"]["id"] if lp["current_run"] else "-",
          lp["current_run"]["phase"] if lp["current_run"] else "-",
          f"{lp['last_outcome']['outcome']} ({lp['last_outcome']['run']})" if lp["last_outcome"] else "-")
         for lp in loops]))


def cmd_show(store, reg, args) -> None:
    doc = show_loop(store, args.deployment, args.loop)
    lines = [f"loop {doc['name']} ({'paused' if doc['paused'] else 'running'}), last tick {when(doc['last_tick'])}"]
    lines.append(_runs_table(doc["runs"]))
    if doc["runs"]:
        newest = doc["runs"][0]
        lines.append(f"\ntimeline of {newest['id']}:")
        start = newest["started_at"]
        for ts, kind, detail in timeline(store, args.deployment, args.loop, newest["id"]):
            extra = " ".join(f"{k}={v}" for k, v in detail.items() if not isinstance(v, (dict, list)))
            lines.append(f"  t={ts - start:7.1f}s  {kind:<20} {extra}"[:160])
    _emit(args, doc, "\n".join(lines))


def cmd_runs(store, reg, args) -> None:
    runs = loop_runs(store, args.deployment, args.loop, limit=args.limit)
    _emit(args, runs, _runs_table(runs))


def _request(action: str):
    def cmd(store, reg, args) -> None:
        actor = os_identity()
        out = request(store, reg, args.deployment, args.loop, action, actor=actor, note=getattr(args, "note", ""))
        _emit(args, out, f"{action} of loop {args.loop} requested by {actor}; the controller applies it at its "
                         "next tick")
    return cmd


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("loops", help=HELP, description=__doc__)
    add_registry_arguments(p)
    p.add_argument("--deployment", default="flywheel",
                   help="the deployment's name (its config's `name`; default: %(default)s)")
    cmds = p.add_subparsers(dest="loops_command", required=True, metavar="SUBCOMMAND")
    leaves = []

    def leaf(name: str, help: str, func, *, loop: bool = True) -> argparse.ArgumentParser:
        c = cmds.add_parser(name, help=help, description=help)
        c.set_defaults(loops_func=func)
        if loop:
            c.add_argument("loop", help="the loop's name")
        leaves.append(c)
        return c

    leaf("list", "every loop of the deployment: paused, current run, last outcome", cmd_list, loop=False)
    leaf("show", "one loop: its runs and the newest run's timeline", cmd_show)
    c = leaf("runs", "one loop's runs, newest first", cmd_runs)
    c.add_argument("--limit", type=int, default=100, help="at most this many runs (default: %(default)s)")
    c = leaf("trigger", "start a run now (the guard rails still apply, but not cooldown or budget)",
             _request("trigger"))
    c.add_argument("--note", default="", help="why, for the audit log")
    leaf("pause", "stop the loop's triggers (a run in progress finishes)", _request("pause"))
    leaf("resume", "let the loop's triggers fire again", _request("resume"))
    c = leaf("cancel", "end the run in progress (its job cancelled, its canary aborted)", _request("cancel"))
    c.add_argument("--note", default="", help="why, for the audit log")
    add_json_flag(p, leaves)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    store = LoopStore.open(args.registry)
    reg = Registry.open(args.registry, args.artifacts)
    try:
        args.loops_func(store, reg, args)
    finally:
        store.close()
        reg.close()
