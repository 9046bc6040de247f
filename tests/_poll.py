"""Waiting for a state in tests: poll a condition until a deadline, then fail
saying what was awaited (never a fixed sleep that hopes the state arrived).

Importable from every test module as ``_poll`` (tests/ is on sys.path through
tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout_s: float, what: str, *, every_s: float = 0.25) -> T:
    """Call ``condition`` every ``every_s`` until it returns something true,
    and return that; raise AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(every_s)


async def wait_for_async(condition: Callable[[], T], timeout_s: float, what: str, *, every_s: float = 0.005) -> T:
    """``wait_for`` inside a running event loop: sleeps with ``asyncio.sleep``
    so the tasks being waited on keep running."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        await asyncio.sleep(every_s)
