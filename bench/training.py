"""Training throughput, checkpoint cost and recovery time on this machine.

    python -m flywheel.bench.training [--epochs 2] [--rows 16384] [--out bench/results]

One invocation, on a local Ray with 2 CPUs per worker pair:

- **samples/s**, 1 vs 2 workers, DDP and FSDP, for an MLP
  256 -> 1024 -> 1024 -> 1024 -> 10 (2.4 M parameters) on synthetic data read
  from a Parquet file (the last epoch's rate, so start-up is left out; the
  wall time of the whole job is printed beside it);
- **checkpoint write and restore**: the full model + AdamW state (about
  29 MB) through training/checkpoint.py (atomic write with fsync and
  sha256 manifest; restore = read, verify, rebuild);
- **recovery**: a 2-worker DDP job whose worker 1 dies (``os._exit``) at a
  chosen step; the time from the kill to training running again (the
  resumed attempt's first line), and the steps redone.

Prints a table and writes training.json and training.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

HPARAMS = {"in_features": 256, "hidden": [1024, 1024, 1024], "out_features": 10}


def _spec(name: str, parquet: str, strategy: str, workers: int, epochs: int, **extra) -> dict:
    return {
        "name": name,
        "model": {"architecture": "mlp", "hparams": HPARAMS},
        "dataset": {"kind": "parquet", "path": parquet, "validation_fraction": 0.1, "reference_rows": 100},
        "strategy": strategy,
        "resources": {"workers": workers, "cpus_per_worker": 2.0 / workers, "wait_s": 120},
        "epochs": epochs, "batch_size": 256, "seed": 0,
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "checkpoint": {"every_steps": 0, "every_epochs": 1, "keep": 1},
        "export": {"register": False, "onnx": False},
        **extra,
    }


def _data(path: str, rows: int) -> str:
    import pandas as pd

    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, HPARAMS["in_features"])).astype(np.float32)
    w = rng.normal(size=(HPARAMS["in_features"], 10)).astype(np.float32)
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(x.shape[1])])
    frame["label"] = (x @ w).argmax(1)
    frame.to_parquet(path)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)

    import msgspec
    import ray

    from flywheel.common.settings import load_settings
    from flywheel.training.api import TrainingRuntime
    from flywheel.training.loop import job_paths

    tmp = tempfile.mkdtemp(prefix="fw-train-bench-")
    parquet = _data(os.path.join(tmp, "data.parquet"), args.rows)
    settings = msgspec.structs.replace(
        load_settings(), home=tmp, registry_uri=f"sqlite:///{tmp}/registry.db", artifacts_uri=f"{tmp}/artifacts",
        ray_address="", ray_num_cpus=2,
    )
    rt = TrainingRuntime(settings)
    throughput = []
    try:
        for strategy in ("ddp", "fsdp"):
            for workers in (1, 2):
                print(f"[{strategy} x {workers}] training {args.epochs} epochs of {args.rows} rows ...", flush=True)
                t0 = time.perf_counter()
                job = rt.submit(_spec(f"bench-{strategy}-{workers}", parquet, strategy, workers, args.epochs))
                rec = job.wait(900)
                if rec.state != "succeeded":
                    raise SystemExit(f"{strategy} x {workers} {rec.state}: {rec.error}\n{job.logs()}")
                last = job.metrics()[-1]
                throughput.append({"strategy": strategy, "workers": workers, "samples_per_s": last["samples_per_s"],
                                   "job_s": time.perf_counter() - t0, "val_accuracy": last["val_accuracy"]})
        ckpt = _checkpoint_times(tmp)
        print("[recovery] 2-worker DDP job, worker 1 killed at step 40 ...", flush=True)
        job = rt.submit(_spec("bench-recovery", parquet, "ddp", 2, args.epochs,
                              checkpoint={"every_steps": 20, "every_epochs": 1, "keep": 2},
                              fault={"kill_rank": 1, "at_step": 40}))
        rec = job.wait(900)
        if rec.state != "succeeded":
            raise SystemExit(f"recovery job {rec.state}: {rec.error}\n{job.logs()}")
        paths = job_paths(rec.storage)
        with open(paths["fault"]) as f:
            killed = json.load(f)
        with open(paths["attempts"]) as f:
            resumed = json.loads(f.readline())
        recovery = {"killed_at_step": killed["step"], "resumed_from_step": resumed["from_step"],
                    "seconds_to_resumed": resumed["resumed_at"] - killed["killed_at"]}
    finally:
        rt.close()
        ray.shutdown()

    print(f"\n{'strategy':<8} {'workers':>7} {'samples/s':>10} {'speed-up':>9} {'job wall s':>11} {'val acc':>8}")
    base = {t["strategy"]: t["samples_per_s"] for t in throughput if t["workers"] == 1}
    for t in throughput:
        t["speedup"] = t["samples_per_s"] / base[t["strategy"]]
        print(f"{t['strategy']:<8} {t['workers']:>7} {t['samples_per_s']:>10.0f} {t['speedup']:>8.2f}x "
              f"{t['job_s']:>11.1f} {t['val_accuracy']:>8.3f}")
    print(f"\ncheckpoint ({ckpt['mb']:.1f} MB: model + AdamW state): write {ckpt['write_s'] * 1000:.0f} ms, "
          f"restore {ckpt['restore_s'] * 1000:.0f} ms (median of 5)")
    print(f"recovery: worker killed at step {recovery['killed_at_step']}, training resumed from step "
          f"{recovery['resumed_from_step']} {recovery['seconds_to_resumed']:.1f} s later")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump({"throughput": throughput, "checkpoint": ckpt, "recovery": recovery}, f, indent=1)
    _plot(throughput, ckpt, recovery, os.path.join(args.out, "training.png"))
    print(f"wrote {args.out}/training.json and training.png")
    return 0


def _checkpoint_times(tmp: str) -> dict:
    """Write and restore the bench model's full state 5 times; medians."""
    import torch

    from flywheel.runtime.architectures import build
    from flywheel.training.checkpoint import CheckpointStore
    from flywheel.training.train_state import TrainState

    torch.manual_seed(0)
    model, _ = build("mlp", HPARAMS)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(2, HPARAMS["in_features"])).sum().backward()
    opt.step()
    store = CheckpointStore(os.path.join(tmp, "ckpt-bench"))
    writes, reads = [], []
    for step in range(1, 6):
        state = TrainState(model=model.state_dict(), optimizer=opt.state_dict(), scheduler={},
                           counters={"epoch": 0, "step_in_epoch": step, "global_step": step}, rng={}, metrics=[])
        t = time.perf_counter()
        path = store.save(state)
        writes.append(time.perf_counter() - t)
        t = time.perf_counter()
        store.latest()
        reads.append(time.perf_counter() - t)
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    return {"mb": size / 1e6, "write_s": float(np.median(writes)), "restore_s": float(np.median(reads))}


def _plot(throughput, ckpt, recovery, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    labels = [f"{t['strategy']} x{t['workers']}" for t in throughput]
    ax.bar(labels, [t["samples_per_s"] for t in throughput], color=["#4c72b0", "#4c72b0", "#dd8452", "#dd8452"])
    ax.set_ylabel("samples/s (last epoch)")
    ax.set_title(f"MLP 2.4M params; checkpoint {ckpt['write_s'] * 1000:.0f} ms write / "
                 f"{ckpt['restore_s'] * 1000:.0f} ms restore; recovery {recovery['seconds_to_resumed']:.1f} s",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
