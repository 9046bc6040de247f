"""What each ingress replica of a deployment answered, through Serve."""

from __future__ import annotations


def answered_by_replica(app: str, asks: int = 20) -> dict[int, int]:
    """pid -> requests answered, from as many ingress replicas as answer
    ``asks`` calls (Serve spreads them over the replicas)."""
    from ray import serve

    handle = serve.get_deployment_handle("ingress", app_name=app)
    seen = {}
    for _ in range(asks):
        stats = handle.replica_stats.remote().result(timeout_s=10)
        seen[stats["pid"]] = stats["answered"]
    return seen
