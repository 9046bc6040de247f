"""The soak's timeline: per second figures and their plot."""

from __future__ import annotations

import numpy as np

from flywheel.bench._soak_report import MAX_GROWTH_PCT, Outcome


def timeline(outcomes: list[Outcome]) -> list[dict]:
    """Per second of the run: requests sent in it, how many of them failed,
    and their p50 / p99 latency (ms)."""
    by_s: dict[int, list[Outcome]] = {}
    for o in outcomes:
        by_s.setdefault(int(o.start), []).append(o)
    out = []
    for s in sorted(by_s):
        lat = np.array([o.end - o.start for o in by_s[s]]) * 1e3
        out.append({"t": s, "sent": len(lat), "failed": sum(1 for o in by_s[s] if not o.ok),
                    "p50_ms": round(float(np.median(lat)), 2), "p99_ms": round(float(np.percentile(lat, 99)), 2)})
    return out


def plot(report: dict, path: str) -> None:
    """Requests answered / failed per second and p50 / p99, faults marked.
    ImportError without matplotlib (the bench extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = report["timeline"]
    t = [p["t"] for p in tl]
    fig, (top, bottom, mem) = plt.subplots(3, 1, figsize=(11, 8.5), sharex=True)
    top.plot(t, [p["sent"] - p["failed"] for p in tl], label="answered well")
    failed = [p for p in tl if p["failed"]]
    top.plot([p["t"] for p in failed], [p["failed"] for p in failed], "r.", label="failed")
    top.set_ylabel("requests / s")
    top.set_ylim(bottom=0)
    top.legend(loc="lower left")
    bottom.plot(t, [p["p50_ms"] for p in tl], label="p50")
    bottom.plot(t, [p["p99_ms"] for p in tl], label="p99")
    bottom.set_yscale("log")
    bottom.set_ylabel("latency per second (ms)")
    bottom.legend(loc="upper left")
    lived = {r["pid"]: r["role"] for r in report["processes"] if r["state"] == "both"}
    for pid, role in sorted(lived.items(), key=lambda x: (x[1], x[0])):
        pts = [p for p in report["resource_timeline"] if p["pid"] == pid]
        if pts:
            base = pts[0]["rss_kib"]
            mem.plot([p["t"] for p in pts], [100.0 * (p["rss_kib"] - base) / base for p in pts], ".-",
                     label=f"{role} {pid}")
    mem.axhline(MAX_GROWTH_PCT, color="red", lw=0.8, ls="--", label=f"{MAX_GROWTH_PCT:g} % bound")
    mem.set_ylabel("RSS growth since\nits first sample (%)")
    mem.set_xlabel("seconds since the load started")
    mem.legend(loc="upper left", fontsize=7)
    mem.set_title("processes that lived through the run", fontsize=9)
    for f in report["faults_at"]:
        for ax in (top, bottom, mem):
            ax.axvline(f["at_s"], color="grey", alpha=0.5, lw=0.8)
        top.annotate(f["kind"], (f["at_s"], 1.0), xycoords=("data", "axes fraction"), rotation=90,
                     fontsize=7, va="top", ha="right")
    top.set_title(f"Soak: {report['args']['rate']:g} req/s open loop, faults marked")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
