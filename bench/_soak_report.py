"""The soak's verdicts, as pure functions over what the run recorded.

Nothing here touches a process or a socket: the soak (bench/soak.py) records
every request's outcome, every fault and every resource sample, and these
functions decide what each failure is blamed on, how long each fault took to
recover from, how much every process grew, and whether the run met its
target. Times are seconds since the soak started.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

# the bound on RSS and open-file growth of a process that lived from
# the end of the warm-up to the end of the run
MAX_GROWTH_PCT = 5.0
# Open files are judged without the live connections (they move to the
# survivors when a kill sends the load's clients elsewhere: not a leak), and
# only when they also grew by more than this many: a few descriptors come and
# go with Ray's own calls; a leak grows without such a bound.
FD_SLACK = 4
REVOKED = "expected: revoked key"
UNEXPLAINED = "unexplained"


@dataclass(frozen=True, slots=True)
class Outcome:
    """One request of the load: ``cause`` is "" when it was answered well."""

    index: int
    transport: str  # http_json | http_binary | grpc
    model: str
    key: str  # the id of the API key it carried
    start: float
    end: float
    cause: str = ""

    @property
    def ok(self) -> bool:
        return not self.cause


@dataclass(frozen=True, slots=True)
class Fault:
    """Something the soak did to the deployment.

    ``transports`` / ``models``: the requests whose path goes through what
    was hit (empty = every one). ``load_path``: False for what no request of
    the load goes through (the router controller, the drift monitor, a
    canary, a key): such a fault is blamed for no failure. ``recovered``:
    seconds from ``at`` to the deployment's own signal that it is whole
    again (a replacement running, a swap done; None = not seen).
    """

    kind: str
    at: float
    transports: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    target: str = ""
    recovered: float | None = None
    detail: str = ""
    load_path: bool = True  # False: what it hit is on no request's path (a controller, a key)

    def on_path(self, o: Outcome) -> bool:
        """Whether ``o``'s path goes through what this fault hits."""
        return (self.load_path and (not self.transports or o.transport in self.transports)
                and (not self.models or o.model in self.models))

    def touches(self, o: Outcome) -> bool:
        """Whether ``o`` was in flight through what this fault hit when it hit it."""
        return self.on_path(o) and o.start <= self.at <= o.end


_NUMBER = re.compile(r"\d+(\.\d+)?")


def cause_of(kind: str, status: object, message: str, limit: int = 90) -> str:
    """A failure's cause, short and stable enough to count alike: the
    transport's status (HTTP code, gRPC code name, or ``connection`` when
    none came back) and the message with numbers (ports, ids, timings)
    replaced by ``N``."""
    prefix = "connection" if status is None else f"{kind} {status}"
    text = _NUMBER.sub("N", " ".join(message.split()))
    return f"{prefix}: {text}"[:limit]


def wrong_answer(got: np.ndarray, expected: np.ndarray) -> str:
    """The cause of a wrong answer, or "" when ``got`` is the model's answer
    (to float tolerance: a row batched with others may differ in its last bits)."""
    if got.shape != expected.shape:
        return f"wrong answer: output shape {got.shape}, expected {expected.shape}"
    if not np.allclose(got, expected, rtol=1e-4, atol=1e-5):
        return f"wrong answer: output differs from the model's by up to {float(np.max(np.abs(got - expected))):.3g}"
    return ""


def is_unauthenticated(cause: str) -> bool:
    return cause.startswith(("HTTP 401", "gRPC UNAUTHENTICATED"))


def blame(o: Outcome, faults: list[Fault], revoked: dict[str, float]) -> str:
    """What a failed request is blamed on: a refusal of a key after its
    revocation (``revoked``: key id -> when), else the first fault it was in
    flight on (``fault: <kind> @<at>s``), else ``unexplained``."""
    when = revoked.get(o.key)
    if when is not None and o.end >= when and is_unauthenticated(o.cause):
        return REVOKED
    for f in faults:
        if f.touches(o):
            return f"fault: {f.kind} @{f.at:.1f}s"
    return UNEXPLAINED


