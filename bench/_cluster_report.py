"""The cluster benchmark's figures: from what was measured (blocks,
timestamps, samples) to the numbers, the printed table and the plot.

Pure logic but for ``plot``: it starts nothing, measures nothing and reads
no clock, so that the unit tests can check it on made-up data.
"""

from __future__ import annotations

import csv
import io

import numpy as np

from flywheel.bench import interleave as il

DIRECT = "1 node, direct"
HEAD_LB = "1 node, balancer"
BOTH_LB = "2 nodes, balancer"
SETUPS = (DIRECT, HEAD_LB, BOTH_LB)
# the paired comparisons, (A, B): B is always the two nodes
COMPARISONS = ((DIRECT, BOTH_LB), (HEAD_LB, BOTH_LB))

SHARED_CORES = ("both namespaces (\"nodes\") run on this machine's 2 cores, with the load generator and HAProxy: "
                "a second node adds no CPU, so this is no speed-up figure. One node is the head's one ingress "
                "replica (replicas_per_node: 1), two nodes are two replicas: a ratio above 1 is the second replica "
                "process using the second core (one node with two replicas gets that too), a ratio below 1 the "
                "overhead of spreading over two nodes")


# -- throughput -----------------------------------------------------------------

def block_records(blocks: list[il.Block], a: str, b: str) -> list[dict]:
    """The JSON record of each A B B A block (``Block.result``: a load
    summary dict with ``throughput_rps``), named by its setup."""
    names = {il.A: a, il.B: b}
    return [{"index": blk.index, "round": blk.round, "side": blk.side, "setup": names[blk.side],
             **(blk.result if blk.ok else {"error": blk.error})} for blk in blocks]


def compare(a: str, b: str, records: list[dict]) -> dict:
    """B against A from their blocks' records (``block_records``): the
    pairs of neighbours in time, B's throughput over A's per pair (median
    and range) and the pairs left out, with why."""
    blocks = [il.Block(r["index"], r["side"], None if "error" in r else r, r.get("error", "")) for r in records]
    pairs, excluded = il.neighbour_pairs(blocks)
    stats = il.RatioStats.of(il.paired_ratios(pairs, lambda r: r["throughput_rps"]))
    return {"a": a, "b": b, "blocks": records, "pairs": len(pairs), "excluded": excluded,
            "b_over_a": stats.as_dict() if stats else None}


def setup_stats(comparisons: list[dict]) -> dict[str, dict]:
    """Per setup, over all its good blocks in every comparison: the median
    throughput and its range, the median p50 and p99, and the block count."""
    by_setup: dict[str, list[dict]] = {}
    for comp in comparisons:
        for r in comp["blocks"]:
            if "error" not in r:
                by_setup.setdefault(r["setup"], []).append(r)
    out = {}
    for setup in [s for s in SETUPS if s in by_setup] + [s for s in by_setup if s not in SETUPS]:
        rows = by_setup[setup]
        rps = [r["throughput_rps"] for r in rows]
        out[setup] = {"median_rps": float(np.median(rps)), "min_rps": float(min(rps)), "max_rps": float(max(rps)),
                      "p50_ms": float(np.median([r["p50_ms"] for r in rows])),
                      "p99_ms": float(np.median([r["p99_ms"] for r in rows])), "blocks": len(rows)}
    return out


# -- failover ------------------------------------------------------------------------

