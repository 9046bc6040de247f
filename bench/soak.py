"""Soak with faults: steady mixed load for minutes while processes are killed.

    python -m flywheel.bench.soak [--minutes 10] [--rate 50] [--seed 0] [--faults ...] [--out bench/results]

Deploys, on a local Ray it starts itself, one Flywheel deployment with auth
on (API keys from flywheel.registry.keys.KeyStore), two ingress replicas
(each with its HAProxy gRPC front), a colocated model ``colo`` with drift
monitoring, a dedicated model ``ded`` with 2 replicas, and an endpoint ``ep``
of two versions (90/10). Then it sends an open-loop load at ``--rate``
requests/s (HTTP JSON 40 %, HTTP binary 30 %, gRPC 30 %; 5 % of it under a
key that is churned), and at seeded random times: SIGKILLs a replica of
``ded``, the router controller, the drift monitor, and the HAProxy gRPC front
that holds the load's connections (a kill on the load's path waits until a
request is in flight on it); runs a canary of ``ep`` 2 and then a swap of
``ep`` to version 3; revokes the churned key and creates its successor.

Report (printed, and soak.json plus soak.png under --out): requests sent /
ok / failed by cause; each failure blamed on the fault it was in flight on
(its path went through the killed process at the kill), on the revoked key,
or ``unexplained``; each fault's time and recovery; RSS and open files of
every Flywheel process after the warm-up and at the end. Exit status 1 when a
failure is unexplained, a fault could not be done or was not recovered from,
or a process that lived through the run grew by more than 5 %. Sends traffic
to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request

from flywheel.bench import _soak_procs as procs
from flywheel.bench._soak_faults import RECOVERY_LIMIT_S, FaultRunner, Target
from flywheel.bench._soak_load import KeyRing, OpenLoopLoad, touch_every_replica
from flywheel.bench._soak_plan import CHURN_SHARE, FAULTS, MODELS, TRANSPORTS, fault_plan
from flywheel.bench._soak_plot import plot, timeline
from flywheel.bench._soak_report import growth, revocation, summarize, table, verdict, with_trends
from flywheel.bench.common import export_model

APP = "soak"
HPARAMS = {"in_features": 64, "hidden": [128, 64], "out_features": 10}  # the demo digits MLP's shape
DEDICATED = "ded-1"  # the dedicated model's Serve deployment (<model>-<version>)
DEDICATED_REPLICAS = 2
INGRESS_REPLICAS = 2
SAMPLE_S = 5.0  # a resource snapshot: 3 samples 2.5 s apart (_soak_procs.snapshot)


def deploy_config(work: str, model: str, reference: str) -> dict:
    """The soak's deployment (see the module docstring)."""
    return {
        "name": APP,
        "server": {"host": "127.0.0.1", "port": 0, "grpc_port": 0, "replicas": INGRESS_REPLICAS,
                   "auth": {"enabled": True, "reload_interval_s": 1.0}},
        "registry": {"uri": f"sqlite:///{work}/registry.db", "artifacts": f"{work}/artifacts"},
        "models": [
            {"name": "colo", "version": "1", "path": model, "num_cpus": 0.1,
             "drift": {"enabled": True, "sample_rate": 0.1, "window": 200, "reference": reference}},
            {"name": "ded", "version": "1", "path": model, "num_cpus": 0.1, "placement": "dedicated",
             "replicas": DEDICATED_REPLICAS},
            {"name": "ep", "version": "1", "path": model, "num_cpus": 0.05},
            {"name": "ep", "version": "2", "path": model, "num_cpus": 0.05},
        ],
        "endpoints": [{"name": "ep", "policy": {"kind": "fixed", "weights": {"1": 0.9, "2": 0.1}},
                       "promote_alias": ""}],
    }


def model_io(path: str, seed: int) -> tuple:
    """The load's input (1 row) and the model's answer to it, from ONNX
    Runtime here: every model and version of the soak serves this file."""
    import numpy as np
    import onnxruntime as ort

    x = np.random.default_rng(seed + 2).random((1, HPARAMS["in_features"]), dtype=np.float32)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return x, session.run(None, {"input": x})[0]


