"""Soak with faults: steady mixed load for minutes while processes are killed.

    python -m flywheel.bench.soak [--minutes 10] [--rate 50] [--seed 0] [--out bench/results]

Deploys, on a local Ray it starts itself, one Flywheel deployment with auth
on (API keys from flywheel.registry.keys.KeyStore), two ingress replicas
(each with its HAProxy gRPC front), a colocated model ``colo`` with drift
monitoring, a dedicated model ``ded`` with 2 replicas, and an endpoint ``ep``
of two versions (90/10). Then it sends an open-loop load at ``--rate``
requests/s (HTTP JSON 40 %, HTTP binary 30 %, gRPC 30 %; 5 % of it under a
key that is churned), and at seeded random times: SIGKILLs a replica of
``ded``, the router controller, the drift monitor, and the HAProxy gRPC front
of an ingress replica; runs a canary of ``ep`` 2 and then a swap of ``ep`` to
version 3; revokes the churned key and creates its successor.

Report (printed, and soak.json plus soak.png under --out): requests sent /
ok / failed by cause; each failure blamed on the fault it was in flight on
(its path went through the killed process at the kill), on the revoked key,
or ``unexplained``; each fault's time and recovery; RSS and open files of
every Flywheel process after the warm-up and at the end. Exit status 1 when a
failure is unexplained, a fault could not be done, or a process that lived
through the run grew by more than 5 %. Sends traffic to 127.0.0.1 only.
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
from flywheel.bench._soak_faults import FaultRunner, Target
from flywheel.bench._soak_load import KeyRing, OpenLoopLoad, key_id
from flywheel.bench._soak_plan import CHURN_SHARE, MODELS, TRANSPORTS, fault_plan
from flywheel.bench._soak_report import growth, revocation, summarize, table, verdict
from flywheel.bench.common import export_model

APP = "soak"
HPARAMS = {"in_features": 64, "hidden": [128, 64], "out_features": 10}  # the demo digits MLP's shape
DEDICATED_REPLICAS = 2
INGRESS_REPLICAS = 2


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


def retries(url: str, token: str) -> int:
    """Requests the ingress sent again after a dedicated replica's
    connection failed (flywheel_replica_retries_total, both replicas)."""
    from prometheus_client.parser import text_string_to_metric_families

    req = urllib.request.Request(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        text = resp.read().decode()
    return int(sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                   if s.name == "flywheel_replica_retries_total"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="how long the load runs (default 10)")
    ap.add_argument("--rate", type=float, default=50.0, help="requests per second, open loop (default 50)")
    ap.add_argument("--seed", type=int, default=0, help="draws the fault times and the request mix")
    ap.add_argument("--warmup", type=float, default=20.0, help="seconds of load before the first "
                    "resource sample; no fault before it (default 20)")
    ap.add_argument("--out", default="bench/results", help="folder for soak.json and soak.png")
    args = ap.parse_args(argv)
    duration = args.minutes * 60.0
    try:
        plan = fault_plan(duration, args.warmup, args.seed)
    except ValueError as exc:
        ap.error(str(exc))
    if not args.rate > 0:
        ap.error("--rate must be > 0")

    import msgspec
    import numpy as np
    import ray
    from ray import serve

    from flywheel.common import load_settings, start_ray
    from flywheel.registry.keys import KeyStore
    from flywheel.serving import parse_config
    from flywheel.serving.app import deploy, undeploy

    work = tempfile.mkdtemp(prefix="fw-soak-")
    model = export_model("mlp", HPARAMS, os.path.join(work, "mlp.onnx"))
    reference = os.path.join(work, "reference.npy")
    np.save(reference, np.random.default_rng(args.seed).random((1000, HPARAMS["in_features"]), dtype=np.float32))
    cfg = parse_config(deploy_config(work, model, reference))
    store = KeyStore.open(cfg.registry.uri)
    _, admin = store.create("soak-admin", ["admin"], actor="soak")
    _, main_key = store.create("soak-load", ["predict"], actor="soak")
    _, churn = store.create("soak-churn-0", ["predict"], actor="soak")
    store.close()

    ray_tmp = tempfile.mkdtemp(prefix="fw-soak-ray-", dir="/tmp")  # short: Ray's socket paths
    start_ray(msgspec.structs.replace(load_settings(), ray_address="", ray_tmpdir=ray_tmp),
              num_cpus=4, log_to_driver=False)
    try:
        print(f"deploying {APP}: 2 ingress replicas, colo (drift on), ded x{DEDICATED_REPLICAS}, ep 1+2 ...",
              flush=True)
        dep = deploy(cfg)
        try:
            report = soak(args, duration, plan, dep, admin, main_key, churn, model)
        finally:
            undeploy(dep)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "soak.json"), "w") as f:
        json.dump(report, f, indent=1)
    wrote = "soak.json"
    try:
        _plot(report, os.path.join(args.out, "soak.png"))
        wrote += " and soak.png"
    except ImportError:
        pass  # matplotlib is the bench extra's: the JSON says it all
    print(f"\nwrote {args.out}/{wrote}")
    if report["missed"]:
        print("TARGET MISSED: " + "; ".join(report["missed"]))
        return 1
    print("target met: every failed request was in flight on a killed process or carried a revoked key; "
          "no surviving process grew by more than 5 %")
    return 0


def soak(args, duration: float, plan, dep, admin: str, main_key: str, churn: str, model: str) -> dict:
    """Run the load and the faults against ``dep``; return the report."""
    deployments = [procs.INGRESS, procs.ROUTER, procs.DRIFT, "ded-1"]
    host_port = dep.grpc_target
    t0 = time.monotonic()
    keys = KeyRing(main_key, churn)
    load = OpenLoopLoad(dep.url, host_port, keys, args.rate, args.seed, HPARAMS["in_features"], t0)
    runner = FaultRunner(Target(APP, dep.url, dep.grpc_target, admin, dep.config.registry.uri, "ded-1", DEDICATED_REPLICAS,
                                INGRESS_REPLICAS, {"version": "3", "path": model, "num_cpus": 0.05}),
                         keys, t0, args.seed)
    print(f"load: {args.rate:g} req/s for {duration:.0f} s; faults planned at "
          + ", ".join(f"{p.at:.0f}s {p.kind}" for p in plan), flush=True)
    load.start(duration)
    time.sleep(max(0.0, args.warmup - (time.monotonic() - t0)))
    before = procs.snapshot(APP, deployments)
    runner.say(f"warm-up over: {len(before)} Flywheel processes sampled, {len(load.outcomes)} requests answered")
    runner.run(plan)
    load.join(duration - (time.monotonic() - t0) + 60.0)
    runner.join(30.0)
    after = procs.snapshot(APP, deployments)
    retried = retries(dep.url, admin)

    outcomes = sorted(load.outcomes, key=lambda o: o.start)
    faults = runner.result()
    revoked = {r["key"]: r["at"] for r in runner.revocations}
    summary = summarize(outcomes, faults, revoked)
    rows = growth(before, after)
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
    missed += [f"fault {f.kind} not done: {f.detail}" for f in faults if f.detail.startswith("NOT DONE")]
    missed += [f"{f.kind} not recovered within the limit" for f in faults
               if f.kind.startswith("kill") and f.recovered is None and not f.detail.startswith("NOT DONE")]
    return {
        "args": vars(args), "duration_s": duration, "mix": {"transports": TRANSPORTS, "models": MODELS,
                                                            "churned_key_share": CHURN_SHARE},
        "plan": [{"at_s": p.at, "kind": p.kind} for p in plan],
        "summary": summary, "retried": {"ingress_replica_retries": retried, "soak_resends": 0},
        "revocations": revocations, "processes": rows, "fault_log": runner.log,
        "late_sends": {"count": len(slip), "worst_ms": round(slip[-1] * 1e3, 1) if slip else 0.0},
        "missed": missed,
        "keys": {"load": key_id(main_key)},
        "timeline": _timeline(outcomes), "faults_at": [{"kind": f.kind, "at_s": round(f.at, 2)} for f in faults],
    }


def _timeline(outcomes) -> list[dict]:
    """Per second: requests that started then, how many failed, p50/p99 ms."""
    import numpy as np

    by_s: dict[int, list] = {}
    for o in outcomes:
        by_s.setdefault(int(o.start), []).append(o)
    out = []
    for s in sorted(by_s):
        lat = np.array([o.end - o.start for o in by_s[s]]) * 1e3
        out.append({"t": s, "sent": len(lat), "failed": sum(1 for o in by_s[s] if not o.ok),
                    "p50_ms": round(float(np.median(lat)), 2), "p99_ms": round(float(np.percentile(lat, 99)), 2)})
    return out


def _plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = report["timeline"]
    t = [p["t"] for p in tl]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    top.plot(t, [p["sent"] - p["failed"] for p in tl], label="answered well")
    top.plot(t, [p["failed"] for p in tl], "r.", label="failed")
    top.set_ylabel("requests / s")
    top.legend(loc="lower left")
    bottom.plot(t, [p["p50_ms"] for p in tl], label="p50")
    bottom.plot(t, [p["p99_ms"] for p in tl], label="p99")
    bottom.set_yscale("log")
    bottom.set_ylabel("latency per second (ms)")
    bottom.set_xlabel("seconds since the load started")
    bottom.legend(loc="upper left")
    for f in report["faults_at"]:
        for ax in (top, bottom):
            ax.axvline(f["at_s"], color="grey", alpha=0.5, lw=0.8)
        top.annotate(f["kind"], (f["at_s"], 1.0), xycoords=("data", "axes fraction"), rotation=90,
                     fontsize=7, va="top", ha="right")
    top.set_title(f"Soak: {report['args']['rate']:g} req/s open loop, faults marked")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