def failover_figures(kill: float, events: dict[str, float | None], ok_times: list[float],
                     failed_times: list[float]) -> dict:
    """Seconds from the kill (``kill``, a time.monotonic()) to each of
    ``events`` (absolute times; None: never seen), the failed requests
    counted by phase (before the kill; from the kill until the balancer took
    the node out; after that, until the node was restarted; and from the
    restart on), the last failure, and how many requests were answered in the
    second after the kill."""
    def rel(t: float | None) -> float | None:
        return None if t is None else round(t - kill, 3)

    lb_down = events.get("lb_down")
    restart = events.get("restart")
    phases = {"before kill": 0, "kill to balancer out": 0, "balancer out to restart": 0, "restart on": 0}
    for t in failed_times:
        if t < kill:
            phases["before kill"] += 1
        elif lb_down is None or t <= lb_down:
            phases["kill to balancer out"] += 1
        elif restart is None or t < restart:
            phases["balancer out to restart"] += 1
        else:
            phases["restart on"] += 1
    after = [t for t in failed_times if t >= kill]
    return {
        "after_kill_s": {name: rel(t) for name, t in events.items()},
        "failed": len(failed_times),
        "failed_by_phase": phases,
        "last_failure_after_kill_s": rel(max(after)) if after else None,
        "answered_first_second_after_kill": sum(1 for t in ok_times if kill <= t < kill + 1.0),
    }


def watch_events(samples: list[dict], kill: float, restart: float | None, worker_ip: str) -> dict[str, float | None]:
    """When the head saw the kill and the restart, from the watcher's
    samples (``{"t", "running", "nodes": [[id, ip, alive], ...]}``):
    ``gcs_dead`` (the GCS marks the killed node dead), ``serve_1_running``
    (Serve counts one ingress replica), and after ``restart``:
    ``node_joined`` (a new node alive at ``worker_ip``) and
    ``serve_2_running``; None where not seen."""
    before = [s for s in samples if s["t"] < kill and "nodes" in s]
    old = {n[0] for n in (before[-1]["nodes"] if before else []) if n[1] == worker_ip and n[2]}

    def first(pred, after: float | None) -> float | None:
        if after is None:
            return None
        return next((s["t"] for s in samples if s["t"] >= after and "nodes" in s and pred(s)), None)

    gone = first(lambda s: not any(n[0] in old and n[2] for n in s["nodes"]), kill) if old else None
    one = first(lambda s: s["running"] <= 1, kill)
    joined = first(lambda s: any(n[1] == worker_ip and n[2] and n[0] not in old for n in s["nodes"]), restart)
    two = first(lambda s: s["running"] >= 2, max(restart, one) if restart is not None and one is not None else restart)
    return {"gcs_dead": gone, "serve_1_running": one, "node_joined": joined, "serve_2_running": two}


def since(start: float | None, end: float | None) -> float | None:
    """``end - start`` rounded to ms, None when either is unknown."""
    return None if start is None or end is None else round(end - start, 3)


# -- autoscaling -------------------------------------------------------------------------

def autoscale_figures(samples: list[dict], step: float, stop: float) -> dict:
    """From the watcher's samples (``{"t", "running", "answered": {pid: n}}``,
    time order): seconds from the load step (``step``) until Serve ran 2
    replicas and until two replicas had answered requests, and from the end
    of the load (``stop``) until it ran 1 again; None where not seen."""
    def first(pred, after: float) -> float | None:
        return next((s["t"] for s in samples if s["t"] >= after and pred(s)), None)

    up = first(lambda s: s["running"] >= 2, step)
    answering = first(lambda s: sum(1 for n in s["answered"].values() if n > 0) >= 2, step)
    down = first(lambda s: s["running"] <= 1, max(stop, up or stop))
    peak = max((s["running"] for s in samples if s["t"] >= step), default=0)
    return {"to_2_replicas_s": since(step, up), "second_answers_s": since(step, answering),
            "back_to_1_s": since(stop, down), "most_replicas": peak}


# -- HAProxy's stats page ------------------------------------------------------------------

def server_states(stats_csv: str, backend: str) -> dict[str, str]:
    """server name -> status ("UP", "DOWN", "UP 1/2", ...) of ``backend``,
    from HAProxy's ``stats uri;csv`` page."""
    text = stats_csv.lstrip("# ")
    return {row["svname"]: row["status"] for row in csv.DictReader(io.StringIO(text))
            if row.get("pxname") == backend and row.get("svname") not in ("FRONTEND", "BACKEND")}


# -- the report ------------------------------------------------------------------------------

def fmt_s(value: float | None) -> str:
    """Seconds as the report prints them ("not seen" for None)."""
    return "not seen" if value is None else f"{value:.2f} s"


