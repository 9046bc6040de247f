"""Reports: JSON (machine-readable), Markdown, PNG plots; and run comparison."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec

from flywheel.bench.harness.runner import Report
from flywheel.protocol.errors import ConfigError


def _f(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def step_table(steps) -> list[str]:
    lines = [
        "| load | req/s | achieved | p50 ms | p90 ms | p99 ms | max ms | errors | client cpu | host cpu "
        "| limit | SLO |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in steps:
        level = f"{s.level:g} {'users' if s.by == 'users' else 'req/s'}"
        achieved = "-" if s.achieved is None else f"{s.achieved:.0%}"
        slo = "ok" if s.slo_ok else "broken: " + "; ".join(s.slo_failures)
        lines.append(
            f"| {level} | {s.throughput_rps:.1f} | {achieved} | {_f(s.p50_ms)} | {_f(s.p90_ms)} | {_f(s.p99_ms)} "
            f"| {_f(s.max_ms)} | {s.errors} ({s.error_rate:.2%}) | {max(s.client_cpu):.0%} | {s.host_cpu:.0%} "
            f"| {s.limited_by} | {slo} |"
        )
    return lines


def capacity_lines(cap) -> list[str]:
    if cap is None:
        return []
    knee = "none (the first step broke the SLO)" if cap.knee_level is None else f"{cap.knee_level:g}"
    lines = [
        f"- knee ({cap.by}): {knee}; broke at {cap.broke_at_level if cap.broke_at_level is not None else 'never'}"
        + (f" because {'; '.join(cap.broke_because)}" if cap.broke_because else ""),
        f"- sustainable throughput under the SLO: {cap.sustainable_rps:.1f} req/s with {cap.replicas} "
        f"replica(s) = {cap.per_replica_rps:.1f} req/s per replica (limited by: {cap.knee_limited_by})",
    ]
    if cap.replicas_needed is not None:
        lines.append(
            f"- replicas needed for {cap.target_rps:g} req/s with {cap.headroom:.0%} headroom: {cap.replicas_needed}"
        )
    return lines


def client_line(report: Report) -> str:
    """Which client ran and whether it was the limit (see pool.merge_replies)."""
    steps = report.steps + [s for c in report.configs for s in c.steps]
    bound = sum(s.limited_by == "client" for s in steps)
    name = {"h2load": "h2load (C, nghttp2)", "locust": "locust (Python)"}.get(report.client, report.client)
    if not steps:
        return name
    if not bound:
        return f"{name}; not the limit in any of {len(steps)} steps"
    return f"{name}; client-bound in {bound} of {len(steps)} steps: those figures are a lower bound"


def markdown(report: Report) -> str:
    sc = report.scenario
    out = [
        f"# Benchmark `{report.name}` ({report.mode})",
        "",
        f"Started {report.started_at} on {report.host.get('cpus')} CPUs ({report.host.get('machine')}); "
        f"model `{sc['model']}` at {sc['target']['http']}; mix {sc['mix']}; "
        f"{sc['duration_s']:g} s per step after {sc['warmup_s']:g} s warm-up; "
        f"SLO p99 <= {sc['slo']['p99_ms']:g} ms, error rate <= {sc['slo']['max_error_rate']:g}.",
        "",
        f"Load generator: {client_line(report)}.",
        "",
    ]
    if report.steps:
        out += step_table(report.steps) + [""]
    if report.capacity is not None:
        out += ["## Capacity", ""] + capacity_lines(report.capacity) + [""]
    if report.configs:
        out += ["## Config search", "",
                "| config | CPUs | sustainable req/s | per CPU | knee | p99 at knee ms | result |",
                "|---|---|---|---|---|---|---|"]
        for c in report.configs:
            cap = c.capacity
            if cap is None:
                out.append(f"| {c.label} | {c.cpus:g} | - | - | - | - | {c.error} |")
                continue
            knee = next((s for s in c.steps if s.level == cap.knee_level), None)
            mark = "**recommended**" if c.label == report.recommended else ""
            per_cpu = cap.sustainable_rps / max(c.cpus, 1e-9)
            knee_level = "-" if cap.knee_level is None else f"{cap.knee_level:g}"
            out.append(
                f"| {c.label} | {c.cpus:g} | {cap.sustainable_rps:.1f} | {per_cpu:.1f} "
                f"| {knee_level} | {_f(knee.p99_ms if knee else None)} | {mark} |"
            )
        out += ["", f"Recommended: {report.recommended or 'none (no config met the SLO)'}", ""]
    errors: dict[str, int] = {}
    for s in report.steps + [s for c in report.configs for s in c.steps]:
        for msg, n in s.error_counts.items():
            errors[msg] = errors.get(msg, 0) + n
    if errors:
        out += ["## Errors (sampled by message)", ""] + [f"- {n} x `{m}`" for m, n in errors.items()] + [""]
    if report.notes:
        out += ["## Notes", ""] + [f"- {n}" for n in report.notes] + [""]
    return "\n".join(out)


def _plot_steps(steps, title: str, slo_p99_ms: float, latency_png: Path, throughput_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [s.level for s in steps]
    xlabel = "offered load (req/s)" if steps and steps[0].by == "rate" else "concurrent users"
    fig, ax = plt.subplots(figsize=(7, 4))
    for q in ("p50_ms", "p90_ms", "p99_ms"):
        ax.plot(x, [getattr(s, q) for s in steps], marker="o", label=q.replace("_ms", ""))
    ax.axhline(slo_p99_ms, color="red", ls="--", lw=1, label="SLO p99")
    for s in steps:
        if not s.slo_ok:
            ax.axvline(s.level, color="red", ls=":", lw=1)
    ax.set(xlabel=xlabel, ylabel="latency (ms)", title=f"{title}: latency percentiles", yscale="log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(latency_png, dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(x, [s.throughput_rps for s in steps], marker="o", label="achieved req/s")
    if steps and steps[0].by == "rate":
        ax.plot(x, x, ls="--", color="grey", label="offered")
    ax.set(xlabel=xlabel, ylabel="requests/s", title=f"{title}: throughput")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(throughput_png, dpi=110)
    plt.close(fig)


def _plot_configs(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [c.label for c in report.configs]
    values = [c.capacity.sustainable_rps if c.capacity else 0.0 for c in report.configs]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(labels) + 1.5))
    colors = ["tab:green" if lab == report.recommended else "tab:blue" for lab in labels]
    ax.barh(range(len(labels)), values, color=colors)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="sustainable req/s under the SLO", title=f"{report.name}: config search (green = recommended)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: Report, out_dir: str | Path) -> dict[str, Path]:
    """Write report.json, report.md and the PNG plots; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md"}
    paths["json"].write_bytes(msgspec.json.format(msgspec.json.encode(report), indent=2))
    paths["markdown"].write_text(markdown(report))
    if report.steps:
        paths["latency_png"], paths["throughput_png"] = out / "latency.png", out / "throughput.png"
        _plot_steps(report.steps, report.name, report.scenario["slo"]["p99_ms"],
                    paths["latency_png"], paths["throughput_png"])
    if report.configs:
        paths["configs_png"] = out / "configs.png"
        _plot_configs(report, paths["configs_png"])
    return paths


