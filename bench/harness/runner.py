"""Run a scenario: a load plan or an SLO (capacity) search against a server.

Each level is one step of the WorkerPool (warm-up, then a measured window);
every step is judged against the scenario's SLO. The capacity search raises
the offered load until a step breaks the SLO; the last step that met it is
the knee, its throughput the sustainable one.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
from collections.abc import Callable

import msgspec

from flywheel.bench.harness.payloads import WorkPlan, build_plan
from flywheel.bench.harness.pool import StepResult, WorkerPool, judge
from flywheel.bench.harness.scenario import Capacity, Scenario

Progress = Callable[[str], None] | None


class CapacityResult(msgspec.Struct):
    """The SLO search's answer."""

    by: str
    knee_level: float | None
    sustainable_rps: float
    replicas: int
    per_replica_rps: float
    broke_at_level: float | None
    broke_because: list[str]
    knee_limited_by: str | None
    target_rps: float
    headroom: float
    replicas_needed: int | None


class ConfigResult(msgspec.Struct):
    """One deployed configuration of a config search."""

    label: str
    settings: dict
    cpus: float
    steps: list[StepResult] = []
    capacity: CapacityResult | None = None
    error: str = ""


class Report(msgspec.Struct):
    name: str
    mode: str
    started_at: str
    host: dict
    scenario: dict
    steps: list[StepResult] = []
    capacity: CapacityResult | None = None
    configs: list[ConfigResult] = []
    recommended: str = ""
    notes: list[str] = []


def describe(step: StepResult) -> str:
    offered = f" (offered {step.offered_rps:g}, {step.achieved:.0%} achieved)" if step.offered_rps else ""
    verdict = "SLO ok" if step.slo_ok else "SLO broken: " + "; ".join(step.slo_failures)
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    return (
        f"{step.by} {step.level:g}: {step.throughput_rps:.1f} req/s{offered}, "
        f"p50 {fmt(step.p50_ms)} p99 {fmt(step.p99_ms)} ms, {step.errors} errors, "
        f"client cpu {max(step.client_cpu):.0%}, host cpu {step.host_cpu:.0%}, limit: {step.limited_by} [{verdict}]"
    )


def _step(pool: WorkerPool, sc: Scenario, by: str, level: float, max_users: int, progress: Progress) -> StepResult:
    step = judge(
        pool.step(by=by, level=level, duration_s=sc.duration_s, warmup_s=sc.warmup_s,
                  max_requests=sc.max_requests, max_users=max_users),
        sc.slo,
    )
    if progress:
        progress("  " + describe(step))
    return step


def run_load(pool: WorkerPool, sc: Scenario, progress: Progress = None) -> list[StepResult]:
    """Every level of ``sc.load``, in order."""
    return [_step(pool, sc, sc.load.by, level, sc.load.max_users, progress) for level in sc.load.levels]


def replicas_needed(per_replica_rps: float, target_rps: float, headroom: float) -> int | None:
    """Replicas that serve ``target_rps`` with ``headroom`` (0.25 = 25 %) spare."""
    if target_rps <= 0:
        return None
    if per_replica_rps <= 0:
        return None
    return max(1, math.ceil(target_rps * (1 + headroom) / per_replica_rps - 1e-9))


def search_capacity(
    pool: WorkerPool, sc: Scenario, cap: Capacity, progress: Progress = None
) -> tuple[list[StepResult], CapacityResult]:
    """Raise the load level by level until a step breaks the SLO."""
    steps: list[StepResult] = []
    knee: StepResult | None = None
    broke: StepResult | None = None
    for level in cap.levels():
        step = _step(pool, sc, cap.by, level, cap.max_users, progress)
        steps.append(step)
        if not step.slo_ok:
            broke = step
            break
        knee = step
    sustainable = knee.throughput_rps if knee else 0.0
    per_replica = round(sustainable / cap.replicas, 2)
    return steps, CapacityResult(
        by=cap.by,
        knee_level=knee.level if knee else None,
        sustainable_rps=sustainable,
        replicas=cap.replicas,
        per_replica_rps=per_replica,
        broke_at_level=broke.level if broke else None,
        broke_because=broke.slo_failures if broke else [],
        knee_limited_by=knee.limited_by if knee else None,
        target_rps=cap.target_rps,
        headroom=cap.headroom,
        replicas_needed=replicas_needed(per_replica, cap.target_rps, cap.headroom),
    )


def notes_for(steps: list[StepResult], cap: CapacityResult | None) -> list[str]:
    notes = []
    client = [s for s in steps if s.limited_by == "client"]
    if client:
        notes.append(
            f"the load generator was the limit in {len(client)} of {len(steps)} steps (a worker process "
            f"used >= 85 % of its core): add processes, or run it on another host"
        )
    host = [s for s in steps if s.limited_by == "host"]
    if host:
        notes.append(
            f"the host's CPUs were saturated in {len(host)} steps: server and load generator share "
            f"{os.cpu_count()} cores here, so these figures are a lower bound for the server"
        )
    if cap is not None and cap.broke_at_level is None:
        notes.append("the SLO never broke: raise capacity.max_level or max_steps to find the knee")
    return notes


def host_info() -> dict:
    return {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
            "node": platform.node()}


def run_against(
    sc: Scenario, plan: WorkPlan, progress: Progress = None
) -> tuple[list[StepResult], CapacityResult | None]:
    """The load plan or the capacity search of ``sc`` against ``plan``'s target."""
    with WorkerPool(plan, sc.processes) as pool:
        if sc.mode == "load":
            return run_load(pool, sc, progress), None
        assert sc.capacity is not None
        return search_capacity(pool, sc, sc.capacity, progress)


def run_scenario(sc: Scenario, progress: Progress = None) -> Report:
    """Run ``sc`` and return its report (not yet written anywhere)."""
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    report = Report(name=sc.name, mode=sc.mode, started_at=started, host=host_info(),
                    scenario=msgspec.to_builtins(sc))
    if sc.mode == "config_search":
        from flywheel.bench.harness.configsearch import run_config_search

        configs, best = run_config_search(sc, progress)
        notes = [n for c in configs for n in notes_for(c.steps, c.capacity)]
        return msgspec.structs.replace(report, configs=configs, recommended=best, notes=sorted(set(notes)))
    if progress:
        progress(f"{sc.name}: {sc.mode} against {sc.target.http} model {sc.model}")
    plan = build_plan(sc)
    steps, cap = run_against(sc, plan, progress)
    return msgspec.structs.replace(report, steps=steps, capacity=cap, notes=notes_for(steps, cap))
