"""Drift history shaped for a page: ``GET /v2/drift/{name}[?version=V]`` (operate).

The drift monitor keeps a short history per served model version (one entry
per scored window and test, serving/drift_monitor.py), which
``/v2/models/{name}/drift`` answers as it is kept. This route answers the
same history turned around: one series per (test, feature) of statistic,
p-value and flag over time, and the windows that drifted. ``version``:
the served version (default: the one the name routes to now).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from flywheel.serving._private.console_types import DriftHistory, DriftPoint, DriftSeries, DriftWindow


def _number(value) -> float | None:
    # the history went through JSON: NaN (psi's p-value) arrives as None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def shape_history(model: str, version: str, history: Iterable[dict]) -> DriftHistory:
    """``history``: the monitor's entries, oldest first (``{"ts", "test",
    "any_drift", "result": {statistic, p_adjusted, drift, ...}}``)."""
    series: dict[tuple[str, str], list[DriftPoint]] = {}
    flagged = []
    for entry in history:
        result = entry.get("result") or {}
        stats, ps, flags = result.get("statistic") or [], result.get("p_adjusted") or [], result.get("drift") or []
        ts, test = float(entry["ts"]), str(entry["test"])
        for i, flag in enumerate(flags):
            point = DriftPoint(ts, _number(stats[i]) if i < len(stats) else None,
                               _number(ps[i]) if i < len(ps) else None, bool(flag))
            series.setdefault((test, str(i)), []).append(point)
        drifting = [str(i) for i, flag in enumerate(flags) if flag]
        if drifting:
            flagged.append(DriftWindow(ts, test, drifting))
    return DriftHistory(model, version, [DriftSeries(t, f, pts) for (t, f), pts in series.items()], flagged)
