"""A reference server in a process of its own (MLServer, KServe: their own
virtual environments), up until a block ends."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator


@contextlib.contextmanager
def peer_process(cmd: list[str], folder: str, log_name: str, ready_url: str, what: str,
                 timeout_s: float = 120.0) -> Iterator[None]:
    """Run ``cmd`` in ``folder`` (its output to ``log_name`` there) until
    ``ready_url`` answers 200, then until the block ends. It gets a process
    group of its own, which is killed if SIGTERM does not end it in 30 s
    (the workers it started go with it)."""
    log_path = os.path.join(folder, log_name)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout_s
            while not answers(ready_url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{what} did not start; see {log_path}")
                time.sleep(0.5)
            yield
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)


def answers(url: str) -> bool:
    """Whether ``url`` answers 200 now (within 2 s)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False
