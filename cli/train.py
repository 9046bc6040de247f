"""``flywheel train``: run a training job and watch it.

    flywheel train configs/train-digits.yaml [--priority 5] [--detach]
    flywheel train --list
    flywheel train --attach ID | --resume ID | --cancel ID

Running a spec submits it and runs this process's scheduler, printing live
progress (epoch, step, loss, samples/s) and each epoch's metrics until it
ends; ``--detach`` only queues it (another ``flywheel train`` process, or
any process with a scheduler, runs it). Ctrl-C cancels the job it follows
(its checkpoints stay: ``--resume ID`` continues from the latest).
"""

from __future__ import annotations

import argparse
import sys
import time

import msgspec

from flywheel.protocol.errors import InvalidInputError


HELP = "run a training job on Ray Train (DDP / FSDP) and register its model"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help=HELP, description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", nargs="?", help="a job spec (YAML; see training/spec.py)")
    p.add_argument("--priority", type=int, default=None, help="override the spec's priority (higher runs first)")
    p.add_argument("--detach", action="store_true", help="queue it and return")
    p.add_argument("--list", action="store_true", help="list jobs")
    p.add_argument("--attach", metavar="ID", help="follow a job")
    p.add_argument("--resume", metavar="ID", help="continue a failed, cancelled or orphaned job from its latest checkpoint")
    p.add_argument("--cancel", metavar="ID", help="cancel a job")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> None:
    from flywheel.runtime.extras import require_extra

    require_extra("train", ("torch", "pandas"), "flywheel train")
    from flywheel.training.api import TrainingRuntime
    from flywheel.training.spec import load_spec

    rt = TrainingRuntime()
    if args.list:
        _print_jobs(rt.list_jobs())
        return
    if args.cancel:
        print(f"{args.cancel}: {rt.attach(args.cancel).cancel().state}")
        return
    if args.resume:
        job = rt.resume(args.resume, run=not args.detach)
    elif args.attach:
        job = rt.attach(args.attach)
        if job.status().state == "queued":
            rt.start()  # someone has to run it
    elif args.spec:
        spec = load_spec(args.spec)
        if args.priority is not None:
            spec = msgspec.structs.replace(spec, priority=args.priority)
        job = rt.submit(spec, run=not args.detach)
        print(f"submitted job {job.id} ({spec.name}, priority {spec.priority})", flush=True)
    else:
        raise InvalidInputError("give a spec file, or one of --list, --attach, --resume, --cancel")
    if args.detach:
        return
    rt.stop_after(job.id)  # this process runs its job (and what must run first), not the queue after it
    try:
        rec = follow(job)
    except KeyboardInterrupt:
        print(f"\ncancelling {job.id} ...", flush=True)
        job.cancel()
        rec = job.wait(120)
    rt.stop(timeout=120)  # a job of another process that is running here goes back to the queue
    print(f"job {job.id}: {rec.state}" + (f" ({rec.error})" if rec.error else ""), flush=True)
    if rec.state == "succeeded":
        for key in ("ref", "onnx", "metrics", "canary", "canary_error"):
            if key in rec.result:
                print(f"  {key}: {rec.result[key]}", flush=True)
    if rec.state != "succeeded":
        sys.exit(1)


def follow(job, out=sys.stdout, poll_s: float = 1.0):
    """Print progress and new log lines until the job ends; its record."""
    shown_log, shown_step = 0, -1
    while True:
        rec = job.status()
        logs = job.logs()
        for line in logs[shown_log:].splitlines():
            print(f"  {line}", file=out, flush=True)
        shown_log = len(logs)
        p = job.progress()
        if p and p["global_step"] != shown_step and rec.state == "running":
            shown_step = p["global_step"]
            print(f"  [{rec.state}] epoch {p['epoch']} step {p['step']}/{p['steps_per_epoch']} "
                  f"loss {p['loss']:.4f} {p['samples_per_s']:.0f} samples/s", file=out, flush=True)
        if rec.state in ("succeeded", "failed", "cancelled"):
            return rec
        time.sleep(poll_s)


def _print_jobs(jobs) -> None:
    if not jobs:
        print("no jobs")
        return
    print(f"{'id':<13} {'name':<20} {'state':<10} {'prio':>4} {'attempts':>8}  submitted            result")
    for j in jobs:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.submitted_at))
        what = j.result.get("ref", "") if j.state == "succeeded" else j.error[:60]
        print(f"{j.id:<13} {j.name:<20} {j.state:<10} {j.priority:>4} {j.attempts:>8}  {when}  {what}")
