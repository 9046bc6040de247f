"""The benchmark harness (locust in its own processes) against real Flywheel
servers on loopback: counts, checks, reports, the CLI, the SLO search on a
deliberately throttled model, and a config search that deploys on Ray."""

from __future__ import annotations

import json
import math
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from flywheel.bench import h2load
from flywheel.bench.harness import parse_scenario, read_report, run_scenario, write_report
from flywheel.bench.harness.payloads import build_plan
from flywheel.bench.harness.runner import run_against

from _poll import wait_for

pytestmark = pytest.mark.integration


def _served(url: str, model: str) -> int:
    """Requests the server counted for ``model``, every outcome."""
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    return int(sum(
        s.value for fam in text_string_to_metric_families(text) if fam.name == "flywheel_requests"
        for s in fam.samples if s.name == "flywheel_requests_total" and s.labels.get("model") == model
    ))


def _scenario(demo, **fields):
    base = {"model": "digits", "target": {"http": demo.url, "grpc": demo.grpc_target},
            "duration_s": 30, "warmup_s": 0}
    return parse_scenario({**base, **fields})


@pytest.mark.parametrize("protocol, processes", [("http_json", 1), ("http_binary", 1), ("grpc", 2)])
def test_every_request_sent_is_answered_and_counted_once(demo, protocol, processes):
    sc = _scenario(demo, mix={"http_json": 0, protocol: 1}, load={"levels": [3]},
                   max_requests=150, processes=processes)
    before = _served(demo.url, "digits")
    [step], _ = run_against(sc, build_plan(sc))
    assert (step.ok, step.errors) == (150, 0), step.error_counts
    assert step.elapsed_s < 30  # ended by the request bound, not the clock
    assert set(step.protocols) == {protocol}
    assert step.protocols[protocol].ok == 150
    assert len(step.client_cpu) == processes
    assert 0 < step.p50_ms <= step.p90_ms <= step.p95_ms <= step.p99_ms <= step.p999_ms <= step.max_ms
    wait_for(lambda: _served(demo.url, "digits") - before >= 150, 5, "the server to count 150 requests", every_s=0.1)
    assert _served(demo.url, "digits") - before == 150


def test_failed_checks_and_rejected_requests_are_counted_and_sampled(demo):
    wrong_shape = _scenario(demo, mix={"http_json": 1, "grpc": 1}, max_requests=40,
                            payload={"outputs": [{"name": "logits", "shape": [1, 11]}]})
    [step], _ = run_against(wrong_shape, build_plan(wrong_shape))
    assert (step.ok, step.errors) == (0, 40)
    assert step.error_rate == 1.0
    assert step.p50_ms is None
    assert all("has shape [1, 10], expected [1, 11]" in msg for msg in step.error_counts)
    bad_input = _scenario(demo, max_requests=20,
                          payload={"inputs": [{"name": "input", "shape": [1, 63]}]})
    [step], _ = run_against(bad_input, build_plan(bad_input))
    assert step.errors == 20
    [(msg, n)] = step.error_counts.items()
    assert n == 20
    assert msg.startswith("http_json: HTTP 400")
    assert "input" in msg
    # and the server still answers
    good = _scenario(demo, max_requests=10)
    [step], _ = run_against(good, build_plan(good))
    assert step.ok == 10


def test_cli_run_writes_reports_and_compare_prints_ratios(demo, tmp_path, capsys):
    from flywheel.cli import main

    (tmp_path / "s.yaml").write_text(
        "name: cli-run\nmodel: digits\nmix: {http_json: 1, http_binary: 1, grpc: 1}\n"
        "load: {by: users, levels: [1, 3]}\nduration_s: 1.5\nwarmup_s: 0.3\n"
    )
    out = tmp_path / "report"
    rc = main(["bench", "run", str(tmp_path / "s.yaml"), "--out", str(out),
               "--http", demo.url, "--grpc", demo.grpc_target])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "users 1:" in printed
    assert "users 3:" in printed
    assert "report.md" in printed
    report = read_report(out / "report.json")
    assert [s.level for s in report.steps] == [1, 3]
    for s in report.steps:
        assert s.ok > 0
        assert s.errors == 0
        assert set(s.protocols) == {"http_json", "http_binary", "grpc"}
        assert s.p50_ms <= s.p90_ms <= s.p99_ms <= s.max_ms
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "throughput.png").stat().st_size > 1000
    assert "| 3 users |" in (out / "report.md").read_text()
    assert main(["bench", "compare", str(out / "report.json"), str(out / "report.json"), "--json"]) == 0
    ratios = json.loads(capsys.readouterr().out)
    assert [r["throughput"] for r in ratios["steps"]] == [1.0, 1.0]


