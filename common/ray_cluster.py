"""Start or join Ray for Flywheel, and check that a cluster runs our Flywheel.

Serving, training and the CLI all start Ray the same way (token auth set
explicitly, usage stats off, the dashboard only where asked for), so it is
decided here, once.
"""

from __future__ import annotations

import os
import time

from flywheel.common.settings import Settings
from flywheel.common.version import DISTRIBUTION, flywheel_version
from flywheel.protocol.errors import ConfigError


def start_ray(
    settings: Settings,
    *,
    num_cpus: float | None = None,
    include_dashboard: bool = False,
    log_to_driver: bool = True,
) -> None:
    """Start (or join, with RAY_ADDRESS) Ray for Flywheel.

    The dashboard is off by default: serving does not need it and it costs
    ~200 MiB; Ray Train and config-file deploys do (RAY-NOTES.md).
    """
    import ray

    # Ray reads these from the environment of the processes it starts.
    os.environ["RAY_AUTH_MODE"] = settings.ray_auth_mode
    os.environ["RAY_USAGE_STATS_ENABLED"] = settings.ray_usage_stats
    if ray.is_initialized():
        return
    kwargs: dict = {"namespace": "flywheel", "log_to_driver": log_to_driver}
    if settings.ray_address:
        try:
            ray.init(address=settings.ray_address, **kwargs)
        except RuntimeError as exc:
            if "version mismatch" not in str(exc).lower():
                raise
            # Ray's own words name the cluster's and this process's versions
            raise ConfigError(f"RAY_ADDRESS {settings.ray_address}: {exc}") from None
        try:
            check_cluster_versions()
        except ConfigError:
            ray.shutdown()
            raise
        return
    cpus = num_cpus if num_cpus is not None else (settings.ray_num_cpus or None)
    if settings.ray_tmpdir:
        kwargs["_temp_dir"] = settings.ray_tmpdir
    ray.init(num_cpus=cpus, include_dashboard=include_dashboard, **kwargs)


def check_cluster_versions(timeout_s: float = 60.0) -> None:
    """Refuse a cluster where a node runs another Flywheel than this driver:
    its replicas would run code that does not match the config written here.
    One task per alive node reads the version installed there. (Ray refuses
    a Ray or Python mismatch itself, in ray.init.)"""
    import ray
    from ray.exceptions import GetTimeoutError, RayError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def _their_version() -> str:
        # the installed distribution's metadata, which every Flywheel has,
        # whatever its modules are called; a tree that was never installed
        # says "unknown", as flywheel_version() does on the driver
        from importlib.metadata import PackageNotFoundError, version
        from importlib.util import find_spec

        try:
            return version(DISTRIBUTION)
        except PackageNotFoundError:
            return "unknown" if find_spec("flywheel") is not None else "none"

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = [_their_version.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote() for n in nodes]
    deadline = time.monotonic() + timeout_s
    versions = []
    for node, ref in zip(nodes, refs):
        try:
            versions.append(ray.get(ref, timeout=max(0.1, deadline - time.monotonic())))
        except GetTimeoutError:
            raise ConfigError(f"Ray node {node['NodeManagerAddress']} did not say which Flywheel it runs within "
                              f"{timeout_s:.0f} s (no free worker there?)") from None
        except RayError:  # the node went away since ray.nodes(): nothing of ours will run there
            versions.append(None)
    ours = flywheel_version()
    other = sorted({f"{n['NodeManagerAddress']}: Flywheel {v}" for n, v in zip(nodes, versions)
                    if v is not None and v != ours})
    if other:
        raise ConfigError(
            f"this process runs Flywheel {ours}, but the Ray cluster's nodes run another "
            f"({'; '.join(other)}): install flywheel-ml=={ours} on every node (or run this Flywheel's own Ray)"
        )