def retries(url: str, token: str) -> int:
    """Requests the ingress sent again after a dedicated replica's
    connection failed (flywheel_replica_retries_total, both replicas)."""
    from prometheus_client.parser import text_string_to_metric_families

    req = urllib.request.Request(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        text = resp.read().decode()
    return int(sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                   if s.name == "flywheel_replica_retries_total"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked: ``args.plan`` holds the faults' plan."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="how long the load runs (default 10)")
    ap.add_argument("--rate", type=float, default=50.0, help="requests per second, open loop (default 50)")
    ap.add_argument("--seed", type=int, default=0, help="draws the fault times and the request mix")
    ap.add_argument("--warmup", type=float, default=20.0, help="seconds of load before the first "
                    "resource sample; no fault before it (default 20)")
    ap.add_argument("--faults", default=",".join(FAULTS),
                    help=f"which faults, comma-separated (default all: {', '.join(FAULTS)})")
    ap.add_argument("--out", default="bench/results", help="folder for soak.json and soak.png")
    args = ap.parse_args(argv)
    if not args.rate > 0:
        ap.error(f"--rate must be > 0 requests/s, not {args.rate}")
    kinds = tuple(k.strip() for k in args.faults.split(",") if k.strip())
    unknown = [k for k in kinds if k not in FAULTS]
    if unknown or len(set(kinds)) != len(kinds):
        ap.error(f"--faults {args.faults!r}: each at most once, from: {', '.join(FAULTS)}")
    try:
        args.plan = fault_plan(args.minutes * 60.0, args.warmup, args.seed, kinds)
    except ValueError as exc:
        ap.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import msgspec
    import ray
    from ray import serve

    from flywheel.common import load_settings, start_ray

    ray_tmp = tempfile.mkdtemp(prefix="fw-soak-ray-", dir="/tmp")  # short: Ray's socket paths
    start_ray(msgspec.structs.replace(load_settings(), ray_address="", ray_tmpdir=ray_tmp),
              num_cpus=4, log_to_driver=False)
    try:
        report = run_soak(args)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "soak.json"), "w") as f:
        json.dump(report, f, indent=1)
    wrote = "soak.json"
    try:
        plot(report, os.path.join(args.out, "soak.png"))
        wrote += " and soak.png"
    except ImportError:
        pass  # matplotlib comes with the bench extra; the JSON holds every figure
    print(f"\nwrote {args.out}/{wrote}")
    if report["missed"]:
        print("TARGET MISSED: " + "; ".join(report["missed"]))
        return 1
    print("target met: every failed request was in flight on a killed process or carried a revoked key; "
          "no surviving process grew by more than 5 %")
    return 0


def run_soak(args: argparse.Namespace) -> dict:
    """Deploy, soak (see :func:`soak`) and undeploy; return the report.
    Ray must be initialised (main starts it; a test shares its own)."""
    import numpy as np

    from flywheel.registry.keys import KeyStore
    from flywheel.serving import parse_config
    from flywheel.serving.app import deploy, undeploy

    work = tempfile.mkdtemp(prefix="fw-soak-")
    try:
        model = export_model("mlp", HPARAMS, os.path.join(work, "mlp.onnx"))
        reference = os.path.join(work, "reference.npy")
        np.save(reference, np.random.default_rng(args.seed).random((1000, HPARAMS["in_features"]), dtype=np.float32))
        cfg = parse_config(deploy_config(work, model, reference))
        store = KeyStore.open(cfg.registry.uri)
        try:
            _, admin = store.create("soak-admin", ["admin"], actor="soak")
            _, main_key = store.create("soak-load", ["predict"], actor="soak")
            _, churn = store.create("soak-churn-0", ["predict"], actor="soak")
        finally:
            store.close()
        print(f"deploying {APP}: {INGRESS_REPLICAS} ingress replicas, colo (drift on), "
              f"ded x{DEDICATED_REPLICAS}, ep 1+2 ...", flush=True)
        dep = deploy(cfg)
        try:
            return soak(args, dep, admin, main_key, churn, model)
        finally:
            undeploy(dep)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def soak(args: argparse.Namespace, dep, admin: str, main_key: str, churn: str, model: str) -> dict:
    """Run the load and ``args.plan``'s faults against ``dep``; return the report."""
    duration = args.minutes * 60.0
    deployments = [procs.INGRESS, procs.ROUTER, procs.DRIFT, DEDICATED]
    t0 = time.monotonic()
    keys = KeyRing(main_key, churn)
    x, expected = model_io(model, args.seed)
    load = OpenLoopLoad(dep.url, dep.grpc_target, keys, args.rate, args.seed, x, expected, t0)
    target = Target(APP, dep.url, dep.grpc_target, admin, dep.config.registry.uri, DEDICATED,
                    DEDICATED_REPLICAS, INGRESS_REPLICAS, {"version": "3", "path": model, "num_cpus": 0.05})
    runner = FaultRunner(target, keys, t0, args.seed, load.in_flight)
    print(f"load: {args.rate:g} req/s for {duration:.0f} s; faults planned at "
          + ", ".join(f"{p.at:.0f}s {p.kind}" for p in args.plan), flush=True)
    sampler = procs.Sampler(APP, deployments, t0)
    load.start(duration)
    sampler.start()
    try:
        warm = touch_every_replica(dep.url, dep.grpc_target, main_key, list(MODELS), HPARAMS["in_features"])
        if warm:
            runner.say(f"warm-up: {len(warm)} request(s) over fresh connections failed: {sorted(set(warm))}")
        # the samples end with the warm-up and with the load (both under load)
        time.sleep(max(0.0, args.warmup - SAMPLE_S - (time.monotonic() - t0)))
        before = procs.snapshot(APP, deployments)
        runner.say(f"warm-up over: {len(before)} Flywheel processes sampled, {len(load.outcomes)} requests answered")
        runner.run(args.plan)
        runner.join(max(0.0, duration - SAMPLE_S - 1.0 - (time.monotonic() - t0)))
        time.sleep(max(0.0, duration - SAMPLE_S - 1.0 - (time.monotonic() - t0)))
        after = procs.snapshot(APP, deployments)
    except BaseException:  # interrupted or failed: no more requests to a deployment about to go
        load.stop()
        raise
    finally:
        sampler.stop()
    load.join(duration - (time.monotonic() - t0) + 60.0)
    runner.join(30.0)
    rows = with_trends(growth(before, after), sampler.points, args.warmup)
    return report(args, load, runner, rows, retries(dep.url, admin), warm, sampler.points)


