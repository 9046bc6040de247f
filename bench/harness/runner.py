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

from flywheel.bench import h2load
from flywheel.bench.harness.payloads import WorkPlan, build_plan
from flywheel.bench.harness.pool import CLIENT_SATURATED, HOST_SATURATED, StepResult, WorkerPool, judge
from flywheel.bench.harness.scenario import Capacity, Scenario, h2load_limits
from flywheel.protocol.errors import ConfigError

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
    """``client``: the load generator that ran (reports from before h2load
    was a choice were all locust's)."""

    name: str
    mode: str
    started_at: str
    host: dict
    scenario: dict
    client: str = "locust"
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


def choose_client(sc: Scenario, installed: bool | None = None) -> str:
    """The load generator for ``sc``: its ``client``, or for ``auto`` h2load
    when ``installed`` (default: on PATH) and able to drive ``sc``, else
    locust. ConfigError (naming ``client``) when h2load is asked for and
    not installed."""
    installed = h2load.available() if installed is None else installed
    if sc.client == "h2load" and not installed:
        raise ConfigError(f"client: h2load is not installed: {h2load.INSTALL_HINT}")
    if sc.client == "auto":
        return "h2load" if installed and not h2load_limits(sc) else "locust"
    return sc.client


def notes_for(steps: list[StepResult], cap: CapacityResult | None, client: str = "locust") -> list[str]:
    notes = []
    bound = [s for s in steps if s.limited_by == "client"]
    if bound:
        more = "add processes" if client == "locust" else "raise processes (h2load threads)"
        notes.append(
            f"client-bound in {len(bound)} of {len(steps)} steps: the figures are a lower bound for the "
            f"server (a {client} process used >= {CLIENT_SATURATED:.0%} of a core while the host was "
            f"< {HOST_SATURATED:.0%} busy): {more}, or run the load generator on another host"
        )
        if client == "locust" and h2load.available():
            notes.append("h2load is installed: client: h2load (or auto, with payload.variants: 1) costs "
                         "far less CPU per request")
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
    """The load plan or the capacity search of ``sc`` against ``plan``'s
    target, from the client ``choose_client`` picks."""
    if choose_client(sc) == "h2load":
        from flywheel.bench.harness.h2load_pool import H2loadPool

        pool_cm: WorkerPool | H2loadPool = H2loadPool(plan, sc.processes)
    else:
        pool_cm = WorkerPool(plan, sc.processes)
    with pool_cm as pool:
        if sc.mode == "load":
            return run_load(pool, sc, progress), None
        assert sc.capacity is not None
        return search_capacity(pool, sc, sc.capacity, progress)


def run_scenario(sc: Scenario, progress: Progress = None) -> Report:
    """Run ``sc`` and return its report (not yet written anywhere)."""
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    client = choose_client(sc)
    report = Report(name=sc.name, mode=sc.mode, started_at=started, host=host_info(),
                    scenario=msgspec.to_builtins(sc), client=client)
    if client == "h2load":
        report.notes = ["h2load judges an answer by its status (gRPC: that it carries a message), "
                        "not by its outputs"]
    if sc.mode == "config_search":
        from flywheel.bench.harness.configsearch import run_config_search

        configs, best = run_config_search(sc, progress)
        notes = report.notes + [n for c in configs for n in notes_for(c.steps, c.capacity, client)]
        return msgspec.structs.replace(report, configs=configs, recommended=best, notes=sorted(set(notes)))
    if progress:
        progress(f"{sc.name}: {sc.mode} against {sc.target.http} model {sc.model}, load from {client}")
    plan = build_plan(sc)
    steps, cap = run_against(sc, plan, progress)
    return msgspec.structs.replace(report, steps=steps, capacity=cap,
                                   notes=report.notes + notes_for(steps, cap, client))
