"""The cluster bench's pure parts (bench/cluster.py and its _cluster_*
helpers): its options, the paired throughput figures, the failover and
autoscaling figures from made-up timestamps, HAProxy's stats page, the
printed report and the plot. No Ray, no namespaces, no servers."""

from __future__ import annotations

import json

import pytest

from flywheel.bench import _cluster_report as rep
from flywheel.bench import interleave as il
from flywheel.bench._cluster_load import _parse_head, infer_body, raw_request
from flywheel.bench.cluster import PARTS, parse_args


def _summary(rps: float, p50: float = 1.0) -> dict:
    return {"throughput_rps": rps, "p50_ms": p50, "p99_ms": 3 * p50, "requests": int(rps), "errors": 0}


# -- options ----------------------------------------------------------------------------

def test_every_part_runs_by_default_in_run_order():
    args = parse_args([])
    assert args.parts == PARTS
    assert args.rounds == 3


def test_only_picks_parts_and_keeps_the_run_order():
    assert parse_args(["--only", "autoscale, throughput"]).parts == ("throughput", "autoscale")


def test_an_unknown_part_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--only", "throughput,speedup"])
    err = capsys.readouterr().err
    assert "unknown part(s) speedup" in err
    assert "throughput, failover, autoscale" in err


@pytest.mark.parametrize("option", ["--rounds", "--block", "--failover-clients"])
def test_counts_below_one_are_refused(option, capsys):
    with pytest.raises(SystemExit):
        parse_args([option, "0"])
    assert f"{option} must be >= 1" in capsys.readouterr().err