def report_lines(result: dict) -> list[str]:
    """The printed report of ``result`` (what cluster.json holds)."""
    lines = [f"load generator: {result['load_generator']}; machine: {result['cores']} cores, which the load "
             "generator, HAProxy and both nodes share"]
    tp = result.get("throughput")
    if tp:
        lines += ["", f"throughput at c={tp['clients']} (HTTP JSON, keep-alive, digits MLP, 1 row per request; "
                      f"{tp['rounds']} A B B A rounds of {tp['block_s']:g} s blocks)",
                  f"  {'setup':<22}{'req/s median':>14}  {'[min-max]':<17}{'p50 ms':>8}{'p99 ms':>8}{'blocks':>8}"]
        for setup, st in tp["setups"].items():
            lines.append(f"  {setup:<22}{st['median_rps']:>14.0f}  "
                         f"{'[%.0f-%.0f]' % (st['min_rps'], st['max_rps']):<17}"
                         f"{st['p50_ms']:>8.2f}{st['p99_ms']:>8.2f}{st['blocks']:>8}")
        for comp in tp["comparisons"]:
            r = comp["b_over_a"]
            ratio = f"x{r['median']:.2f} [{r['min']:.2f}-{r['max']:.2f}], {r['pairs']} pairs" if r else "no good pair"
            lines.append(f"  paired: {comp['b']} / {comp['a']}: {ratio}")
            lines += [f"    {note}" for note in comp["excluded"]]
        lines.append(f"  note: {SHARED_CORES}")
    fo = result.get("failover")
    if fo:
        after, rs = fo["after_kill_s"], fo["after_restart_s"]
        last = fo["last_failure_after_kill_s"]
        lines += ["", f"failover (worker node SIGKILLed, raylet and every process of its host, under {fo['clients']} keep-alive clients through "
                      f"the balancer; health checks every {fo['check_interval_ms']} ms, fall {fo['fall']}, "
                      f"rise {fo['rise']})",
                  f"  requests failed: {fo['failed']} of {fo['answered'] + fo['failed']} "
                  f"({', '.join(f'{k} {v}' for k, v in fo['failed_by_phase'].items())})",
                  "  after the kill:",
                  f"    worker's ingress stopped answering: {fmt_s(after.get('worker_gone'))}",
                  f"    balancer took the worker out:       {fmt_s(after.get('lb_down'))}; last failed request: "
                  f"{'none' if last is None else fmt_s(last)}",
                  f"    Serve counted 1 ingress replica:    {fmt_s(after.get('serve_1_running'))}",
                  f"    GCS marked the node dead:           {fmt_s(after.get('gcs_dead'))}",
                  f"    answered in the first second: {fo['answered_first_second_after_kill']}",
                  f"  node restarted {fmt_s(after.get('restart'))} after the kill (a new node at the same address, "
                  "once the GCS had given the old one up); after the restart:",
                  f"    new node alive in the GCS:          {fmt_s(rs.get('node_joined'))}",
                  f"    Serve runs 2 ingress replicas:      {fmt_s(rs.get('serve_2_running'))}",
                  f"    worker's address serves again:      {fmt_s(rs.get('worker_serves'))}",
                  f"    balancer sends to it again:         {fmt_s(rs.get('lb_up'))}"]
    au = result.get("autoscale")
    if au:
        cfg = au["autoscaling"]
        lines += ["", f"autoscaling (on the two-node cluster, through the balancer; {au['model']}; "
                      f"target_in_flight {cfg['target_in_flight']}, upscale_delay_s {cfg['upscale_delay_s']:g}, "
                      f"downscale_delay_s {cfg['downscale_delay_s']:g}, look_back_s {cfg['look_back_s']:g})",
                  f"  load step 1 -> {au['clients']} clients: 2 replicas after {fmt_s(au['to_2_replicas_s'])}; "
                  f"both answering after {fmt_s(au['second_answers_s'])}",
                  f"  load back to 1 client: 1 replica after {fmt_s(au['back_to_1_s'])}",
                  f"  most replicas {au['most_replicas']}; requests failed: {au['failed']} of "
                  f"{au['answered'] + au['failed']}; nodes serving at the peak: "
                  f"{', '.join(au['nodes_at_peak']) or '-'}",
                  "  (each figure includes the configured delay and look-back, and the watcher's 0.5 s poll)"]
    return lines


