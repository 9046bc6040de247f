"""Free loopback ports for servers the tests start, and waiting for them."""

from __future__ import annotations

import socket
import urllib.request

from _poll import wait_for  # re-exported: the integration tests import it from here

__all__ = ["answers", "free_port", "wait_for"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    """True when a GET of ``url`` gets a 200 within 2 s."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False
