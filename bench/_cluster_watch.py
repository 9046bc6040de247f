"""A Ray driver that samples a Flywheel application's ingress for the
cluster benchmark: every ``interval`` seconds one JSON line with the time
(time.monotonic(): one clock for every process on this machine, namespaces
included), Serve's count of RUNNING ingress replicas and, per replica pid,
the requests it has answered (``replica_stats``, asked through Serve; only
with ASK_REPLICAS 1: a call routed to a replica on a dead node waits for its
time-out), and the cluster's nodes as the GCS sees them (id, address, alive).

    python -m flywheel.bench._cluster_watch RAY_ADDRESS APP INTERVAL_S ASK_REPLICAS

Runs until stopped (SIGTERM).
"""

from __future__ import annotations

import json
import sys
import time


def main(argv: list[str]) -> int:
    import ray
    from ray import serve

    address, app, interval, ask = argv[0], argv[1], float(argv[2]), argv[3] == "1"
    ray.init(address=address, log_to_driver=False)
    handle = None
    while True:
        started = time.monotonic()
        sample: dict = {"t": started}
        try:
            state = serve.status().applications.get(app)
            ingress = state.deployments.get("ingress") if state else None
            running = ingress.replica_states.get("RUNNING", 0) if ingress else 0
            answered: dict[str, int] = {}
            if running and ask:
                handle = handle or serve.get_deployment_handle("ingress", app_name=app)
                # Serve spreads the calls over the replicas; a few per replica find each
                for _ in range(4 * running):
                    stats = handle.replica_stats.remote().result(timeout_s=5)
                    answered[str(stats["pid"])] = stats["answered"]
            nodes = [[n["NodeID"], n["NodeManagerAddress"], bool(n["Alive"])] for n in ray.nodes()]
            sample.update(running=running, answered=answered, nodes=nodes)
        except Exception as exc:  # noqa: BLE001 - a missed sample is said and the next one taken
            sample["error"] = repr(exc)[:300]
        print(json.dumps(sample), flush=True)
        time.sleep(max(0.0, interval - (time.monotonic() - started)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