def first_success_after(outcomes: list[Outcome], fault: Fault) -> float | None:
    """Seconds from the fault to the end of the first request on its path
    that was sent after it and answered well (None: none was)."""
    if not fault.load_path:
        return None
    best = None
    for o in outcomes:
        if o.ok and o.start >= fault.at and fault.on_path(o) and (best is None or o.end < best):
            best = o.end
    return None if best is None else best - fault.at


def summarize(outcomes: list[Outcome], faults: list[Fault], revoked: dict[str, float]) -> dict:
    """Counts: sent, ok, failed by cause, failures by blame, the unexplained
    ones (the first 20 in full), and each fault's recovery."""
    failed = [o for o in outcomes if not o.ok]
    blamed = Counter()
    unexplained = []
    for o in failed:
        verdict = blame(o, faults, revoked)
        blamed[verdict] += 1
        if verdict == UNEXPLAINED:
            unexplained.append(o)
    per_transport = Counter(o.transport for o in outcomes)
    return {
        "sent": len(outcomes),
        "ok": len(outcomes) - len(failed),
        "failed": len(failed),
        "latency_ms": latency_ms([o for o in outcomes if o.ok]),
        "by_transport": {t: {"sent": n, "failed": sum(1 for o in failed if o.transport == t)}
                         for t, n in sorted(per_transport.items())},
        "failed_by_cause": dict(Counter(o.cause for o in failed).most_common()),
        "failed_by_blame": dict(blamed.most_common()),
        "unexplained": len(unexplained),
        "unexplained_samples": [asdict(o) for o in unexplained[:20]],
        "faults": [fault_row(f, outcomes, failed, revoked) for f in faults],
    }


def latency_ms(outcomes: list[Outcome]) -> dict:
    """p50 / p99 / max of the requests' latency, in ms (empty: zeros)."""
    lat = sorted(o.end - o.start for o in outcomes)
    if not lat:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0}

    def q(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1e3, 2)

    return {"p50": q(0.5), "p99": q(0.99), "max": round(lat[-1] * 1e3, 2)}


def fault_row(f: Fault, outcomes: list[Outcome], failed: list[Outcome], revoked: dict[str, float]) -> dict:
    """One fault's line: the requests in flight on its path when it struck
    and the failures among them (blamed on it), every failure (any
    path, any blame) while it lasted (from ``at`` to its recovery, at least
    1 s), when its path answered well again and when it was whole again."""
    label = f"fault: {f.kind} @{f.at:.1f}s"
    end = f.at + max(1.0, f.recovered or 0.0)
    return {
        "kind": f.kind, "at_s": round(f.at, 2), "target": f.target, "detail": f.detail,
        "path": ({"transports": list(f.transports) or "all", "models": list(f.models) or "all"}
                 if f.load_path else "none of the load's"),
        "in_flight": sum(1 for o in outcomes if f.touches(o)),
        "failed_in_flight": sum(1 for o in failed if blame(o, [f], revoked) == label),
        "failed_meanwhile": sum(1 for o in failed if o.start <= end and o.end >= f.at),
        "first_success_after_s": _round(first_success_after(outcomes, f)),
        "recovered_after_s": _round(f.recovered),
    }


def revocation(outcomes: list[Outcome], key: str, revoked_at: float, new_key: str = "") -> dict:
    """A key's revocation seen from the load: ``lag_s``, seconds to the
    first refusal of a request carrying it (how long the servers took to see
    it; None: never refused); ``refused``, how many were; and
    ``new_key_ok_s``, seconds to the first good answer to its successor."""
    refused = [o.end for o in outcomes if o.key == key and o.end >= revoked_at and is_unauthenticated(o.cause)]
    ok_new = [o.end for o in outcomes if new_key and o.key == new_key and o.ok]
    return {"lag_s": _round(min(refused) - revoked_at) if refused else None, "refused": len(refused),
            "new_key_ok_s": _round(min(ok_new) - revoked_at) if ok_new else None}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


