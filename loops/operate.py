"""What operators do to loops, one implementation for HTTP and the CLI.

Reads come from the store (registry/loop_store.py); changes (pause, resume,
a manual trigger) are queued as loop events that the controller's next tick
applies in order, and each is an audit entry naming who asked. Neither face
talks to the controller's process, so both work while it restarts.
"""

from __future__ import annotations

from typing import Any

import msgspec

from flywheel.protocol.errors import InvalidInputError, NotFoundError

ACTIONS = {"pause": "pause_requested", "resume": "resume_requested", "trigger": "trigger_requested",
           "cancel": "cancel_requested"}
_TIMELINE = ("run_started", "job_submitted", "job_resumed", "version_registered", "evaluated", "gates_passed",
             "approval_needed", "variant_added", "canary_started", "canary_step", "run_finished", "error")


def _run_doc(run) -> dict[str, Any]:
    return msgspec.to_builtins(run)


def _require(store, deployment: str, loop: str) -> dict:
    for dep, name, state, updated in store.loops(deployment):
        if name == loop:
            return {"state": state, "updated_at": updated}
    raise NotFoundError(f"deployment {deployment!r} has no loop {loop!r}")


def list_loops(store, deployment: str) -> list[dict[str, Any]]:
    """Each loop: paused or not, its current run (or None), its last outcome."""
    out = []
    for dep, name, state, updated in store.loops(deployment):
        runs = store.runs(deployment, name, limit=20)
        current = next((r for r in runs if not r.finished), None)
        last = next((r for r in runs if r.finished), None)
        out.append({
            "name": name, "paused": bool(state.get("paused")), "last_tick": updated,
            "current_run": _run_doc(current) if current else None,
            "last_outcome": {"run": last.id, "outcome": last.outcome, "finished_at": last.finished_at}
            if last else None,
        })
    return out


def show_loop(store, deployment: str, loop: str, *, runs: int = 20) -> dict[str, Any]:
    got = _require(store, deployment, loop)
    return {"name": loop, "paused": bool(got["state"].get("paused")), "last_tick": got["updated_at"],
            "runs": [_run_doc(r) for r in store.runs(deployment, loop, limit=runs)],
            "events": [msgspec.to_builtins(e) for e in store.events(deployment, loop)[-50:]]}


def loop_runs(store, deployment: str, loop: str, *, limit: int = 100) -> list[dict[str, Any]]:
    _require(store, deployment, loop)
    return [_run_doc(r) for r in store.runs(deployment, loop, limit=limit)]


def request(store, registry, deployment: str, loop: str, action: str, *, actor: str, note: str = "") -> dict:
    """Queue ``action`` (pause, resume, trigger, cancel: the run in progress)
    for ``loop``; an audit entry names ``actor``."""
    if action not in ACTIONS:
        raise InvalidInputError(f"action {action!r} must be one of {', '.join(ACTIONS)}")
    _require(store, deployment, loop)
    store.add_event(deployment, loop, ACTIONS[action], {"actor": actor, "note": note})
    if registry is not None:
        registry.record(actor, f"loop_{action}", f"loop:{loop}", None, {"deployment": deployment, "note": note})
    return {"loop": loop, "requested": action, "by": actor}


def timeline(store, deployment: str, loop: str, run_id: str) -> list[tuple[float, str, dict]]:
    """A run's steps, oldest first: (ts, kind, detail)."""
    return [(e.ts, e.kind, e.detail) for e in store.events(deployment, loop, run_id=run_id) if e.kind in _TIMELINE]
