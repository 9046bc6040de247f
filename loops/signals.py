"""What a loop's triggers look at, read from the running deployment.

Drift: the drift monitor's scored windows of the endpoint's production
variant (the registry's ``production`` version when it is a variant, else the
variant taking the most traffic). Rewards: the endpoint's reward totals,
differenced over the trigger's window from snapshots this object keeps
(the router reports totals, not windows). Labelled accuracy: the captured
answers joined with their labels (common/capture_files.py). Files: fsspec
listings for ``new_data``.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable

from flywheel.loops.triggers import DriftWindow, FileInfo, Quality
from flywheel.loops.triggers.files import list_files
from flywheel.protocol.errors import FlywheelError

log = logging.getLogger(__name__)
_MERGE_S = 1.0  # windows scored by several tests within this long are one window
_KEEP_S = 7 * 86400.0


def production_variant(status: dict, production: int | None) -> str | None:
    variants = status.get("variants") or {}
    if production is not None and str(production) in variants:
        return str(production)
    weights = status.get("weights") or {}
    return max(weights, key=weights.get) if weights else next(iter(variants), None)


def merge_windows(history: list[dict]) -> list[DriftWindow]:
    """One DriftWindow per scored window: the monitor logs one entry per test
    for the same window, moments apart; any test drifting marks it drifted."""
    out: list[DriftWindow] = []
    for h in sorted(history, key=lambda e: e["ts"]):
        if out and h["ts"] - out[-1].ts <= _MERGE_S:
            out[-1] = DriftWindow(out[-1].ts, out[-1].drifted or bool(h.get("any_drift")))
        else:
            out.append(DriftWindow(float(h["ts"]), bool(h.get("any_drift"))))
    return out


class DeploymentSignals:
    """``Signals`` for one deployment. Thread-confined (the loop's thread)."""

    def __init__(self, ops, registry, *, model_of: dict[str, str], capture_of: dict[str, str],
                 clock: Callable[[], float] = time.time) -> None:
        self._ops = ops
        self._reg = registry
        self._model_of = model_of  # endpoint -> registry model
        self._capture_of = capture_of  # endpoint -> capture root ("" = none)
        self._clock = clock
        self._rewards: dict[str, collections.deque] = {}

    def _production(self, endpoint: str) -> int | None:
        try:
            return self._reg.resolve(f"{self._model_of.get(endpoint, endpoint)}@production").version
        except FlywheelError:
            return None

    def drift_windows(self, endpoint: str) -> list[DriftWindow]:
        status = self._ops.status(endpoint)
        variant = production_variant(status, self._production(endpoint))
        if variant is None:
            return []
        return merge_windows(self._ops.drift_history(endpoint, variant))

    def quality(self, endpoint: str, window_s: float) -> Quality:
        now = self._clock()
        count, total = 0, 0.0
        for v in (self._ops.status(endpoint).get("variants") or {}).values():
            count += int(v.get("rewards") or 0)
            total += float(v.get("reward_sum") or 0.0)
        snaps = self._rewards.setdefault(endpoint, collections.deque())
        snaps.append((now, count, total))
        while snaps and snaps[0][0] < now - max(window_s, _KEEP_S):
            snaps.popleft()
        # the totals at the window's start: the newest snapshot taken then or
        # before; none that old yet (or totals that went down, a variant
        # removed): everything counted so far
        base = None
        for s in snaps:
            if s[0] > now - window_s:
                break
            base = s
        n, diff = (count - base[1], total - base[2]) if base is not None else (count, total)
        if n < 0:
            n, diff = count, total
        labelled, accuracy = 0, None
        path = self._capture_of.get(endpoint, "")
        if path:
            from flywheel.common.capture_files import labelled_accuracy

            try:
                labelled, accuracy = labelled_accuracy(path, endpoint, now - window_s)
            except (FlywheelError, OSError) as exc:
                log.info("labelled accuracy of %s unavailable: %s", endpoint, exc)
        return Quality(rewards=n, mean_reward=(diff / n) if n else None, labelled=labelled, accuracy=accuracy)

    def list_files(self, pattern: str) -> list[FileInfo]:
        return list_files(pattern)