def report(args: argparse.Namespace, load: OpenLoopLoad, runner: FaultRunner, rows: list[dict],
           retried: int, warm_failures: list[str], resources: list[dict]) -> dict:
    """Judge the run, print the table, and return the JSON report.
    ``warm_failures``: causes of the warm-up's own requests that failed
    (before any fault: each one misses the target)."""
    outcomes = sorted(load.outcomes, key=lambda o: o.start)
    faults = runner.result()
    summary = summarize(outcomes, faults, {r["key"]: r["at"] for r in runner.revocations})
    revocations = [{**r, "at_s": round(r["at"], 2), **revocation(outcomes, r["key"], r["at"], r["new_key"])}
                   for r in runner.revocations]
    print()
    print(table(summary, rows, revocations))
    slip = sorted(load.slip_s)
    print(f"\nretried: {retried} request(s) sent again by the ingress after a dedicated replica's connection "
          "failed; the soak never resends, and flywheel.client resends only a request whose pooled "
          "keep-alive connection was found closed before any answer byte (not counted: it is invisible)")
    if slip:
        print(f"load schedule: {len(slip)} request(s) left late, worst {slip[-1] * 1e3:.0f} ms "
              "(the load generator's own lag on this machine)")
    missed = verdict(summary, rows)
    if warm_failures:
        missed.append(f"{len(warm_failures)} warm-up request(s) failed before any fault")
    missed += [f"fault {kind} not done: {why}" for kind, why in runner.not_done]
    missed += [f"{f.kind} not whole again within {RECOVERY_LIMIT_S:.0f} s" for f in faults
               if f.kind.startswith("kill") and f.recovered is None]
    return {
        "args": {k: v for k, v in vars(args).items() if k != "plan"},
        "mix": {"transports": TRANSPORTS, "models": MODELS, "churned_key_share": CHURN_SHARE},
        "plan": [{"at_s": p.at, "kind": p.kind} for p in args.plan],
        "summary": summary,
        "retried": {"ingress_replica_retries": retried, "soak_resends": 0,
                    "client_resends": "not counted: flywheel.client's AsyncClient resends a request once, unseen, "
                                      "when its pooled keep-alive connection was closed before any answer byte"},
        "warmup_failures": warm_failures,
        "revocations": revocations,
        "processes": rows,
        "resource_timeline": resources,
        "fault_log": runner.log,
        "late_sends": {"count": len(slip), "worst_ms": round(slip[-1] * 1e3, 1) if slip else 0.0},
        "missed": missed,
        "timeline": timeline(outcomes),
        "faults_at": [{"kind": f.kind, "at_s": round(f.at, 2)} for f in faults],
    }


if __name__ == "__main__":
    sys.exit(main())