# -- processes -----------------------------------------------------------------

def rss_kib(status_text: str) -> int:
    """VmRSS (KiB) from the text of /proc/<pid>/status; 0 if absent (a zombie)."""
    for line in status_text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def settled(rounds: list[list[dict]]) -> list[dict]:
    """One sample per process from several taken a few seconds apart: the
    least RSS and open files each showed. Pools (HAProxy's connections to
    its replica, keep-alive sockets) swell for a moment when the load bunches
    up and give back within seconds, a leak never does: the least of a few
    samples tells one from the other. Processes are those of the last round."""
    if not rounds:
        return []
    out = []
    for last in rounds[-1]:
        seen = [s for r in rounds for s in r if s["pid"] == last["pid"]]
        out.append({**last, **{k: min(s[k] for s in seen) for k in _COUNTS}})
    return out


_COUNTS = ("rss_kib", "fds", "sockets", "other_fds")


def growth(before: list[dict], after: list[dict]) -> list[dict]:
    """Per process (samples: ``{"role", "pid", "rss_kib", "fds", "sockets",
    "other_fds"}``: the open descriptors, the live connections among them,
    and the rest): each count at both ends and its growth in %.
    A process in only one sample is listed as ``gone`` (killed or replaced)
    or ``new`` (a replacement, started after the warm-up: not judged)."""
    old = {s["pid"]: s for s in before}
    new = {s["pid"]: s for s in after}
    rows = []
    for pid in sorted(old.keys() | new.keys(), key=lambda p: ((old.get(p) or new[p])["role"], p)):
        a, b = old.get(pid), new.get(pid)
        row = {"role": (a or b)["role"], "pid": pid, "state": "both" if a and b else "gone" if a else "new"}
        for k in _COUNTS:
            name = k.removesuffix("_kib") if k == "rss_kib" else k
            row[f"{k}_start"] = a[k] if a else None
            row[f"{k}_end"] = b[k] if b else None
            if a and b:
                row[f"{name}_growth_pct"] = _pct(row[f"{k}_start"], row[f"{k}_end"])
        rows.append(row)
    return rows


def rss_trend(points: list[dict], pid: int, since: float) -> float | None:
    """How fast ``pid``'s RSS grew (KiB per minute, least squares) over its
    timeline samples (``{"t", "pid", "rss_kib"}``) from ``since`` on; None
    with fewer than 3. Tells a pool that filled once from a steady climb,
    which two end samples cannot."""
    pts = [(p["t"], p["rss_kib"]) for p in points if p["pid"] == pid and p["t"] >= since]
    if len(pts) < 3 or len({t for t, _ in pts}) < 2:
        return None
    t, rss = np.array(pts, dtype=float).T
    return round(float(np.polyfit(t / 60.0, rss, 1)[0]), 1)


def with_trends(rows: list[dict], points: list[dict], since: float) -> list[dict]:
    """``rows`` (from growth) with each surviving process's ``rss_kib_per_min``."""
    return [{**r, "rss_kib_per_min": rss_trend(points, r["pid"], since)} if r["state"] == "both" else r
            for r in rows]


def _pct(a: int, b: int) -> float:
    return round(100.0 * (b - a) / a, 2) if a else (0.0 if b == 0 else float("inf"))


def over_growth(rows: list[dict], limit_pct: float = MAX_GROWTH_PCT) -> list[dict]:
    """The processes that lived through the run and grew by more than
    ``limit_pct``: in RSS, or in open files other than live connections by
    more than FD_SLACK too."""
    return [r for r in rows if r["state"] == "both"
            and (r["rss_growth_pct"] > limit_pct
                 or (r["other_fds_growth_pct"] > limit_pct and r["other_fds_end"] - r["other_fds_start"] > FD_SLACK))]


