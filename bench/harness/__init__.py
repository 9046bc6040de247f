"""Benchmark harness for capacity planning (``flywheel bench``).

locust drives any V2 server (Flywheel first) over HTTP JSON, HTTP binary and
gRPC from separate load-generator processes; a scenario YAML says what and
how hard. Modes: a load plan, an SLO (capacity) search, and a config search
that deploys a grid of server settings and recommends one.

    from flywheel.bench.harness import load_scenario, run_scenario, write_report
    report = run_scenario(load_scenario("configs/bench-demo.yaml"), progress=print)
    write_report(report, "bench/results/demo-capacity")
"""

from flywheel.bench.harness.histogram import LatencyHistogram
from flywheel.bench.harness.pool import StepResult
from flywheel.bench.harness.report import compare, compare_text, read_report, write_report
from flywheel.bench.harness.runner import CapacityResult, ConfigResult, Report, replicas_needed, run_scenario
from flywheel.bench.harness.scenario import Scenario, load_scenario, parse_scenario

__all__ = [
    "CapacityResult",
    "ConfigResult",
    "LatencyHistogram",
    "Report",
    "Scenario",
    "StepResult",
    "compare",
    "compare_text",
    "load_scenario",
    "parse_scenario",
    "read_report",
    "replicas_needed",
    "run_scenario",
    "write_report",
]
