"""The function every Ray Train worker runs: data-parallel (DDP) or
model-parallel (FSDP2) training with checkpoints we own.

Why our own checkpoints rather than ``ray.train.report(checkpoint=...)``:
a worker crash shortly after such a report can lose that checkpoint (Ray
restarts from an older one or from scratch; RAY-NOTES.md). Here rank 0
writes each checkpoint atomically to the job's storage (training/checkpoint.py)
while the other ranks wait at a barrier, and every (re)start reads the
storage's LATEST pointer: the last checkpoint written before a crash is the
one resumed from.

Determinism: the model is built from the job's seed on every rank; each
epoch's data order is a permutation seeded by (seed, epoch), identical on
every rank, each rank taking every world-th row of each global batch; a
resumed run restores the model, optimizer, scheduler, counters, the epoch's
running sums and the RNG state, so it continues exactly where the
checkpoint was taken (gloo's all-reduce order is fixed for a world size).

Streamed data (training/streamed.py: kinds npy, images, parquet/csv with
``stream``): each rank iterates its Ray Data shard instead; every step
first agrees (an all-reduce) that every rank has a batch, so an epoch ends
for all at once; validation reads the whole validation split on each rank.
A resume skips the batches of its epoch that the checkpoint had trained:
correct (same epochs and step count), not bit-exact (see that module).

User code (training/user_code.py): the model may come from a factory of
the job's shipped code folder (the workers' working_dir), the loss and
validation metrics from the job's task or the user's functions, and a
``train_step`` hook may replace the forward + loss of a step; the loop
still does backward, the optimizer and scheduler steps, checkpoints,
resume, metrics and cancellation, so none of that changes for user code.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from typing import Any

import numpy as np

CANCEL_FILE = "CANCEL"
FAULT_MARKER = "fault-injected"
CANCEL_CHECK_STEPS = 10


def job_paths(job_dir: str) -> dict[str, str]:
    return {
        "checkpoints": os.path.join(job_dir, "checkpoints"),
        "metrics": os.path.join(job_dir, "metrics.jsonl"),
        "log": os.path.join(job_dir, "log.txt"),
        "output": os.path.join(job_dir, "output"),
        "cancel": os.path.join(job_dir, CANCEL_FILE),
        "fault": os.path.join(job_dir, FAULT_MARKER),
        "progress": os.path.join(job_dir, "progress.json"),
        "attempts": os.path.join(job_dir, "attempts.jsonl"),
        "placement": os.path.join(job_dir, "placement.jsonl"),
        "done": os.path.join(job_dir, "DONE"),
    }


def _wrap(model, strategy: str, world: int, device):
    """DDP: replicas kept in step by gradient all-reduce. FSDP2: every
    layer with parameters sharded across the ranks (fully_shard on a CPU
    device mesh), then the root."""
    import torch

    if world == 1:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for layer in model.modules():
        if layer is not model and isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _optimizer(spec, params):
    import torch

    o = spec.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(params, lr=o.lr, weight_decay=o.weight_decay)


def _scheduler(spec, opt):
    import torch

    s = spec.schedule
    if s.kind == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=s.step_epochs, gamma=s.gamma)
    if s.kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=spec.epochs, eta_min=s.min_lr)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _epoch: 1.0)


def append_log(path: str, line: str) -> None:
    stamp = time.strftime("%H:%M:%S", time.localtime()) + f".{int(time.time() * 1000) % 1000:03d}"
    with open(path, "a") as f:
        f.write(f"{stamp} {line}\n")


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``. ``config``: ``spec`` (JobSpec
    as a dict), ``job_dir``, ``checkpoints``, and either ``data`` (an
    ObjectRef of (x, y, x_val, y_val)) or ``streamed: True`` with
    ``row_shape`` and ``train_rows`` (the rows come from the trainer's
    ``train`` and ``validation`` datasets)."""
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from flywheel.protocol.errors import InvalidInputError
    from flywheel.training.checkpoint import CheckpointStore
    from flywheel.training.train_state import (
        TrainState,
        capture_rng,
        full_state_dicts,
        load_full_state_dicts,
        restore_rng,
    )
    from flywheel.training.spec import parse_spec
    from flywheel.training.user_code import Objective, StepContext, build_job_model

    spec = parse_spec(config["spec"])
    paths = job_paths(config["job_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))
    streamed = bool(config.get("streamed"))
    if streamed:  # rows come from Ray Data (training/streamed.py), batch by batch
        n_features = int(np.prod(config["row_shape"]))
    else:
        x, y, xv, yv = ray.get(config["data"])
        n_features = x.shape[1]
    torch.manual_seed(spec.seed)
    # user code (a factory, loss, metrics, train_step) imports from the
    # job's code folder: the workers' working_dir (training/runner.py)
    model, shape = build_job_model(spec.model, n_features)
    objective = Objective(spec)
    # a GPU job (resources.gpus_per_worker > 0; untested here: no GPU) keeps
    # the data and model on the worker's device
    device = ray.train.torch.get_device() if spec.resources.gpus_per_worker > 0 else torch.device("cpu")
    if not streamed:
        x = torch.from_numpy(np.ascontiguousarray(x)).reshape(-1, *shape)
        xv = torch.from_numpy(np.ascontiguousarray(xv)).reshape(-1, *shape)
        y, yv = torch.from_numpy(y), torch.from_numpy(yv)
        x, y, xv, yv = x.to(device), y.to(device), xv.to(device), yv.to(device)
    model = _wrap(model.to(device), spec.strategy, world, device)
    opt = _optimizer(spec, model.parameters())
    sched = _scheduler(spec, opt)
    store = CheckpointStore(config.get("checkpoints") or paths["checkpoints"])
    distributed = dist.is_available() and dist.is_initialized()

    epoch, step_in_epoch, global_step, history = 0, 0, 0, []
    running = _fresh_running()
    _note_placement(paths, rank, world, distributed)
    # Rank 0 reads the store and tells the others what it found: ranks that
    # each read it could disagree (a read error, storage not yet in sync)
    # and then call different collectives.
    state = store.latest() if rank == 0 else None
    resumed = None
    if state is not None:
        resumed = {"scheduler": state.scheduler, "counters": state.counters, "metrics": state.metrics,
                   "running": state.extra.get("running"), "rng": state.rng}
    if distributed:
        box = [resumed]
        dist.broadcast_object_list(box, src=0)
        resumed = box[0]
    if resumed is not None:
        load_full_state_dicts(model, opt, state.model if state else {}, state.optimizer if state else {}, rank=rank)
        sched.load_state_dict(resumed["scheduler"])
        epoch, step_in_epoch, global_step = (resumed["counters"][k] for k in ("epoch", "step_in_epoch", "global_step"))
        history = list(resumed["metrics"])
        saved = dict(resumed["running"] or {})
        running = {**running, **saved, "extra": dict(saved.get("extra") or {})}
        restore_rng(resumed["rng"])  # rank 0's, on every rank (broadcast with the checkpoint)
        if rank == 0:
            append_log(paths["log"], f"attempt resumed from checkpoint at step {global_step} (epoch {epoch}, "
                                  f"step {step_in_epoch} of it)")
            with open(paths["attempts"], "a") as f:  # when training went on again (bench/training.py)
                f.write(json.dumps({"resumed_at": time.time(), "from_step": global_step}) + "\n")

    def checkpoint(at_epoch: int, at_step: int) -> None:
        model_sd, optim_sd = full_state_dicts(model, opt)  # collective (FSDP gathers)
        if rank == 0:
            t = time.perf_counter()
            store.save(TrainState(
                model=model_sd, optimizer=optim_sd, scheduler=sched.state_dict(),
                counters={"epoch": at_epoch, "step_in_epoch": at_step, "global_step": global_step},
                rng=capture_rng(),
                metrics=history, extra={"running": running},
            ))
            store.prune(spec.checkpoint.keep)
            append_log(paths["log"], f"checkpoint at step {global_step} written in {time.perf_counter() - t:.3f}s")
        if distributed:
            dist.barrier()  # nobody runs ahead of a checkpoint that is not written yet

    def cancelled() -> bool:
        flag = torch.tensor([1 if rank == 0 and os.path.exists(paths["cancel"]) else 0], device=device)
        if distributed:
            dist.all_reduce(flag)  # every rank stops at the same step
        return bool(flag.item())

    per_rank = spec.batch_size // world
    rows = int(config["train_rows"]) if streamed else len(x)
    steps_per_epoch = rows // spec.batch_size  # streamed: an estimate, for progress only
    if steps_per_epoch == 0:
        raise InvalidInputError(f"batch_size {spec.batch_size} exceeds the {rows} training rows")
    if streamed:
        from flywheel.training.streamed import validation_batches, worker_batches
        from flywheel.training.user_code import resolve

        transform = resolve(spec.dataset.transform, "dataset.transform") if spec.dataset.transform else None

        def batches(at_epoch: int, skip: int):
            # every rank stops at the first step some rank has no batch for
            # (DDP/FSDP steps are collective); a resumed epoch skips the
            # batches its checkpoint had trained
            it = iter(worker_batches(per_rank, seed=spec.seed, epoch=at_epoch, rank=rank))
            for s in itertools.count():
                got = next(it, None)
                flag = torch.tensor([0 if got is None else 1], device=device)
                if distributed:
                    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
                if not flag.item():
                    return
                if s < skip:
                    continue
                xb = got["x"] if transform is None else _transformed(transform, got["x"])
                yield (s, torch.from_numpy(np.ascontiguousarray(xb, dtype=np.float32)).reshape(-1, *shape).to(device),
                       torch.from_numpy(np.asarray(got["y"])).to(device))
    else:
        def batches(at_epoch: int, skip: int):
            order = np.random.default_rng([spec.seed, at_epoch]).permutation(len(x))
            for s in range(skip, steps_per_epoch):
                batch = order[s * spec.batch_size:(s + 1) * spec.batch_size]
                mine = torch.from_numpy(batch[rank * per_rank:(rank + 1) * per_rank]).to(device)
                yield s, x[mine], y[mine]

    while epoch < spec.epochs:
        model.train()
        trained = 0
        for s, xb, yb in batches(epoch, step_in_epoch):
            trained += 1
            t0 = time.perf_counter()
            opt.zero_grad()
            step_ctx = StepContext(rank=rank, world_size=world, epoch=epoch, global_step=global_step,
                                   device=device, loss_fn=objective.loss_fn)
            loss, extra = objective.step_loss(model, (xb, yb), step_ctx)
            loss.backward()
            opt.step()
            global_step += 1
            # the loss and a train_step's extra scalars, summed over the ranks
            # in one all-reduce (sorted names: the same order on every rank)
            names = sorted(extra)
            sums = torch.tensor([float(loss.detach().item())] + [extra[k] for k in names],
                                dtype=torch.float64, device=device) * len(yb)
            if distributed:
                dist.all_reduce(sums)
            running["loss_sum"] += float(sums[0].item())
            for k, v in zip(names, sums[1:].tolist()):
                running["extra"][k] = running["extra"].get(k, 0.0) + v
            running["samples"] += spec.batch_size
            running["seconds"] += time.perf_counter() - t0
            fault = spec.fault
            if fault.kill_rank == rank and fault.at_step == global_step and not os.path.exists(paths["fault"]):
                with open(paths["fault"], "w") as f:
                    json.dump({"rank": rank, "step": global_step, "killed_at": time.time()}, f)
                os._exit(1)  # a worker process dies mid-training (the fault-tolerance test)
            if rank == 0 and global_step % 5 == 0:
                _progress(paths, epoch, s + 1, steps_per_epoch, global_step, float(loss.item()), running)
            if spec.checkpoint.every_steps and global_step % spec.checkpoint.every_steps == 0:
                checkpoint(epoch, s + 1)
            if global_step % CANCEL_CHECK_STEPS == 0 and cancelled():
                if rank == 0:
                    append_log(paths["log"], f"cancelled at step {global_step}")
                return
        if streamed and trained == 0 and step_in_epoch == 0:
            raise InvalidInputError(f"epoch {epoch + 1} gave no batch of {per_rank} rows to every worker "
                                    f"({rows} training rows, batch_size {spec.batch_size})")
        sched.step()
        if streamed:
            metrics = _evaluate_stream(model, validation_batches(), shape, device, objective)
        else:
            metrics = _evaluate(model, xv, yv, objective)
        row = {
            "epoch": epoch + 1, "global_step": global_step,
            "loss": running["loss_sum"] / max(1, running["samples"]),
            **{f"train_{k}": v / max(1, running["samples"]) for k, v in sorted(running.get("extra", {}).items())},
            **metrics,
            "samples_per_s": running["samples"] / running["seconds"] if running["seconds"] else 0.0,
            "lr": float(opt.param_groups[0]["lr"]),
        }
        history.append(row)
        if rank == 0:
            with open(paths["metrics"], "a") as f:
                f.write(json.dumps(row) + "\n")
            headline = objective.headline
            append_log(paths["log"], f"epoch {row['epoch']} step {global_step} loss {row['loss']:.4f} "
                                     f"{headline} {row[headline]:.4f} {row['samples_per_s']:.0f} samples/s")
        epoch, step_in_epoch = epoch + 1, 0
        running = _fresh_running()
        every = spec.checkpoint.every_epochs
        if (every and epoch % every == 0) or epoch == spec.epochs:
            checkpoint(epoch, 0)
        ray.train.report({k: v for k, v in row.items() if isinstance(v, (int, float))})
        if cancelled():
            return
    if rank == 0:
        append_log(paths["log"], f"finished: {global_step} steps")
        with open(paths["done"], "w") as f:  # ran to the end (a late cancel does not undo that)
            f.write(f"{global_step}\n")


def _note_placement(paths: dict, rank: int, world: int, distributed: bool) -> None:
    """Rank 0 notes where every rank of this attempt runs (node address and
    id), in the log and in ``placement.jsonl``: on a cluster that is how a
    reader tells a job spread over nodes, and a restart onto a new node."""
    import ray
    import torch.distributed as dist

    mine = {"rank": rank, "ip": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id()}
    ranks = [mine]
    if distributed:
        ranks = [None] * world
        dist.all_gather_object(ranks, mine)
    if rank != 0:
        return
    with open(paths["placement"], "a") as f:
        f.write(json.dumps({"started_at": time.time(), "ranks": ranks}) + "\n")
    append_log(paths["log"], "workers: " + ", ".join(f"rank {r['rank']} on {r['ip']} (node {r['node_id'][:12]})"
                                                   for r in ranks))


def _fresh_running() -> dict[str, Any]:
    # an epoch's running sums (checkpointed: a resume mid-epoch continues them)
    return {"loss_sum": 0.0, "samples": 0, "seconds": 0.0, "extra": {}}


def _evaluate(model, xv, yv, objective) -> dict[str, float]:
    """Validation on every rank over the whole split (an FSDP forward is
    collective, so every rank must run the same batches): val_loss and the
    task's and the user's metrics (training/user_code.py)."""
    import torch

    if len(xv) == 0:
        return objective.empty_metrics()
    model.eval()
    with torch.no_grad():
        outputs = torch.cat([model(xv[i:i + 512]) for i in range(0, len(xv), 512)])
        return objective.evaluate(outputs, yv)


def _evaluate_stream(model, batches, shape, device, objective) -> dict[str, float]:
    """:func:`_evaluate` over streamed validation batches (the whole split
    on every rank, in order): only the outputs and labels are kept."""
    import torch

    outputs, targets = [], []
    model.eval()
    with torch.no_grad():
        for batch in batches:
            xb = torch.from_numpy(np.ascontiguousarray(batch["x"], dtype=np.float32)).reshape(-1, *shape)
            outputs.append(model(xb.to(device)))
            targets.append(torch.from_numpy(np.asarray(batch["y"])).to(device))
        if not outputs:
            return objective.empty_metrics()
        return objective.evaluate(torch.cat(outputs), torch.cat(targets))


def _transformed(transform, x: np.ndarray) -> np.ndarray:
    from flywheel.training.stream_rows import apply_transform

    return apply_transform(transform, np.array(x, dtype=np.float32))  # a copy the user may change in place


def _progress(paths, epoch, step, steps, global_step, loss, running) -> None:
    tmp = paths["progress"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"epoch": epoch + 1, "step": step, "steps_per_epoch": steps, "global_step": global_step,
                   "loss": loss, "samples_per_s": running["samples"] / running["seconds"] if running["seconds"] else 0.0,
                   "time": time.time()}, f)
    os.replace(tmp, paths["progress"])
