"""``flywheel bench run <scenario.yaml>`` and ``flywheel bench compare A B``: load
tests and capacity planning (the harness is flywheel.bench.harness)."""

from __future__ import annotations

import argparse
import time

import msgspec


def _cmd_run(args: argparse.Namespace) -> None:
    from flywheel.bench.harness import load_scenario, run_scenario, write_report
    from flywheel.bench.harness.report import capacity_lines, client_line

    sc = load_scenario(args.scenario)
    overrides = {}
    if args.duration is not None:
        overrides["duration_s"] = args.duration
    if args.client is not None:
        overrides["client"] = args.client
    if args.http or args.grpc is not None:
        target = {"http": args.http} if args.http else {}
        if args.grpc is not None:
            target["grpc"] = args.grpc
        overrides["target"] = msgspec.structs.replace(sc.target, **target)
    if overrides:
        # re-validate: a replaced target must still be loopback (or allowed)
        from flywheel.bench.harness import parse_scenario

        sc = parse_scenario({**msgspec.to_builtins(sc), **msgspec.to_builtins(overrides)})
    started = time.perf_counter()
    report = run_scenario(sc, progress=lambda line: print(line, flush=True))
    out = args.out or f"bench/results/{sc.name}"
    paths = write_report(report, out)
    print(f"\ndone in {time.perf_counter() - started:.0f}s", flush=True)
    print(f"load generator: {client_line(report)}")
    for line in capacity_lines(report.capacity):
        print(line)
    if report.recommended:
        print(f"recommended config: {report.recommended}")
    for note in report.notes:
        print(f"note: {note}")
    for kind, path in paths.items():
        print(f"{kind}: {path}")


def _cmd_compare(args: argparse.Namespace) -> None:
    from flywheel.bench.harness.report import compare, compare_json, compare_text, read_report

    result = compare(read_report(args.a), read_report(args.b))
    print(compare_json(result) if args.json else compare_text(result))


HELP = "load tests and capacity planning for V2 servers (locust or h2load)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help=HELP, description=__doc__)
    bsub = bench.add_subparsers(dest="bench_command", required=True, metavar="SUBCOMMAND")
    run = bsub.add_parser("run", help="run a scenario YAML (load plan, capacity search or config search)")
    run.add_argument("scenario", help="the scenario file (YAML; see configs/bench-demo.yaml)")
    run.add_argument("--out", default=None, help="report folder (default bench/results/<scenario name>)")
    run.add_argument("--duration", type=float, default=None, help="seconds per step (overrides the scenario)")
    run.add_argument("--http", default=None, help="target HTTP URL (overrides the scenario)")
    run.add_argument("--grpc", default=None, help="target gRPC host:port (overrides the scenario)")
    run.add_argument("--client", choices=("auto", "locust", "h2load"), default=None,
                     help="load generator (overrides the scenario's client; auto: h2load when installed "
                          "and able to drive the scenario)")
    run.set_defaults(func=_cmd_run)
    cmp_ = bsub.add_parser("compare", help="ratios B / A of two report.json files")
    cmp_.add_argument("a", help="the baseline report.json")
    cmp_.add_argument("b", help="the report.json compared with it")
    cmp_.add_argument("--json", action="store_true", help="print JSON instead of a table")
    cmp_.set_defaults(func=_cmd_compare)

