"""Synthetic worker replies and config results for the harness's unit tests."""

from flywheel.bench.harness import LatencyHistogram
from flywheel.bench.harness.runner import CapacityResult, ConfigResult


def _reply(latencies, errors=None, elapsed=2.0, cpu=0.2, busy=0.5, proto="http_json", rate=None):
    h = LatencyHistogram()
    for v in latencies:
        h.record(v)
    errors = errors or {}
    return {"elapsed_s": elapsed, "scheduled": round(rate * elapsed) if rate else None,
            "cpu_s": cpu * elapsed, "host_busy": busy, "hist": h.to_dict(),
            "protocols": {proto: {"ok": h.count, "errors": sum(errors.values()), "hist": h.to_dict()}},
            "errors": errors}


def _cfg(label, rps, cpus):
    cap = CapacityResult(by="users", knee_level=1, sustainable_rps=rps, replicas=1, per_replica_rps=rps,
                         broke_at_level=None, broke_because=[], knee_limited_by="server", target_rps=0,
                         headroom=0.25, replicas_needed=None)
    return ConfigResult(label=label, settings={}, cpus=cpus, capacity=cap)