def test_a_load_step_needs_two_clients_at_least(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--clients", "1"])
    assert "--clients must be >= 2" in capsys.readouterr().err


# -- throughput ----------------------------------------------------------------------------

def test_two_nodes_at_nine_tenths_of_one_read_as_x0_9():
    blocks = il.run_blocks(2, lambda: _summary(1000), lambda: _summary(900))
    comp = rep.compare(rep.DIRECT, rep.BOTH_LB, rep.block_records(blocks, rep.DIRECT, rep.BOTH_LB))
    assert comp["b_over_a"]["median"] == pytest.approx(0.9)
    assert comp["b_over_a"]["pairs"] == 4
    assert [b["setup"] for b in comp["blocks"][:4]] == [rep.DIRECT, rep.BOTH_LB, rep.BOTH_LB, rep.DIRECT]
    json.dumps(comp)  # cluster.json carries it


def test_a_failed_block_costs_its_pair_and_says_why():
    blocks = [il.Block(0, il.A, _summary(1000)), il.Block(1, il.B, None, "RuntimeError('3 errors')"),
              il.Block(2, il.B, _summary(500)), il.Block(3, il.A, _summary(1000))]
    comp = rep.compare(rep.HEAD_LB, rep.BOTH_LB, rep.block_records(blocks, rep.HEAD_LB, rep.BOTH_LB))
    assert comp["pairs"] == 1
    assert comp["b_over_a"]["median"] == pytest.approx(0.5)
    assert "3 errors" in comp["excluded"][0]


def test_setup_stats_pool_a_setup_over_both_comparisons():
    one = rep.compare(rep.DIRECT, rep.BOTH_LB, rep.block_records(
        il.run_blocks(1, lambda: _summary(1000, 2.0), lambda: _summary(800)), rep.DIRECT, rep.BOTH_LB))
    two = rep.compare(rep.HEAD_LB, rep.BOTH_LB, rep.block_records(
        il.run_blocks(1, lambda: _summary(900), lambda: _summary(600)), rep.HEAD_LB, rep.BOTH_LB))
    st = rep.setup_stats([one, two])
    assert list(st) == [rep.DIRECT, rep.HEAD_LB, rep.BOTH_LB]
    assert st[rep.BOTH_LB]["blocks"] == 4
    assert (st[rep.BOTH_LB]["min_rps"], st[rep.BOTH_LB]["median_rps"], st[rep.BOTH_LB]["max_rps"]) == (600, 700, 800)
    assert st[rep.DIRECT]["p50_ms"] == 2.0


# -- failover ----------------------------------------------------------------------------------

def test_failover_figures_count_failures_by_phase_from_the_kill():
    kill = 100.0
    events = {"worker_gone": 100.3, "lb_down": 100.9, "restart": 106.0}
    ok = [99.5, 100.2, 100.5, 100.95, 101.5]
    failed = [99.0, 100.4, 100.8, 102.0, 107.0]
    fig = rep.failover_figures(kill, events, ok, failed)
    assert fig["after_kill_s"] == {"worker_gone": 0.3, "lb_down": 0.9, "restart": 6.0}
    assert fig["failed_by_phase"] == {"before kill": 1, "kill to balancer out": 2, "balancer out to restart": 1,
                                      "restart on": 1}
    assert fig["failed"] == 5
    assert fig["last_failure_after_kill_s"] == 7.0
    assert fig["answered_first_second_after_kill"] == 3


def test_failover_figures_say_not_seen_for_events_that_never_came():
    fig = rep.failover_figures(10.0, {"worker_gone": None, "lb_down": None}, [10.5], [])
    assert fig["after_kill_s"] == {"worker_gone": None, "lb_down": None}
    assert fig["last_failure_after_kill_s"] is None
    assert rep.since(None, 3.0) is None


def _nodes(t: float, running: int, *nodes: tuple[str, str, bool]) -> dict:
    return {"t": t, "running": running, "answered": {}, "nodes": [list(n) for n in nodes]}


def test_watch_events_follow_the_old_node_out_and_a_new_one_in():
    head = ("h", "198.18.1.1", True)
    samples = [_nodes(9.0, 2, head, ("old", "198.18.1.2", True)),
               _nodes(11.0, 1, head, ("old", "198.18.1.2", True)),
               _nodes(25.0, 1, head, ("old", "198.18.1.2", False)),
               _nodes(31.0, 1, head, ("old", "198.18.1.2", False), ("new", "198.18.1.2", True)),
               _nodes(40.0, 2, head, ("old", "198.18.1.2", False), ("new", "198.18.1.2", True))]
    seen = rep.watch_events(samples, kill=10.0, restart=30.0, worker_ip="198.18.1.2")
    assert seen == {"gcs_dead": 25.0, "serve_1_running": 11.0, "node_joined": 31.0, "serve_2_running": 40.0}


def test_watch_events_before_a_restart_leave_the_rejoin_unseen():
    samples = [_nodes(9.0, 2, ("old", "198.18.1.2", True)), _nodes(12.0, 2, ("old", "198.18.1.2", True))]
    seen = rep.watch_events(samples, kill=10.0, restart=None, worker_ip="198.18.1.2")
    assert seen == {"gcs_dead": None, "serve_1_running": None, "node_joined": None, "serve_2_running": None}


# -- autoscaling ------------------------------------------------------------------------------------

def _sample(t: float, running: int, answered: dict[str, int]) -> dict:
    return {"t": t, "running": running, "answered": answered}


def test_autoscale_figures_time_the_step_up_the_second_replica_and_the_way_back():
    samples = [_sample(9.5, 1, {"1": 50}), _sample(12.0, 1, {"1": 80}), _sample(14.0, 2, {"1": 90, "2": 0}),
               _sample(16.5, 2, {"1": 120, "2": 7}), _sample(30.0, 2, {"1": 300, "2": 200}),
               _sample(36.0, 1, {"1": 310})]
    fig = rep.autoscale_figures(samples, step=10.0, stop=31.0)
    assert fig == {"to_2_replicas_s": 4.0, "second_answers_s": 6.5, "back_to_1_s": 5.0, "most_replicas": 2}


def test_autoscale_figures_are_none_when_it_never_scaled():
    samples = [_sample(t, 1, {"1": t}) for t in (1.0, 2.0, 3.0)]
    fig = rep.autoscale_figures(samples, step=1.5, stop=2.5)
    assert fig["to_2_replicas_s"] is None
    assert fig["second_answers_s"] is None
    assert fig["most_replicas"] == 1


# -- HAProxy's stats page, the requests -------------------------------------------------------------

STATS = (
    "# pxname,svname,qcur,qmax,scur,status,weight\n"
    "flywheel_http,FRONTEND,,,0,OPEN,\n"
    "flywheel_http_nodes,node0,0,0,1,UP,1\n"
    "flywheel_http_nodes,node1,0,0,0,DOWN 1/2,1\n"
    "flywheel_http_nodes,BACKEND,0,0,1,UP,1\n"
    "stats,FRONTEND,,,1,OPEN,\n"
)


def test_server_states_read_one_backend_from_haproxys_csv():
    assert rep.server_states(STATS, "flywheel_http_nodes") == {"node0": "UP", "node1": "DOWN 1/2"}


def test_a_response_head_gives_its_status_length_and_close():
    assert _parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: 42\r\nConnection: close\r\n\r\n") == (200, 42, True)
    assert _parse_head(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 7\r\n\r\n") == (503, 7, False)


def test_the_raw_request_carries_the_token_and_the_body_length():
    body = infer_body()
    req = raw_request("/v2/models/digits/infer", body, "fwk_x")
    head, _, sent = req.partition(b"\r\n\r\n")
    assert sent == body
    assert b"Authorization: Bearer fwk_x" in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert json.loads(body)["inputs"][0]["shape"] == [1, 64]


# -- the report and the plot ---------------------------------------------------------------------------

def _result() -> dict:
    comps = [rep.compare(a, b, rep.block_records(il.run_blocks(1, lambda: _summary(1000), lambda: _summary(900)),
                                                 a, b)) for a, b in rep.COMPARISONS]
    failover = rep.failover_figures(0.0, {"worker_gone": 0.2, "lb_down": 0.7, "restart": 6.0}, [0.1, 0.5], [0.3])
    failover.update(after_restart_s={"node_joined": 8.0, "worker_serves": 20.0, "lb_up": None}, clients=8,
                    answered=2, check_interval_ms=300, fall=2, rise=2)
    auto = {"to_2_replicas_s": 4.0, "second_answers_s": 6.5, "back_to_1_s": 5.0, "most_replicas": 2, "clients": 32,
            "autoscaling": {"target_in_flight": 4, "upscale_delay_s": 1, "downscale_delay_s": 4, "look_back_s": 2},
            "model": "wide MLP", "answered": 100, "failed": 0, "nodes_at_peak": ["198.18.1.1", "198.18.1.2"]}
    return {"load_generator": "h2load", "cores": 2,
            "throughput": {"clients": 32, "rounds": 1, "block_s": 3, "comparisons": comps,
                           "setups": rep.setup_stats(comps)},
            "failover": failover, "autoscale": auto}


def test_the_report_gives_each_figure_and_says_the_cores_are_shared():
    text = "\n".join(rep.report_lines(_result()))
    assert "both namespaces" in text and "no speed-up figure" in text
    assert f"paired: {rep.BOTH_LB} / {rep.DIRECT}: x0.90 [0.90-0.90], 2 pairs" in text
    assert "balancer took the worker out:       0.70 s; last failed request: 0.30 s" in text
    assert "balancer sends to it again:         not seen" in text
    assert "2 replicas after 4.00 s; both answering after 6.50 s" in text


def test_the_report_leaves_out_the_parts_that_did_not_run():
    result = _result()
    del result["failover"], result["autoscale"]
    text = "\n".join(rep.report_lines(result))
    assert "failover" not in text and "autoscaling" not in text


def test_rate_bins_events_per_second():
    t, r = rep.rate([0.1, 0.2, 0.6, 1.2], start=0.0, end=1.5, bin_s=0.5)
    assert t.tolist() == [0.0, 0.5, 1.0]
    assert r.tolist() == [4.0, 2.0, 2.0]


def test_the_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    series = {"failover": {"t": [-1.0, 0.0, 1.0], "answered": [100.0, 40.0, 90.0], "failed": [0.0, 2.0, 0.0]},
              "autoscale": {"t": [0.0, 1.0], "answered": [50.0, 60.0], "stop": 1.0, "replica_t": [0.0, 0.5],
                            "replicas": [1, 2]}}
    path = tmp_path / "cluster.png"
    rep.plot(_result(), series, str(path))
    assert path.stat().st_size > 10_000