needs_h2load = pytest.mark.skipif(
    not h2load.available(), reason=f"h2load is not installed ({h2load.INSTALL_HINT})")


@needs_h2load
def test_h2load_drives_every_protocol_and_the_report_names_it(demo, tmp_path):
    sc = _scenario(demo, client="h2load", payload={"variants": 1}, duration_s=2, warmup_s=1,
                   mix={"http_json": 1, "http_binary": 1, "grpc": 1}, load={"levels": [3]})
    report = run_scenario(sc)
    assert report.client == "h2load"
    [step] = report.steps
    assert step.throughput_rps > 0
    assert step.errors == 0, step.error_counts
    assert set(step.protocols) == {"http_json", "http_binary", "grpc"}
    assert all(p.ok > 0 for p in step.protocols.values())
    assert len(step.client_cpu) == 3  # one h2load process per protocol
    assert "Load generator: h2load (C, nghttp2)" in write_report(report, tmp_path)["markdown"].read_text()


@needs_h2load
def test_h2load_steps_count_only_their_own_requests(demo):
    sc = _scenario(demo, client="h2load", payload={"variants": 1}, duration_s=1, warmup_s=0,
                   load={"levels": [2, 2]})
    plan = build_plan(sc)
    before = _served(demo.url, "digits")
    steps, _ = run_against(sc, plan)
    reported = sum(s.ok + s.errors for s in steps)
    assert reported > 0
    # every request h2load logged was served (the server may also have
    # answered some h2load stopped waiting for at the end of a step)
    wait_for(lambda: _served(demo.url, "digits") - before >= reported, 5,
             f"the server to count the {reported} requests the steps reported", every_s=0.1)


@needs_h2load
def test_h2load_counts_rejected_requests(demo):
    sc = _scenario(demo, client="h2load", payload={"variants": 1, "inputs": [{"name": "input", "shape": [1, 63]}]},
                   duration_s=1, warmup_s=0)
    [step], _ = run_against(sc, build_plan(sc))
    assert step.ok == 0
    assert step.errors > 0
    assert list(step.error_counts) == ["http_json: HTTP 400"]


def test_remote_targets_are_refused_without_opt_in(tmp_path, capsys):
    from flywheel.cli import main

    (tmp_path / "s.yaml").write_text("model: digits\n")
    assert main(["bench", "run", str(tmp_path / "s.yaml"), "--http", "http://192.0.2.1:8000"]) == 2
    assert "allow_remote" in capsys.readouterr().err


@pytest.fixture(scope="module")
def throttled(ray_session, tmp_path_factory):
    """A model that takes ~10 ms per request and runs one request at a time
    (256-row requests, batches of at most 256 rows, one replica): its
    capacity is about 1 / service time."""
    from flywheel.bench.common import export_model
    from flywheel.serving import parse_config
    from flywheel.serving.app import deploy, undeploy

    path = export_model("mlp", {"in_features": 64, "hidden": [1024, 1024], "out_features": 10},
                        str(tmp_path_factory.mktemp("throttled") / "slow.onnx"))
    cfg = parse_config({
        "name": "throttle", "server": {"port": 0, "grpc_port": -1},
        "models": [{"name": "slow", "path": path, "num_cpus": 0.5, "warmup_batch_sizes": [256],
                    "batching": {"max_batch_size": 256, "max_queue_delay_us": 0}}],
    })
    dep = deploy(cfg)
    yield dep
    undeploy(dep)