def verdict(summary: dict, rows: list[dict]) -> list[str]:
    """Why the run missed its target ([] = met): unexplained failures, or a
    process that grew beyond MAX_GROWTH_PCT."""
    why = []
    if summary["unexplained"]:
        why.append(f"{summary['unexplained']} unexplained failed request(s)")
    for r in over_growth(rows):
        why.append(f"{r['role']} pid {r['pid']} grew RSS {r['rss_growth_pct']:+.1f} %, "
                   f"open files other than live connections {r['other_fds_growth_pct']:+.1f} %")
    return why


# -- the printed table -------------------------------------------------------------

def table(summary: dict, rows: list[dict], revocations: list[dict]) -> str:
    """The report as text, for the terminal."""
    lat = summary["latency_ms"]
    out = [f"requests: sent {summary['sent']}, ok {summary['ok']}, failed {summary['failed']} "
           f"(unexplained {summary['unexplained']}); answered in p50 {lat['p50']} ms, p99 {lat['p99']} ms, "
           f"max {lat['max']} ms"]
    for t, c in summary["by_transport"].items():
        out.append(f"  {t:<12} sent {c['sent']:>7}  failed {c['failed']:>5}")
    if summary["failed_by_cause"]:
        out.append("failed by cause:")
        out += [f"  {n:>6}  {cause}" for cause, n in summary["failed_by_cause"].items()]
        out.append("failed by blame:")
        out += [f"  {n:>6}  {b}" for b, n in summary["failed_by_blame"].items()]
    out.append("")
    out.append(f"{'fault':<24}{'at s':>7}{'in flight':>11}{'blamed':>8}{'failed meanwhile':>18}"
               f"{'path ok after s':>17}{'whole after s':>15}  target")
    for f in summary["faults"]:
        in_flight = f["in_flight"] if f["path"] != "none of the load's" else "-"
        out.append(f"{f['kind']:<24}{f['at_s']:>7.1f}{in_flight:>11}{f['failed_in_flight']:>8}"
                   f"{f['failed_meanwhile']:>18}{_s(f['first_success_after_s']):>17}{_s(f['recovered_after_s']):>15}  "
                   f"{f['target']} {f['detail']}".rstrip())
    for r in revocations:
        out.append(f"key {r['key']} revoked @{r['at_s']:.1f}s: refused after {_s(r['lag_s'])} s, "
                   f"{r['refused']} request(s) refused (expected); its successor answered after "
                   f"{_s(r['new_key_ok_s'])} s")
    out.append("")
    out.append("open files: all descriptors / live connections among them / the rest (judged)")
    out.append(f"{'process':<14}{'pid':>8}{'state':>7}{'RSS MiB start':>15}{'end':>8}{'growth':>9}{'KiB/min':>9}"
               f"{'files start':>13}{'end':>13}{'rest growth':>13}")
    for r in rows:
        out.append(f"{r['role']:<14}{r['pid']:>8}{r['state']:>7}{_mib(r['rss_kib_start']):>15}"
                   f"{_mib(r['rss_kib_end']):>8}{_pctx(r.get('rss_growth_pct')):>9}{_s(r.get('rss_kib_per_min')):>9}"
                   f"{_files(r, 'start'):>13}{_files(r, 'end'):>13}{_pctx(r.get('other_fds_growth_pct')):>13}")
    return "\n".join(out)


def _s(x) -> str:
    return "-" if x is None else f"{x}"


def _files(r: dict, end: str) -> str:
    if r[f"fds_{end}"] is None:
        return "-"
    return f"{r[f'fds_{end}']}/{r[f'sockets_{end}']}/{r[f'other_fds_{end}']}"


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}"


def _pctx(p: float | None) -> str:
    return "-" if p is None else f"{p:+.1f}%"
