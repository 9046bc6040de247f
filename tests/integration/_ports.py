"""Free loopback ports for servers the tests start, and waiting for them."""

from __future__ import annotations

import socket

from flywheel.bench.peer_process import answers  # re-exported: True when a GET gets a 200 within 2 s

from _poll import wait_for  # re-exported: the integration tests import it from here

__all__ = ["answers", "free_port", "wait_for"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
