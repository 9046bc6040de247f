"""``{kind: drift, k: 3, n: 5}``: fire when at least ``k`` of the last ``n``
scored drift windows of the endpoint's production variant drifted.

Only windows newer than ``memory["since"]`` count. After firing, ``since``
moves to the newest window counted, so the same windows never fire twice.
With no ``since`` yet (a new loop), every window the signals return counts:
drift is a state of the endpoint, and a loop started on a drifting endpoint
should act on it. The controller calls :func:`reset` when a new version takes
production traffic, so that windows scored against the old one stop counting.

memory: ``{"since": float}``.
"""

from __future__ import annotations

import msgspec

from flywheel.loops.triggers.base import Firing, Signals, register, require, utc_text

MAX_N = 1000


def reset(memory: dict, now: float) -> None:
    """Forget every window scored up to ``now`` (e.g. on a promotion)."""
    memory["since"] = now


@register
class DriftTrigger(msgspec.Struct, tag="drift", tag_field="kind", frozen=True, forbid_unknown_fields=True):
    """Fire when ``k`` of the last ``n`` drift windows drifted (1 <= k <= n <= 1000)."""

    k: int = 3
    n: int = 5

    def __post_init__(self) -> None:
        require(1 <= self.n <= MAX_N, "n", f"a window count from 1 to {MAX_N}", self.n)
        require(1 <= self.k <= self.n, "k", f"a count of drifted windows from 1 to n ({self.n})", self.k)

    def check(self, signals: Signals, memory: dict, now: float, *, endpoint: str) -> Firing | None:
        since = memory.get("since")
        windows = [w for w in signals.drift_windows(endpoint) if since is None or w.ts > since]
        windows.sort(key=lambda w: w.ts)
        last = windows[-self.n :]
        drifted = sum(1 for w in last if w.drifted)
        if drifted < self.k:
            return None
        newest = last[-1].ts
        memory["since"] = newest
        return Firing(
            kind="drift",
            reason=f"drift in {drifted} of the last {len(last)} windows (newest at {utc_text(newest)})",
            detail={"drifted": drifted, "windows": len(last), "k": self.k, "n": self.n, "newest_ts": newest},
        )
