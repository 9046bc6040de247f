"""The flywheel turning on the demo, timed: live drift -> retrained, promoted.

    python -m flywheel.bench.loop [--out bench/results] [--timeout 600]   (make loop-demo)

It trains the demo's digits model, registers it in production (a registry
of its own, in a temporary folder), and serves it with drift monitoring,
capture of every request and one loop: a drift trigger, a training job on
captured + original data, the registry's not-worse-than-production gate and
a canary. A client sends labelled traffic throughout. Once the loop is idle,
the live inputs shift (inverted images); the script prints the loop's steps
as they happen, then the figures: time from the shift to drift detected and
to the new version promoted, requests sent and failed (target: 0). A plot of
answers per second and version, the steps marked, goes to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HPARAMS = {"in_features": 64, "hidden": [128, 64], "out_features": 10}
JOB = {
    "name": "digits-loop", "model": {"architecture": "mlp", "hparams": HPARAMS},
    "dataset": {"kind": "digits", "reference_rows": 300},
    "resources": {"workers": 1, "cpus_per_worker": 0.5, "wait_s": 120},
    "epochs": 8, "batch_size": 64, "optimizer": {"name": "adamw", "lr": 0.01},
    "checkpoint": {"every_steps": 0, "every_epochs": 1, "keep": 1},
}
LOOP = "keep-digits"
DEPLOYMENT = "loopdemo"


def demo_config(uri: str, artifacts: str, capture: str, *, name: str = DEPLOYMENT, port: int = 0,
                auth: bool = False, notify: list | None = None) -> dict:
    """The deployment: digits@production with drift and capture, and its loop."""
    return {
        "name": name, "server": {"port": port, "grpc_port": -1, "auth": {"enabled": auth}},
        "registry": {"uri": uri, "artifacts": artifacts},
        "models": [{"name": "digits", "ref": "digits@production", "num_cpus": 0.2,
                    "drift": {"enabled": True, "sample_rate": 1.0, "window": 100, "batch_rows": 20,
                              "flush_interval_s": 0.1, "tests": ["ks"]}}],
        "endpoints": [{"name": "digits", "capture": {"path": capture, "sample": 1.0, "max_file_age_s": 2,
                                                     "flush_interval_s": 0.2}}],
        "loops": [{
            "name": LOOP, "endpoint": "digits", "job": JOB,
            "triggers": [{"kind": "drift", "k": 2, "n": 3}],
            "guards": {"cooldown_s": 0, "daily_budget": 20},
            "data": {"captured": True, "captured_fraction": 0.5, "since": "last_run"},
            "policy": {"rules": [{"rule": "not_worse_than_production", "metric": "val_accuracy",
                                  "tolerance": 0.02}]},
            "canary": {"steps": [10, 50, 100], "hold_s": 2, "max_step_s": 120,
                       "gates": {"min_requests": 20, "max_p99_ratio": None, "max_reward_drop": 0.2,
                                 "min_rewards": 20}},
            "notify": notify or [],
            "tick_s": 0.5,
        }],
    }


def _evaluated(d: dict) -> str:
    return (f"evaluated on {d.get('rows')} held-out rows: candidate val_accuracy "
            f"{d.get('candidate_val_accuracy', float('nan')):.3f} vs production "
            f"{d.get('production_val_accuracy', float('nan')):.3f}")


_LINES = {
    "run_started": lambda d: f"run started by {d.get('trigger')}: {d.get('reason')}",
    "job_submitted": lambda d: f"training job {d.get('job_id')} submitted (captured + original data)",
    "job_resumed": lambda d: f"training job {d.get('job_id')} resumed from its checkpoint",
    "version_registered": lambda d: f"version {d.get('version')} registered ({d.get('ref')})",
    "evaluated": _evaluated,
    "gates_passed": lambda d: "gates passed",
    "approval_needed": lambda d: f"waiting for approval: {d.get('failures')}",
    "variant_added": lambda d: f"variant {d.get('variant')} added to the endpoint",
    "canary_started": lambda d: "canary started: "
                                + " -> ".join(f"{p:g}" for p in d.get("plan", {}).get("steps", [])) + " %",
    "canary_step": lambda d: f"canary at {d.get('percent')} %",
    "run_finished": lambda d: f"{d.get('outcome')}: {d.get('reason')}",
    "trigger_suppressed": lambda d: f"trigger suppressed: {d.get('suppressed')}",
}


def describe(kind: str, detail: dict) -> str:
    """One line of the timeline for a loop event."""
    line = _LINES.get(kind)
    return line(detail) if line else f"{kind} {detail}"


def plot(traffic, marks: list[tuple[float, str]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = sorted(traffic.per_second)[:-1]  # the last second was cut short by the stop
    versions = sorted({v for s in traffic.per_second.values() for v in s})
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for v in versions:
        ax.plot(seconds, [traffic.per_second[s].get(v, 0) for s in seconds], label=f"version {v}")
    for t, what in marks:
        ax.axvline(t, color="grey", linestyle=":", linewidth=1)
        ax.text(t, ax.get_ylim()[1] * 0.95, what, rotation=90, va="top", ha="right", fontsize=8)
    ax.set_xlabel("seconds since the traffic started")
    ax.set_ylabel("answers per second")
    ax.set_title("The loop on the digits demo: drift -> retrain -> canary -> promoted")
    ax.legend(loc="center left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results", help="where the plot goes (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=600, help="give up after this many seconds")
    args = parser.parse_args(argv)

    import msgspec
    import ray
    from ray import serve

    from flywheel.bench.loop_traffic import LabelledTraffic
    from flywheel.common import load_settings, start_ray
    from flywheel.registry import LoopStore, Registry
    from flywheel.serving import parse_config
    from flywheel.serving.app import deploy, undeploy
    from flywheel.training.digits import register_digits, train_digits

    home = tempfile.mkdtemp(prefix="flywheel-loop-demo-")
    uri, artifacts = f"sqlite:///{home}/registry.db", os.path.join(home, "artifacts")
    print(f"[loop demo] state in {home}", flush=True)
    t0 = time.monotonic()
    result = train_digits(os.path.join(home, "v1"), epochs=3, progress=None)
    reg = Registry.open(uri, artifacts)
    mv = register_digits(reg, result, actor="loop-demo", epochs=3)
    reg.promote("digits", mv.version, "staging", actor="loop-demo")
    reg.promote("digits", mv.version, "production", actor="loop-demo")
    print(f"[loop demo] digits/{mv.version} trained ({result.val_accuracy:.3f} val_accuracy) and in production "
          f"({time.monotonic() - t0:.1f} s)", flush=True)
    settings = msgspec.structs.replace(load_settings(), ray_address="", home=home, registry_uri=uri,
                                       artifacts_uri=artifacts)
    start_ray(settings, num_cpus=4, log_to_driver=False)
    store = LoopStore.open(uri)
    traffic = dep = None
    try:
        dep = deploy(parse_config(demo_config(uri, artifacts, os.path.join(home, "captures"))), settings=settings)
        print(f"[loop demo] serving on {dep.url}; labelled traffic starts", flush=True)
        traffic = LabelledTraffic(dep.url).start()
        time.sleep(5)
        shift = time.monotonic()
        shift_wall = time.time()
        traffic.inverted = True
        print("t=   0.0 s  the live inputs shift (inverted digits)", flush=True)
        marks = [(shift - traffic.started, "shift")]
        seen, outcome, detected, promoted = 0, None, None, None
        while time.monotonic() - shift < args.timeout and outcome is None:
            for ev in store.events(DEPLOYMENT, LOOP, after_id=seen):
                seen = ev.id
                t = ev.ts - shift_wall
                print(f"t={t:6.1f} s  {describe(ev.kind, ev.detail)}", flush=True)
                if ev.kind == "run_started" and detected is None:
                    detected = t
                    marks.append((shift - traffic.started + t, "drift detected"))
                if ev.kind == "canary_started":
                    marks.append((shift - traffic.started + t, "canary"))
                if ev.kind == "run_finished":
                    outcome = ev.detail.get("outcome")
                    if outcome == "promoted":
                        promoted = t
                        marks.append((shift - traffic.started + t, "promoted"))
            time.sleep(0.5)
        time.sleep(5)  # the new version's answers, for the plot
        traffic.stop()
        print("\n[loop demo] figures (this machine, one run)")
        print(f"  shift -> drift detected (run started): {detected if detected is None else f'{detected:.1f} s'}")
        print(f"  shift -> new version promoted:         {promoted if promoted is None else f'{promoted:.1f} s'}")
        print(f"  outcome:                               {outcome}")
        print(f"  requests sent / failed:                {traffic.requests} / {len(traffic.failures)}")
        print(f"  answers by version:                    {dict(sorted(traffic.versions.items()))}")
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "loop.png")
        try:
            plot(traffic, marks, path)
            print(f"  plot:                                  {path}")
        except ImportError:
            print("  (no plot: matplotlib is in the bench extra)")
        return 0 if outcome == "promoted" and not traffic.failures else 1
    finally:
        if traffic is not None:
            traffic.stop()
        if dep is not None:
            undeploy(dep)
        store.close()
        reg.close()
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
