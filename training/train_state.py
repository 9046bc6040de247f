"""What a training job's state is, and how it is taken from and put back into
live torch objects: :class:`TrainState` (what a checkpoint holds), the RNG
states that decide a step (:func:`capture_rng`, :func:`restore_rng`), and the
full (unsharded) model and optimizer state dicts of DDP, FSDP2 and plain
modules (:func:`full_state_dicts`, :func:`load_full_state_dicts`).

Storing a TrainState is training/checkpoint.py's job; this module does no I/O
and knows no Ray (Ray Train workers call it).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from flywheel.protocol.errors import ConfigError


@dataclass
class TrainState:
    """Everything needed to continue a training job exactly where it stopped.

    ``model``: full (unsharded) state_dict of CPU tensors. ``optimizer``: a full
    optimizer state dict, either DCP's shape (parameter FQN keys, see
    :func:`full_state_dicts`) or plain ``optimizer.state_dict()`` (int keys).
    ``scheduler``: ``lr_scheduler.state_dict()``. ``counters``: ints, must hold
    ``global_step`` (names the checkpoint). ``rng``: see :func:`capture_rng`.
    ``metrics``/``extra``: JSON-able history and anything else.
    """

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    counters: dict[str, int]
    rng: dict[str, Any]
    metrics: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)


def capture_rng() -> dict[str, Any]:
    """The RNG states that decide a training step: torch (CPU), Python's
    ``random``, NumPy's legacy global generator, and CUDA's per-device states
    when CUDA is already initialized (never initializes it). Per process: in
    a multi-rank job, rank 0's states are what a rank-0 save records."""
    rng: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict[str, Any]) -> None:
    """Set the RNG states in ``rng`` (as from :func:`capture_rng`, possibly
    restored from a checkpoint); absent ones are left alone."""
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "python" in rng:
        random.setstate(rng["python"])
    if "numpy" in rng:
        np.random.set_state(rng["numpy"])
    if "cuda" in rng and torch.cuda.is_available():  # as many devices as this process sees
        torch.cuda.set_rng_state_all(list(rng["cuda"])[: torch.cuda.device_count()])


def full_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) full state dicts on CPU, for DDP, FSDP2 and plain
    modules alike: DCP's get_model/optimizer_state_dict with
    ``full_state_dict=True, cpu_offload=True``. Optimizer state is keyed by
    parameter FQN (``{"state": {fqn: {...}}, "param_groups": [{"params": [fqn, ...]}]}``).

    Collective under a process group: every rank must call it; only rank 0
    gets the dicts, the other ranks get empty ones (DCP gathers to rank 0 when
    offloading to CPU). Without a process group (one process, tests) DCP skips
    the gather and returns the local state, so no fallback is needed.

    Caveat (DCP's, not ours): on an optimizer that has not stepped yet, DCP
    first creates its state with a zero-lr step on zero grads, so Adam's
    ``step`` becomes 1 before training starts. Checkpoint after the first
    step to keep a run identical to one that never checkpointed.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=options),
            get_optimizer_state_dict(model, optimizer, options=options))


def load_full_state_dicts(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    model_sd: dict[str, Any] | None,
    optim_sd: dict[str, Any] | None,
    *,
    rank: int,
) -> None:
    """Load full state dicts (from :func:`full_state_dicts` or a checkpoint)
    into ``model`` and ``optimizer``, resharding for FSDP2 as needed.

    Under a process group this is collective, with ``broadcast_from_rank0``:
    only rank 0 reads storage and passes the dicts; the other ranks may pass
    None or {} and receive the tensors by broadcast. ``rank`` must be this
    process's rank. Without a process group ``rank`` must be 0 and the dicts
    load directly (DCP's broadcast needs a group; ``full_state_dict`` alone
    does not). An optimizer state keyed by ints (plain
    ``optimizer.state_dict()``) is accepted without a process group only
    (``optimizer.load_state_dict``). The given dicts and their tensors are
    not modified or aliased afterwards (DCP rewrites the dicts it is handed
    and copies tensor values into the optimizer's own, so it gets copies).
    Raises ConfigError on a wrong ``rank``, missing dicts on rank 0, or an
    id-keyed optimizer state under a process group.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    grouped = dist.is_available() and dist.is_initialized()
    actual = dist.get_rank() if grouped else 0
    if rank != actual:
        raise ConfigError(f"load_full_state_dicts(rank={rank}) runs on rank {actual}"
                          + ("" if grouped else " (no process group is initialized)"))
    if rank == 0 and (not model_sd or not optim_sd):
        raise ConfigError("load_full_state_dicts: rank 0 must pass the model and optimizer state dicts")
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=grouped)
    if rank != 0:
        set_model_state_dict(model, {}, options=options)
        set_optimizer_state_dict(model, optimizer, {}, options=options)
        return
    set_model_state_dict(model, dict(model_sd), options=options)
    if any(not isinstance(k, str) for k in optim_sd.get("state", {})) or any(
        not isinstance(p, str) for g in optim_sd.get("param_groups", []) for p in g.get("params", [])
    ):
        # Plain optimizer.state_dict() (int parameter ids): DCP only reads FQN
        # keys, and ids say nothing about sharding, so only one process can
        # take it. Clone: the optimizer would otherwise update our tensors in place.
        if grouped:
            raise ConfigError("an optimizer state keyed by parameter ids cannot be loaded under a process "
                              "group; save it with full_state_dicts() (keys are parameter FQNs)")
        optimizer.load_state_dict(_copy_structure(optim_sd, clone=True))
        return
    set_optimizer_state_dict(model, optimizer, _copy_structure(optim_sd), options=options)


def _copy_structure(value: Any, clone: bool = False) -> Any:
    if isinstance(value, dict):
        return {k: _copy_structure(v, clone) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_structure(v, clone) for v in value]
    if clone and isinstance(value, torch.Tensor):
        return value.clone()
    return value