# -- the plot -----------------------------------------------------------------------------------

def rate(times: list[float], start: float, end: float, bin_s: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Events per second in bins of ``bin_s`` from ``start`` to ``end``:
    (bin starts relative to ``start``, rates)."""
    edges = np.arange(start, end + bin_s, bin_s)
    if len(edges) < 2:
        return np.zeros(0), np.zeros(0)
    counts, _ = np.histogram(np.asarray(times, dtype=float), bins=edges)
    return edges[:-1] - start, counts / bin_s


def plot(result: dict, series: dict, path: str) -> None:
    """One panel per part that ran: throughput per setup (median, range),
    the failover timeline and the autoscaling timeline. ``series`` holds
    the timelines (rates and replica counts) that cluster.json leaves out.
    ImportError without matplotlib (the bench extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in ("throughput", "failover", "autoscale") if result.get(p)]
    fig, axes = plt.subplots(len(parts), 1, figsize=(11, 3.6 * len(parts)), squeeze=False)
    for ax, part in zip(axes[:, 0], parts):
        if part == "throughput":
            st = result["throughput"]["setups"]
            names = list(st)
            med = np.array([st[n]["median_rps"] for n in names])
            err = np.array([[med[i] - st[n]["min_rps"], st[n]["max_rps"] - med[i]] for i, n in enumerate(names)]).T
            ax.bar(names, med, yerr=err, capsize=6, color=["#4c72b0", "#8172b2", "#55a868"][: len(names)])
            ax.set_ylabel(f"req/s at c={result['throughput']['clients']}")
            ax.set_title("throughput (median, min-max over blocks); both namespaces share the 2 cores: "
                         "no speed-up figure", fontsize=10)
            ax.grid(axis="y", alpha=0.3)
        elif part == "failover":
            s = series["failover"]
            ax.plot(s["t"], s["answered"], label="answered / s")
            ax.plot(s["t"], s["failed"], "r", label="failed / s")
            fo = result["failover"]
            marks = dict(fo["after_kill_s"])
            restart = marks.get("restart")
            if restart is not None:  # the rejoin's events, on the same clock as the kill's
                marks.update({k: restart + v for k, v in fo.get("after_restart_s", {}).items() if v is not None})
            for name, t in marks.items():
                if t is not None:
                    ax.axvline(t, color="grey", ls="--", lw=0.8)
                    ax.annotate(name, (t, ax.get_ylim()[1] if ax.get_ylim()[1] > 1 else 1), rotation=90,
                                fontsize=7, va="top", ha="right")
            ax.set_xlabel("seconds after the worker node was killed")
            ax.set_ylabel("requests / s")
            ax.set_title("failover through the balancer", fontsize=10)
            ax.legend(loc="lower right", fontsize=8)
        else:
            s = series["autoscale"]
            ax.plot(s["t"], s["answered"], label="answered / s")
            ax.set_xlabel("seconds after the load step (1 -> 32 clients)")
            ax.set_ylabel("requests / s")
            twin = ax.twinx()
            twin.step(s["replica_t"], s["replicas"], "g", where="post", label="running replicas")
            twin.set_ylabel("replicas")
            twin.set_ylim(0, max(s["replicas"] or [1]) + 1)
            ax.axvline(0, color="grey", ls="--", lw=0.8)
            ax.axvline(s["stop"], color="grey", ls="--", lw=0.8)
            ax.set_title("autoscaling reaction (load step at 0, back to 1 client at the second line)", fontsize=10)
            ax.legend(loc="upper left", fontsize=8)
            twin.legend(loc="upper right", fontsize=8)
    fig.suptitle("Flywheel on a two-node Ray cluster (network namespaces on one 2-core machine)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
