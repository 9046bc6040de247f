"""Flywheel on a two-node Ray cluster: throughput, failover and autoscaling.

    python -m flywheel.bench.cluster [--only throughput,failover,autoscale] [--rounds 3] [--block 3]
        [--clients 32] [--failover-clients 8] [--out bench/results]

Needs root and iproute2: two "hosts" are network namespaces on this machine
(flywheel.bench.netns: 198.18.n.1 the Ray head, 198.18.n.2 a worker node),
and traffic goes only to loopback and those addresses. The digits demo model
is deployed with ``flywheel serve`` on the head as the cluster test deploys
it (an ingress replica on each node, ``replicas_per_node: 1``, bound to
0.0.0.0 with API keys, the registry on the shared file system).

- **throughput**: closed loop at ``--clients`` (32) keep-alive HTTP JSON
  clients (h2load when installed, else bench/loadgen.py), one row per
  request, against one node (the head alone: the load generator runs in the
  head's namespace and calls its ingress at that host's 127.0.0.1), the head
  alone through HAProxy (the balancer `flywheel lb haproxy` writes), and both
  nodes through HAProxy; the two nodes are compared with each one-node setup
  in A B B A blocks (bench/interleave.py: neighbours in time are paired,
  the median of the paired ratios is given with its range). Both namespaces
  run on the same 2 cores, so the figure is no speed-up: one node is the
  head's one ingress replica and two nodes are two replicas on the same
  cores, so a ratio below 1 is the overhead of spreading over two nodes and
  one above 1 the second replica process using the second core.
- **failover**: under keep-alive load through the balancer the worker
  node is SIGKILLed (its raylet and every process of its host): requests failed, when the worker's ingress
  stopped answering, when the balancer took it out (HAProxy's stats page) and
  the last failure; then the node is started again (a replaced machine
  joining at the same address): when the GCS counts it, when Serve's ingress
  replica serves at its address again and when the balancer sends to it.
- **autoscale**: a second application with ``server.autoscaling`` (a wide MLP
  batched on a worker thread, the integration test's settings) on the same
  cluster, through a balancer over both nodes: a load step from 1 to 32
  clients, time until Serve runs 2 replicas, until both answer requests
  (asked through Serve by a watcher on the head), and after the step ends
  until it runs 1 again.

Prints the figures, writes cluster.json and cluster.png to --out. Takes
about 6-8 minutes here with --rounds 2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from flywheel.bench import _cluster_report as rep
from flywheel.bench import interleave as il
from flywheel.bench._cluster_deploy import (
    AUTOSCALE_PORT, DIGITS_APP, DIGITS_PORT, Balancer, Watcher, autoscale_config, digits_config, infer,
    prepare_registry,
    served, status, stop_namespace, wait_until,
)
from flywheel.bench._cluster_load import LiveLoad, infer_body, raw_request

PARTS = ("throughput", "failover", "autoscale")
DIGITS_PATH = "/v2/models/digits/infer"
WIDE = {"in_features": 64, "hidden": [2048, 2048], "out_features": 10}
# the integration test's settings (tests/integration/test_autoscaling.py)
AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "target_in_flight": 4, "upscale_delay_s": 1,
               "downscale_delay_s": 4, "look_back_s": 2}
CHECKS = {"check_interval_ms": 300, "fall": 2, "rise": 2}  # the balancer's health checks (the cluster test's)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options; ``parts`` is the chosen parts in run order."""
    ap = argparse.ArgumentParser(prog="python -m flywheel.bench.cluster", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts to run: {', '.join(PARTS)}")
    ap.add_argument("--rounds", type=int, default=3, help="A B B A rounds per throughput comparison")
    ap.add_argument("--block", type=int, default=3, help="seconds per throughput block (whole seconds: h2load)")
    ap.add_argument("--clients", type=int, default=32, help="concurrent clients for throughput and the load step")
    ap.add_argument("--failover-clients", type=int, default=8, help="keep-alive clients during the node kill")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    chosen = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in PARTS]
    if unknown or not chosen:
        ap.error(f"--only: unknown part(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(PARTS)}")
    for name in ("rounds", "block", "clients", "failover_clients"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.clients < 2:
        ap.error("--clients must be >= 2 (the load step goes from 1 client to --clients)")
    args.parts = tuple(p for p in PARTS if p in chosen)
    return args


class Progress:
    """Lines prefixed with the seconds since the start, flushed at once."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def __call__(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.start:5.0f} s] {msg}", flush=True)


# -- throughput ----------------------------------------------------------------------

def _block_runner(hosts, cluster, token: str, clients: int) -> Callable[[str, int, int], dict]:
    """run(where, port, seconds): one block from this namespace ("here") or
    from the head's ("head"); its load summary. RuntimeError when the block
    had an error or no answer, so that it is left out with its pair."""
    def run(where: str, port: int, seconds: int) -> dict:
        spec = json.dumps({"port": port, "path": DIGITS_PATH, "token": token, "clients": clients,
                           "seconds": seconds})
        argv = [sys.executable, "-m", "flywheel.bench._cluster_load", spec]
        if where == "head":
            proc = hosts.run(1, argv, env=cluster.env, timeout=seconds + 120)
        else:
            proc = subprocess.run(argv, env=cluster.env, capture_output=True, text=True, timeout=seconds + 120)
        if proc.returncode != 0:
            raise RuntimeError(f"load block failed: {(proc.stderr or proc.stdout)[-500:]}")
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        if summary["errors"] or not summary["requests"]:
            raise RuntimeError(f"{summary['errors']} errors {summary['error_samples'][:1]}, "
                               f"{summary['requests']} answers")
        return summary
    return run


def measure_throughput(hosts, cluster, token: str, head_lb: Balancer, both_lb: Balancer, args, say) -> dict:
    run = _block_runner(hosts, cluster, token, args.clients)
    where = {rep.DIRECT: ("head", DIGITS_PORT), rep.HEAD_LB: ("here", head_lb.port),
             rep.BOTH_LB: ("here", both_lb.port)}
    for setup, (place, port) in where.items():
        say(f"warming up {setup} ...")
        run(place, port, 2)
    comparisons = []
    total = 4 * args.rounds
    for a, b in rep.COMPARISONS:
        done = [0]

        def block(setup: str) -> dict:
            done[0] += 1
            try:
                got = run(*where[setup], args.block)
            except Exception as exc:
                say(f"  block {done[0]}/{total} {setup}: failed: {exc}")
                raise
            say(f"  block {done[0]}/{total} {setup}: {got['throughput_rps']:.0f} req/s, p50 {got['p50_ms']:.2f} ms")
            return got

        say(f"{b} vs {a}: {args.rounds} A B B A rounds of {args.block} s blocks at c={args.clients}")
        blocks = il.run_blocks(args.rounds, lambda a=a: block(a), lambda b=b: block(b))
        comparisons.append(rep.compare(a, b, rep.block_records(blocks, a, b)))
    return {"clients": args.clients, "rounds": args.rounds, "block_s": args.block, "comparisons": comparisons,
            "setups": rep.setup_stats(comparisons), "note": rep.SHARED_CORES}


# -- failover ------------------------------------------------------------------------------

def measure_failover(hosts, cluster, work: str, token: str, lb: Balancer, args, say) -> tuple[dict, dict]:
    worker_ip = hosts.addresses[1]
    worker = f"http://{worker_ip}:{DIGITS_PORT}/v2/health/ready"
    events: dict[str, float | None] = {"worker_gone": None, "lb_down": None}
    later: dict[str, float | None] = {"worker_serves": None, "lb_up": None}
    # replicas are not asked what they answered: a call routed to the dead one would wait for its time-out
    with Watcher(hosts, cluster, DIGITS_APP, work, ask_replicas=False) as watch, \
            LiveLoad(lb.port, raw_request(DIGITS_PATH, infer_body(), token), args.failover_clients) as load:
        wait_until(lambda: len(load.ok) > 200 and lb.up("node0") and lb.up("node1")
                   and (watch.latest() or {}).get("running") == 2, 120,
                   "load through the balancer, both nodes up and the watcher's first sample", say, alive=watch.alive)
        time.sleep(3)  # a few seconds of both nodes serving, for the timeline
        say(f"killing the worker node (every process of its host) under {args.failover_clients} clients ...")
        kill = time.monotonic()
        cluster.kill_node(2)
        deadline = kill + 90
        while None in events.values() and time.monotonic() < deadline:
            if events["worker_gone"] is None and status(worker, token, timeout=0.5) != 200:
                events["worker_gone"] = time.monotonic()
            if events["lb_down"] is None and lb.states().get("node1", "").startswith("DOWN"):
                events["lb_down"] = time.monotonic()
            time.sleep(0.05)
        say(f"  worker gone after {rep.fmt_s(rep.since(kill, events['worker_gone']))}, out of the balancer after "
            f"{rep.fmt_s(rep.since(kill, events['lb_down']))}; {len(load.failed)} failed so far")
        # a replaced machine joins long after the GCS gave the dead one up (a
        # node at the same address before that would be counted twice)
        try:
            wait_until(lambda: rep.watch_events(watch.samples(), kill, None, worker_ip)["gcs_dead"] is not None, 90,
                       "the GCS to mark the killed node dead", say, alive=watch.alive)
        except (TimeoutError, RuntimeError) as exc:
            say(f"  {exc}; restarting it anyway")
        # and starts clean: what the dead node left (Ray's agents outlive it) goes first
        left = stop_namespace(hosts.names[1])
        say(f"restarting the worker node ({left} leftover processes of the old one stopped) ...")
        events["restart"] = time.monotonic()
        cluster.restart_node(2)
        deadline, last = time.monotonic() + 240, time.monotonic()
        while None in later.values() and time.monotonic() < deadline:
            if later["worker_serves"] is None and status(worker, token, timeout=0.5) == 200:
                later["worker_serves"] = time.monotonic()
            if later["lb_up"] is None and lb.up("node1"):
                later["lb_up"] = time.monotonic()
            if time.monotonic() - last > 15:
                say(f"  still waiting for the worker's ingress ({time.monotonic() - events['restart']:.0f} s)")
                last = time.monotonic()
            time.sleep(0.1)
        say(f"  the worker serves again {rep.fmt_s(rep.since(events['restart'], later['worker_serves']))} after "
            f"the restart; {len(load.failed)} failed in all")
        time.sleep(3)  # both nodes in service again
        end = time.monotonic()
        samples = watch.samples()
    seen = rep.watch_events(samples, kill, events["restart"], worker_ip)
    figures = rep.failover_figures(kill, {"worker_gone": events["worker_gone"], "lb_down": events["lb_down"],
                                          "serve_1_running": seen["serve_1_running"], "gcs_dead": seen["gcs_dead"],
                                          "restart": events["restart"]}, load.ok, load.failed)
    later.update(node_joined=seen["node_joined"], serve_2_running=seen["serve_2_running"])
    figures.update(
        after_restart_s={k: rep.since(events["restart"], later[k])
                         for k in ("node_joined", "serve_2_running", "worker_serves", "lb_up")},
        clients=args.failover_clients, answered=len(load.ok), failure_samples=load.reasons,
        watcher_errors=sum(1 for s in samples if "error" in s), **CHECKS)
    t, ok = rep.rate(load.ok, kill - 5, end)
    _, bad = rep.rate(load.failed, kill - 5, end)
    series = {"t": (t - 5).tolist(), "answered": ok.tolist(), "failed": bad.tolist()}
    return figures, series


# -- autoscaling ---------------------------------------------------------------------------------

def measure_autoscale(hosts, cluster, work: str, uri: str, artifacts: str, token: str, args,
                      say) -> tuple[dict, dict]:
    from flywheel.bench.common import export_model

    model = export_model("mlp", WIDE, os.path.join(work, "wide.onnx"))
    cfg = autoscale_config(model, uri, artifacts, AUTOSCALING)
    say("deploying the autoscaled application ...")
    with served(hosts, cluster, cfg, work, token, say, every_node=False), \
            Balancer(hosts.addresses, AUTOSCALE_PORT, work, **CHECKS) as lb, \
            Watcher(hosts, cluster, cfg["name"], work) as watch:
        wait_until(lambda: (watch.latest() or {}).get("running") == 1, 120, "the watcher's first sample", say,
                   alive=watch.alive)
        request = raw_request("/v2/models/wide/infer", infer_body(), token)
        with LiveLoad(lb.port, request, 1) as one:
            wait_until(lambda: len(one.ok) > 50, 60, "one client's first answers", say)
            time.sleep(4)  # one request in flight at most: under the target, it stays at 1
            say(f"load step: 1 -> {args.clients} clients (replicas before it: "
                f"{(watch.latest() or {}).get('running')})")
            step = time.monotonic()
            with LiveLoad(lb.port, request, args.clients - 1) as many:
                wait_until(lambda: rep.autoscale_figures(watch.samples(), step, float("inf"))["second_answers_s"]
                           is not None, 120, "two replicas answering", say, alive=watch.alive)
                nodes = sorted(addr for addr, name in zip(hosts.addresses, ("node0", "node1")) if lb.up(name))
                time.sleep(2)
            stop = time.monotonic()
            say(f"back to 1 client after {stop - step:.1f} s; waiting for 1 replica ...")
            wait_until(lambda: rep.autoscale_figures(watch.samples(), step, stop)["back_to_1_s"] is not None, 120,
                       "the ingress to scale back to 1 replica", say, alive=watch.alive)
            time.sleep(2)
            end = time.monotonic()
        samples = watch.samples()
    figures = rep.autoscale_figures(samples, step, stop)
    ok, failed = one.ok + many.ok, one.failed + many.failed
    figures.update(clients=args.clients, autoscaling=AUTOSCALING, model="MLP 64-2048-2048-10 batched on a worker "
                   "thread", answered=len(ok), failed=len(failed), failure_samples=one.reasons + many.reasons,
                   nodes_at_peak=nodes, watcher_errors=sum(1 for s in samples if "error" in s))
    t, rates = rep.rate(ok, step - 5, end)
    series = {"t": (t - 5).tolist(), "answered": rates.tolist(), "stop": stop - step,
              "replica_t": [s["t"] - step for s in samples if step - 5 <= s["t"] <= end],
              "replicas": [s["running"] for s in samples if step - 5 <= s["t"] <= end]}
    return figures, series


# -- the run ---------------------------------------------------------------------------------------

def _digits_parts(hosts, cluster, work: str, uri: str, artifacts: str, token: str, args, say, result: dict,
                  series: dict, failed: list[str]) -> None:
    """Throughput and failover, on one deployment of the digits model."""
    say("deploying the digits model on both nodes (flywheel serve on the head) ...")
    with served(hosts, cluster, digits_config(uri, artifacts), work, token, say) as urls, \
            Balancer(hosts.addresses[:1], DIGITS_PORT, work, **CHECKS) as head_lb, \
            Balancer(hosts.addresses, DIGITS_PORT, work, **CHECKS) as both_lb:
        for url in urls:  # a fast error must never be measured as a fast answer
            answer = infer(url, "digits", infer_body(), token)
            if len(answer["outputs"][0]["data"]) != 10:
                raise RuntimeError(f"{url}: unexpected answer {answer}")
        say(f"serving at {', '.join(urls)}")
        if "throughput" in args.parts:
            try:
                result["throughput"] = measure_throughput(hosts, cluster, token, head_lb, both_lb, args, say)
            except Exception as exc:  # noqa: BLE001 - a failed part is reported, the others still run
                failed.append(f"throughput: {exc!r}")
        if "failover" in args.parts:
            try:
                result["failover"], series["failover"] = measure_failover(hosts, cluster, work, token, both_lb, args,
                                                                          say)
            except Exception as exc:  # noqa: BLE001 - as above
                failed.append(f"failover: {exc!r}")


def _run_parts(hosts, cluster, work: str, args, say, result: dict, series: dict) -> list[str]:
    """Every chosen part; the parts that failed, with why (the others still run)."""
    failed = []
    say("training the digits model and filling the registry ...")
    uri, artifacts, token = prepare_registry(work)
    digits_parts = [p for p in ("throughput", "failover") if p in args.parts]
    if digits_parts:
        try:
            _digits_parts(hosts, cluster, work, uri, artifacts, token, args, say, result, series, failed)
        except Exception as exc:  # noqa: BLE001 - the deployment failed: its parts are reported, autoscale still runs
            failed += [f"{part}: {exc!r}" for part in digits_parts
                       if part not in result and not any(f.startswith(f"{part}:") for f in failed)]
    if "autoscale" in args.parts:
        try:
            result["autoscale"], series["autoscale"] = measure_autoscale(hosts, cluster, work, uri, artifacts,
                                                                         token, args, say)
        except Exception as exc:  # noqa: BLE001 - as above
            failed.append(f"autoscale: {exc!r}")
    return failed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from flywheel.bench import h2load
    from flywheel.bench.netns import Hosts, NetnsUnavailable, RayCluster

    if os.geteuid() != 0:
        print("the cluster benchmark needs root: its two hosts are network namespaces (run it as root)",
              file=sys.stderr)
        return 2
    say = Progress()
    try:
        hosts = Hosts(2)
    except NetnsUnavailable as exc:
        print(f"the cluster benchmark cannot make its hosts here: {exc}", file=sys.stderr)
        return 2
    work = tempfile.mkdtemp(prefix="fw-bench-cluster-")
    result: dict = {"load_generator": "h2load" if h2load.available() else "python (bench/loadgen.py)",
                    "cores": os.cpu_count(), "hosts": hosts.addresses, "parts": list(args.parts)}
    series: dict = {}
    failed: list[str] = []
    say(f"hosts {', '.join(hosts.addresses)}; load generator: {result['load_generator']}; work folder {work}")
    try:
        say("starting the Ray head and the worker node ...")
        cluster = RayCluster(hosts, cpus=1)
        try:
            failed = _run_parts(hosts, cluster, work, args, say, result, series)
        finally:
            say("stopping the cluster ...")
            cluster.close()
    finally:
        left = sum(stop_namespace(name) for name in hosts.names)
        hosts.close()
        say(f"hosts removed ({left} leftover processes stopped)")
    result["failed_parts"] = failed
    print()
    for line in rep.report_lines(result):
        print(line)
    for why in failed:
        print(f"NOT MEASURED: {why}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cluster.json"), "w") as f:
        json.dump(result, f, indent=1)
    if any(result.get(p) for p in PARTS):
        rep.plot(result, series, os.path.join(args.out, "cluster.png"))
    print(f"\nwrote {args.out}/cluster.json and {args.out}/cluster.png (logs in {work})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