def read_report(path: str | Path) -> Report:
    try:
        return msgspec.json.decode(Path(path).read_bytes(), type=Report)
    except OSError as exc:
        raise ConfigError(f"cannot read report {path}: {exc}") from None
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path} is not a Flywheel bench report: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{path} is not JSON: {exc}") from None


def _ratio(b, a) -> float | None:
    if a is None or b is None or a == 0:
        return None
    return round(b / a, 3)


def compare(a: Report, b: Report) -> dict:
    """Ratios B / A per matching step (same load level) and for capacity."""
    a_steps = {(s.by, s.level): s for s in a.steps}
    rows = []
    for s in b.steps:
        base = a_steps.get((s.by, s.level))
        if base is None:
            continue
        rows.append({
            "by": s.by, "level": s.level,
            "throughput": _ratio(s.throughput_rps, base.throughput_rps),
            "p50": _ratio(s.p50_ms, base.p50_ms),
            "p99": _ratio(s.p99_ms, base.p99_ms),
            "errors": (base.errors, s.errors),
        })
    out: dict = {"a": a.name, "b": b.name, "steps": rows}
    if a.capacity and b.capacity:
        out["sustainable_rps"] = _ratio(b.capacity.sustainable_rps, a.capacity.sustainable_rps)
        out["per_replica_rps"] = _ratio(b.capacity.per_replica_rps, a.capacity.per_replica_rps)
    return out


def compare_text(result: dict) -> str:
    lines = [f"B ({result['b']}) / A ({result['a']}); throughput > 1 and latency < 1 mean B is better", "",
             "| load | throughput | p50 | p99 | errors A -> B |", "|---|---|---|---|---|"]
    for r in result["steps"]:
        unit = "users" if r["by"] == "users" else "req/s"
        lines.append(f"| {r['level']:g} {unit} | {_f(r['throughput'], 3)} | {_f(r['p50'], 3)} | "
                     f"{_f(r['p99'], 3)} | {r['errors'][0]} -> {r['errors'][1]} |")
    if not result["steps"]:
        lines.append("| (no load level in common) | | | | |")
    if "sustainable_rps" in result:
        lines += ["", f"sustainable throughput: x{_f(result['sustainable_rps'], 3)}; "
                  f"per replica: x{_f(result['per_replica_rps'], 3)}"]
    return "\n".join(lines)


def compare_json(result: dict) -> str:
    return json.dumps(result, indent=2)