def test_slo_search_finds_the_knee_of_a_throttled_model(throttled):
    common = {"model": "slow", "target": {"http": throttled.url, "grpc": ""}, "mix": {"http_binary": 1},
              "payload": {"batch": 256, "variants": 2}, "warmup_s": 0.5}
    # 8 closed-loop users keep the one-at-a-time model's queue from ever
    # running dry (with 4, a colocated model measured ~7 % below what a paced
    # rate sustained, once in a fresh-clone CI run)
    saturate = parse_scenario({**common, "load": {"by": "users", "levels": [8]}, "duration_s": 3})
    plan = build_plan(saturate)

    def measured_capacity() -> float:   # what the model can do, closed loop
        [sat], _ = run_against(saturate, plan)
        return sat.throughput_rps

    before = measured_capacity()
    inc = max(1.0, round(before / 6))
    search = parse_scenario({
        **common, "mode": "capacity", "duration_s": 2,
        "capacity": {"by": "rate", "start": inc, "increment": inc, "max_level": 3 * before, "max_users": 4,
                     "target_rps": 3 * before, "headroom": 0.0},
        "slo": {"p99_ms": max(50.0, 8 * 1e3 / before), "max_error_rate": 0.0},
    })
    steps, cap = run_against(search, plan)
    after = measured_capacity()
    low, high = min(before, after), max(before, after)  # a shared 2-core host drifts
    assert cap.broke_at_level is not None, [s.slo_failures for s in steps]
    # The true knee lies in (knee_level, broke_at_level], one step wide; the
    # capacity measured closed-loop must fall within one step of it. The rate
    # the knee step achieved is compared, not the rate it offered (a step
    # passes at 95 % of its offer), with 10 % for the drift of a shared 2-core
    # host: CI saw a paced 140 req/s where 8 closed-loop users measured
    # 127-137, and later 127 where they measured 107-110 (+16 %): 25 % is
    # allowed, still under two steps (~17 % each), so a knee two or more
    # steps off still fails.
    trace = (before, after, inc, [(s.level, s.throughput_rps, s.p99_ms, s.slo_failures) for s in steps])
    assert cap.sustainable_rps <= 1.25 * high, trace
    assert low <= cap.broke_at_level + inc, trace
    # past the knee the queue grows: the rate is not achieved or p99 explodes
    assert any("achieved" in f or "p99" in f for f in steps[-1].slo_failures)
    assert cap.sustainable_rps == pytest.approx(cap.knee_level, rel=0.1)
    assert cap.replicas_needed == math.ceil(3 * before / cap.per_replica_rps - 1e-9)


def test_config_search_deploys_each_setting_and_recommends_one(ray_session, digits_model, tmp_path):
    sc = parse_scenario({
        "name": "search", "model": "digits", "mode": "config_search", "mix": {"http_binary": 1},
        "duration_s": 1, "warmup_s": 0.3,
        "capacity": {"by": "users", "start": 1, "factor": 4, "max_level": 4},
        "config_search": {
            "model": {"path": digits_model.onnx_path, "num_cpus": 0.2},
            "grid": {"max_batch_size": [1, 16],
                     "variants": [{"name": "fp32", "path": digits_model.onnx_path},
                                  {"name": "missing", "path": str(tmp_path / "nope.onnx")}]},
        },
    })
    report = run_scenario(sc)
    assert len(report.configs) == 4
    failed = [c for c in report.configs if c.error]
    assert {c.settings["variant"] for c in failed} == {"missing"}
    assert all("does not exist" in c.error for c in failed)
    measured = [c for c in report.configs if not c.error]
    for c in measured:
        assert c.capacity is not None, c.label
        assert [s.level for s in c.steps] == [1, 4], c.label
        for s in c.steps:
            assert s.ok > 0, (c.label, s.level)
            assert s.errors == 0, (c.label, s.level, s.error_counts)
    assert report.recommended in {c.label for c in measured}
    from flywheel.bench.harness import write_report

    paths = write_report(report, tmp_path / "out")
    assert paths["configs_png"].stat().st_size > 1000
    assert "**recommended**" in paths["markdown"].read_text()
