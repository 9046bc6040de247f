"""Config search: deploy a model under a grid of server settings and pick
the best under the SLO (what Triton's model_analyzer does for Triton).

Each combination is deployed on the local Ray (started here unless the
caller already has one), on free loopback ports, capacity-searched, and
taken down before the next one. The recommendation is the highest
sustainable throughput; within 2 % of it, the fewest CPUs.
"""

from __future__ import annotations

import copy
import itertools
import os

import msgspec

from flywheel.bench.harness.payloads import build_plan
from flywheel.bench.harness.runner import ConfigResult, Progress, run_against
from flywheel.bench.harness.scenario import Grid, Scenario
from flywheel.protocol.errors import ConfigError, FlywheelError


def combinations(base: dict, grid: Grid) -> list[tuple[str, dict, dict]]:
    """(label, settings, model config mapping) for every grid combination."""
    axes = {
        "max_batch_size": grid.max_batch_size,
        "max_queue_delay_us": grid.max_queue_delay_us,
        "replicas": grid.replicas,
        "num_cpus": grid.num_cpus,
        "intra_op_threads": grid.intra_op_threads,
        "variant": grid.variants,
    }
    names = [k for k, v in axes.items() if v]
    out = []
    for values in itertools.product(*(axes[k] for k in names)):
        model = copy.deepcopy(base)
        settings: dict = {}
        for key, value in zip(names, values):
            if key in ("max_batch_size", "max_queue_delay_us"):
                model.setdefault("batching", {})[key] = value
            elif key == "intra_op_threads":
                model.setdefault("onnxruntime", {})[key] = value
            elif key == "variant":
                model.pop("path", None)
                model.pop("ref", None)
                model.update({"path": value.path} if value.path else {"ref": value.ref})
                value = value.name
            else:
                model[key] = value
            settings[key] = value
        label = ", ".join(f"{k}={v}" for k, v in settings.items()) or "as configured"
        out.append((label, settings, model))
    return out


def recommend(results: list[ConfigResult]) -> str:
    ok = [r for r in results if r.capacity is not None and r.capacity.sustainable_rps > 0]
    if not ok:
        return ""
    best = max(r.capacity.sustainable_rps for r in ok)
    near = [r for r in ok if r.capacity.sustainable_rps >= 0.98 * best]
    return min(near, key=lambda r: (r.cpus, -r.capacity.sustainable_rps)).label


def run_config_search(sc: Scenario, progress: Progress = None) -> tuple[list[ConfigResult], str]:
    import ray
    from ray import serve

    from flywheel.common import load_settings, start_ray
    from flywheel.serving import parse_config
    from flywheel.serving.app import deploy, undeploy

    cs, cap = sc.config_search, sc.capacity
    assert cs is not None and cap is not None
    combos = combinations({"name": sc.model, **cs.model}, cs.grid)
    if len(combos) > cs.max_configs:
        raise ConfigError(
            f"config_search: the grid has {len(combos)} combinations, more than max_configs {cs.max_configs}"
        )
    started_ray = not ray.is_initialized()
    if started_ray:
        start_ray(msgspec.structs.replace(load_settings(), ray_address=""), log_to_driver=False)
    results = []
    try:
        for i, (label, settings, model) in enumerate(combos, 1):
            if progress:
                progress(f"config {i}/{len(combos)}: {label}")
            result = ConfigResult(label=label, settings=settings, cpus=0.0)
            try:
                if model.get("path") and not os.path.exists(model["path"]):
                    # the local Ray would otherwise retry the replica until the deploy timeout
                    raise ConfigError(f"model file {model['path']} does not exist")
                server = {"port": 0, "grpc_port": 0 if sc.mix.grpc > 0 else -1}
                if model.get("placement", "colocated") == "colocated" and "replicas" in model:
                    # a colocated model scales with the ingress replicas it lives in
                    server["replicas"] = model.pop("replicas")
                cfg = parse_config({"name": f"bench-search-{i}", "server": server, "models": [model],
                                    "registry": cs.registry})
                m = cfg.models[0]  # the serving config's own defaults apply
                replicas = m.replicas if m.placement == "dedicated" else cfg.server.replicas
                result = msgspec.structs.replace(result, cpus=replicas * m.num_cpus)
                dep = deploy(cfg)
            except FlywheelError as exc:
                results.append(msgspec.structs.replace(result, error=f"deploy failed: {exc.message}"))
                if progress:
                    progress(f"  deploy failed: {exc.message}")
                continue
            try:
                plan = build_plan(sc, target_http=dep.url, target_grpc=dep.grpc_target or "")
                one = msgspec.structs.replace(sc, capacity=msgspec.structs.replace(cap, replicas=replicas))
                steps, capacity = run_against(msgspec.structs.replace(one, mode="capacity"), plan, progress)
                results.append(msgspec.structs.replace(result, steps=steps, capacity=capacity))
            finally:
                undeploy(dep)
    finally:
        if started_ray:
            serve.shutdown()
            ray.shutdown()
    best = recommend(results)
    if progress and best:
        progress(f"recommended: {best}")
    return results, best
