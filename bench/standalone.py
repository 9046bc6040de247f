"""Flywheel's server without Ray: the same Ingress, in a plain process.

    python -m flywheel.bench.standalone '<DeployConfig as JSON>'

The latency benchmark's floor: what the request path costs when nothing of
Ray is in the process. Every model is colocated; ``server.replicas`` is
ignored here (start several processes: they share the ports like replicas).
Prints ``ready`` once serving; stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import signal
import sys
import threading

from flywheel.serving.config import parse_config
from flywheel.serving.ingress import Ingress


def main(argv: list[str] | None = None) -> int:
    import json

    cfg = parse_config(json.loads((argv or sys.argv[1:])[0]))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    keys_uri = cfg.registry.uri if cfg.server.auth.enabled else ""
    ingress = Ingress(cfg.server, [], keys_uri=keys_uri, colocated=list(cfg.models), registry=cfg.registry)
    print("ready", flush=True)
    stop.wait()
    ingress.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
