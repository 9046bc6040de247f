"""Report files and run comparison, from synthetic results."""

import json

import matplotlib.image
import pytest
from _factories import _cfg, _reply

from flywheel.bench.harness import compare, compare_text, read_report, write_report
from flywheel.bench.harness.pool import judge, merge_replies
from flywheel.bench.harness.runner import Report
from flywheel.bench.harness.scenario import SLO, parse_scenario
from flywheel.protocol.errors import ConfigError



def _report(name, scale):
    sc = parse_scenario({"model": "m", "name": name})
    steps = [
        judge(merge_replies("users", u, u, None, [_reply([0.001 * u * scale] * (200 * u))]), SLO(p99_ms=5))
        for u in (1, 2, 4, 8)
    ]
    import msgspec

    return Report(name=name, mode="load", started_at="2026-11-27T00:00:00+00:00", host={"cpus": 2},
                  scenario=msgspec.to_builtins(sc), steps=steps)


def test_write_report_produces_readable_json_markdown_and_pngs(tmp_path):
    rep = _report("a", 1.0)
    paths = write_report(rep, tmp_path / "out")
    back = read_report(paths["json"])
    assert [s.level for s in back.steps] == [1, 2, 4, 8]
    assert json.loads(paths["json"].read_text())["steps"][0]["p99_ms"] == pytest.approx(1.0, rel=1e-3)
    md = paths["markdown"].read_text()
    assert "| 8 users |" in md
    assert "broken: p99 8.00 ms > 5 ms" in md
    for key in ("latency_png", "throughput_png"):
        img = matplotlib.image.imread(paths[key])
        assert img.shape[0] > 100
        assert img.shape[1] > 100


def test_config_search_report_has_a_comparison_plot(tmp_path):
    rep = _report("s", 1.0)
    import msgspec

    rep = msgspec.structs.replace(rep, mode="config_search", steps=[],
                                  configs=[_cfg("batch=1", 900, 0.5), _cfg("batch=64", 2500, 0.5)],
                                  recommended="batch=64")
    paths = write_report(rep, tmp_path)
    assert "configs_png" in paths
    assert matplotlib.image.imread(paths["configs_png"]).ndim == 3
    assert "| batch=64 | 0.5 | 2500.0 | 5000.0 |" in paths["markdown"].read_text()


def test_compare_prints_ratios_of_matching_steps(tmp_path):
    a, b = _report("a", 1.0), _report("b", 0.5)
    result = compare(a, b)
    assert [r["level"] for r in result["steps"]] == [1, 2, 4, 8]
    assert all(r["p50"] == pytest.approx(0.5, rel=2e-3) for r in result["steps"])
    assert "| 4 users |" in compare_text(result)


def test_read_report_refuses_other_files(tmp_path):
    (tmp_path / "x.json").write_text('{"hello": 1}')
    with pytest.raises(ConfigError, match="not a Flywheel bench report"):
        read_report(tmp_path / "x.json")
