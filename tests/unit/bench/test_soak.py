"""The soak's decisions (bench/_soak_report.py, bench/_soak_plan.py): what a
failure is blamed on, recovery, process growth, the plan. No servers."""

import itertools

import numpy as np
import pytest

from flywheel.bench._soak_plan import FAULTS, fault_plan, request_plan
from flywheel.bench._soak_report import (
    REVOKED,
    UNEXPLAINED,
    Fault,
    Outcome,
    blame,
    cause_of,
    first_success_after,
    growth,
    over_growth,
    revocation,
    rss_kib,
    rss_trend,
    settled,
    summarize,
    table,
    verdict,
    with_trends,
    wrong_answer,
)

KILL_DED = Fault("kill dedicated replica", at=10.0, models=("ded",))
KILL_FRONT = Fault("kill gRPC front", at=20.0, transports=("grpc",))
ROUTER = Fault("kill router controller", at=30.0, load_path=False)


def _o(start, end, cause="", transport="http_json", model="ded", key="k1", index=0):
    return Outcome(index, transport, model, key, start, end, cause)


def test_a_failure_in_flight_at_the_kill_on_its_path_is_blamed_on_the_kill():
    assert blame(_o(9.5, 10.5, "HTTP 503: gone"), [KILL_DED], {}) == "fault: kill dedicated replica @10.0s"


def test_a_failure_that_started_after_the_kill_is_unexplained():
    assert blame(_o(10.1, 10.5, "HTTP 503: gone"), [KILL_DED], {}) == UNEXPLAINED


def test_a_failure_that_ended_before_the_kill_is_unexplained():
    assert blame(_o(9.0, 9.9, "HTTP 503: gone"), [KILL_DED], {}) == UNEXPLAINED


def test_a_failure_off_the_killed_process_path_is_unexplained():
    assert blame(_o(9.5, 10.5, "HTTP 503: gone", model="colo"), [KILL_DED], {}) == UNEXPLAINED
    assert blame(_o(19.5, 20.5, "connection: reset", transport="http_binary"), [KILL_FRONT], {}) == UNEXPLAINED


def test_a_grpc_failure_in_flight_at_the_front_kill_is_blamed_on_it_for_any_model():
    o = _o(19.9, 20.1, "gRPC UNAVAILABLE: Socket closed", transport="grpc", model="colo")
    assert blame(o, [KILL_DED, KILL_FRONT], {}) == "fault: kill gRPC front @20.0s"


def test_a_fault_off_every_request_path_is_blamed_for_nothing():
    assert blame(_o(29.0, 31.0, "HTTP 500: boom"), [ROUTER], {}) == UNEXPLAINED


def test_a_refusal_of_a_revoked_key_is_expected_once_revoked():
    revoked = {"k2": 40.0}
    assert blame(_o(39.8, 40.2, "HTTP 401: unknown or revoked API key", key="k2"), [], revoked) == REVOKED
    assert blame(_o(41.0, 41.1, "gRPC UNAUTHENTICATED: revoked", key="k2"), [], revoked) == REVOKED


def test_a_refusal_before_the_revocation_or_of_another_key_is_unexplained():
    revoked = {"k2": 40.0}
    assert blame(_o(38.0, 39.0, "HTTP 401: unknown or revoked API key", key="k2"), [], revoked) == UNEXPLAINED
    assert blame(_o(41.0, 41.1, "HTTP 401: unknown or revoked API key", key="k1"), [], revoked) == UNEXPLAINED


def test_another_failure_of_a_revoked_key_is_not_excused_by_the_revocation():
    assert blame(_o(41.0, 41.1, "HTTP 500: boom", key="k2"), [], {"k2": 40.0}) == UNEXPLAINED


def test_cause_names_the_status_and_hides_numbers_so_that_alike_failures_count_together():
    a = cause_of("HTTP", 503, "replica 127.0.0.1:40123 refused after 1.5 s")
    b = cause_of("HTTP", 503, "replica 127.0.0.1:40999 refused after 2.25 s")
    assert a == b == "HTTP 503: replica N.N:N refused after N s"
    assert cause_of("gRPC", "UNAVAILABLE", "Socket closed") == "gRPC UNAVAILABLE: Socket closed"
    assert cause_of("HTTP", None, "cannot reach x").startswith("connection: ")


def test_cause_is_cut_to_its_limit():
    assert len(cause_of("HTTP", 500, "x" * 500, limit=40)) == 40


def test_first_success_after_counts_only_requests_sent_after_the_fault_on_its_path():
    outcomes = [
        _o(9.0, 10.4, ""),  # sent before the kill: proves nothing
        _o(10.2, 10.3, "", model="colo"),  # another path
        _o(10.5, 10.9, "HTTP 503: x"),
        _o(11.0, 11.2, ""),
        _o(10.8, 11.5, ""),
    ]
    assert first_success_after(outcomes, KILL_DED) == pytest.approx(1.2)


def test_first_success_after_is_none_without_one_or_off_the_load_path():
    assert first_success_after([_o(10.5, 10.9, "HTTP 503: x")], KILL_DED) is None
    assert first_success_after([_o(31.0, 31.1, "")], ROUTER) is None


def test_summary_counts_sent_ok_failed_by_cause_and_by_blame():
    outcomes = [
        _o(1.0, 1.1), _o(2.0, 2.1, transport="grpc"),
        _o(9.9, 10.1, "HTTP 503: gone"),
        _o(12.0, 12.1, "HTTP 503: gone"),
        _o(41.0, 41.1, "HTTP 401: revoked", key="k2"),
    ]
    s = summarize(outcomes, [KILL_DED, ROUTER], {"k2": 40.0})
    assert (s["sent"], s["ok"], s["failed"]) == (5, 2, 3)
    assert s["failed_by_cause"] == {"HTTP 503: gone": 2, "HTTP 401: revoked": 1}
    assert s["failed_by_blame"] == {"fault: kill dedicated replica @10.0s": 1, UNEXPLAINED: 1, REVOKED: 1}
    assert s["unexplained"] == 1
    assert s["unexplained_samples"][0]["start"] == 12.0
    assert s["by_transport"]["grpc"] == {"sent": 1, "failed": 0}
    assert [f["failed_in_flight"] for f in s["faults"]] == [1, 0]
    assert [f["in_flight"] for f in s["faults"]] == [1, 0]


def test_a_fault_counts_every_request_in_flight_on_its_path_answered_or_not():
    outcomes = [_o(9.9, 10.1), _o(9.8, 10.2, "HTTP 503: x"), _o(9.9, 10.1, model="colo"), _o(10.2, 10.3)]
    (row,) = summarize(outcomes, [KILL_DED], {})["faults"]
    assert (row["in_flight"], row["failed_in_flight"]) == (2, 1)


def test_latency_is_summarised_over_the_answered_requests():
    outcomes = [_o(0.0, 0.001 * (i + 1)) for i in range(100)] + [_o(0.0, 9.0, "HTTP 500: x")]
    lat = summarize(outcomes, [], {})["latency_ms"]
    assert lat == {"p50": 51.0, "p99": 100.0, "max": 100.0}


def test_failures_meanwhile_count_any_failure_while_a_fault_lasted():
    swap = Fault("swap", at=50.0, recovered=3.0, load_path=False)
    outcomes = [_o(49.0, 50.5, "HTTP 503: x", model="ep"), _o(52.9, 53.2, "HTTP 500: y", model="colo"),
                _o(53.5, 53.6, "HTTP 500: z"), _o(51.0, 51.1)]
    (row,) = summarize(outcomes, [swap], {})["faults"]
    assert row["failed_meanwhile"] == 2
    assert row["failed_in_flight"] == 0
    assert row["path"] == "none of the load's"


def test_revocation_reports_the_lag_to_the_first_refusal_the_refusals_and_the_successor():
    outcomes = [_o(40.1, 40.2, "", key="k2"), _o(40.6, 40.9, "HTTP 401: revoked", key="k2"),
                _o(41.0, 41.1, "HTTP 401: revoked", key="k2"), _o(41.0, 41.1, "HTTP 401: revoked", key="k1"),
                _o(45.0, 45.3, "HTTP 401: not yet", key="k3"), _o(45.1, 45.5, "", key="k3")]
    assert revocation(outcomes, "k2", 40.0, "k3") == {"lag_s": 0.9, "refused": 2, "new_key_ok_s": 5.5}
    assert revocation(outcomes[:1], "k2", 40.0) == {"lag_s": None, "refused": 0, "new_key_ok_s": None}


def test_rss_is_read_from_proc_status_text():
    text = "Name:\tpython\nVmPeak:\t  900 kB\nVmRSS:\t  123456 kB\nThreads:\t9\n"
    assert rss_kib(text) == 123456
    assert rss_kib("Name:\tzombie\n") == 0


def _s(role, pid, rss, fds, sockets=0):
    return {"role": role, "pid": pid, "rss_kib": rss, "fds": fds, "sockets": sockets, "other_fds": fds - sockets}


def test_growth_pairs_processes_by_pid_and_marks_the_killed_and_their_replacements():
    rows = growth([_s("ingress", 1, 1000, 100), _s("ded-1", 2, 500, 40)],
                  [_s("ingress", 1, 1040, 101), _s("ded-1", 3, 480, 38)])
    by_pid = {r["pid"]: r for r in rows}
    assert by_pid[1]["state"] == "both"
    assert by_pid[1]["rss_growth_pct"] == 4.0
    assert by_pid[1]["fds_growth_pct"] == 1.0
    assert by_pid[2]["state"] == "gone"
    assert by_pid[3]["state"] == "new"
    assert "rss_growth_pct" not in by_pid[3]


def test_only_survivors_growing_beyond_the_limit_miss_the_target():
    rows = growth([_s("a", 1, 1000, 10), _s("b", 2, 1000, 100), _s("c", 3, 1000, 10)],
                  [_s("a", 1, 1051, 10), _s("b", 2, 1000, 110), _s("c", 4, 5000, 99)])
    assert [r["pid"] for r in over_growth(rows)] == [1, 2]
    assert over_growth(rows, limit_pct=200) == []


def test_a_few_more_open_files_on_a_small_count_are_not_a_leak():
    rows = growth([_s("front", 1, 1000, 8)], [_s("front", 1, 1000, 12)])  # +50 %, +4 descriptors
    assert rows[0]["fds_growth_pct"] == 50.0
    assert over_growth(rows) == []


def test_connections_that_moved_to_a_survivor_are_not_a_leak_but_other_descriptors_are():
    moved = growth([_s("ingress", 1, 1000, 95, sockets=25)], [_s("ingress", 1, 1000, 127, sockets=57)])
    assert moved[0]["fds_growth_pct"] == pytest.approx(33.68)
    assert moved[0]["other_fds_growth_pct"] == 0.0
    assert over_growth(moved) == []
    leaked = growth([_s("ingress", 1, 1000, 95, sockets=25)], [_s("ingress", 1, 1000, 127, sockets=25)])
    assert [r["pid"] for r in over_growth(leaked)] == [1]


def test_verdict_names_unexplained_failures_and_growth():
    rows = growth([_s("a", 1, 1000, 10)], [_s("a", 1, 1100, 10)])
    assert verdict({"unexplained": 0}, growth([], [])) == []
    why = verdict({"unexplained": 2}, rows)
    assert why[0] == "2 unexplained failed request(s)"
    assert "a pid 1 grew RSS +10.0 %" in why[1]


def test_table_lists_causes_faults_and_processes():
    outcomes = [_o(9.9, 10.1, "HTTP 503: gone"), _o(11.0, 11.1)]
    s = summarize(outcomes, [KILL_DED], {})
    text = table(s, growth([_s("ingress", 1, 2048, 10)], [_s("ingress", 1, 2048, 10)]), [])
    assert "HTTP 503: gone" in text
    assert "kill dedicated replica" in text
    assert "ingress" in text


def test_the_fault_plan_is_one_of_each_in_order_inside_the_run_and_repeatable():
    plan = fault_plan(600, 30, seed=7)
    assert sorted(p.kind for p in plan) == sorted(FAULTS)
    times = [p.at for p in plan]
    assert times == sorted(times)
    assert times[0] >= 35 and times[-1] <= 450
    assert min(b - a for a, b in zip(times, times[1:])) > 0.2 * (450 - 35) / len(FAULTS)
    assert fault_plan(600, 30, seed=7) == plan
    assert fault_plan(600, 30, seed=8) != plan


@pytest.mark.parametrize("seed", range(20))
def test_the_canary_comes_before_the_swap(seed):
    kinds = [p.kind for p in fault_plan(120, 20, seed)]
    assert kinds.index("canary") < kinds.index("swap")


def test_a_run_too_short_for_its_faults_is_refused():
    with pytest.raises(ValueError, match="run longer"):
        fault_plan(60, 20, seed=0)


def test_the_request_plan_is_open_loop_at_the_rate_and_mixes_everything():
    sends = list(itertools.islice(request_plan(50.0, seed=3), 5000))
    assert [s.at for s in sends[:3]] == [0.0, 0.02, 0.04]
    assert sends[-1].at == pytest.approx(4999 / 50.0)
    assert {s.transport for s in sends} == {"http_json", "http_binary", "grpc"}
    assert {s.model for s in sends} == {"colo", "ded", "ep"}
    churned = sum(s.churn for s in sends) / len(sends)
    assert 0.03 < churned < 0.07
    assert [(s.transport, s.model) for s in itertools.islice(request_plan(50.0, seed=3), 50)] == \
        [(s.transport, s.model) for s in sends[:50]]


def test_the_request_plan_refuses_a_rate_that_is_not_positive():
    with pytest.raises(ValueError, match="rate must be > 0"):
        next(request_plan(0.0, seed=0))


def test_an_answer_equal_to_the_model_s_to_float_tolerance_is_right():
    expected = np.linspace(-1, 1, 10, dtype=np.float32).reshape(1, 10)
    assert wrong_answer(expected + np.float32(1e-7), expected) == ""


def test_an_answer_of_another_shape_or_other_values_is_wrong():
    expected = np.zeros((1, 10), np.float32)
    assert wrong_answer(np.zeros((2, 10), np.float32), expected) == \
        "wrong answer: output shape (2, 10), expected (1, 10)"
    assert wrong_answer(expected + 0.5, expected) == "wrong answer: output differs from the model's by up to 0.5"


def test_settled_takes_each_process_s_least_sample_so_a_passing_swell_is_not_growth():
    rounds = [[_s("front", 1, 1000, 8), _s("ingress", 2, 3000, 100)],
              [_s("front", 1, 1010, 38), _s("ingress", 2, 2990, 122)],
              [_s("front", 1, 1005, 9), _s("ingress", 2, 3020, 101), _s("ded-1", 3, 500, 70)]]
    assert settled(rounds) == [_s("front", 1, 1000, 8), _s("ingress", 2, 2990, 100), _s("ded-1", 3, 500, 70)]


def test_settled_keeps_only_the_processes_of_the_last_round():
    assert [s["pid"] for s in settled([[_s("a", 1, 1, 1)], [_s("b", 2, 1, 1)]])] == [2]
    assert settled([]) == []


def test_a_leak_stays_in_every_sample_and_shows_as_growth():
    before = settled([[_s("front", 1, 1000, 8)]] * 3)
    after = settled([[_s("front", 1, 1000, 30)], [_s("front", 1, 1000, 31)], [_s("front", 1, 1000, 33)]])
    assert [r["pid"] for r in over_growth(growth(before, after))] == [1]


def _pt(t, pid, rss):
    return {"t": t, "pid": pid, "rss_kib": rss}


def test_rss_trend_is_the_least_squares_slope_per_minute_after_the_warm_up():
    points = [_pt(0, 1, 9000)] + [_pt(30 + 30 * i, 1, 1000 + 500 * i) for i in range(5)] + [_pt(60, 2, 5)]
    assert rss_trend(points, 1, since=20) == pytest.approx(1000.0)


def test_rss_trend_needs_three_samples():
    assert rss_trend([_pt(30, 1, 1), _pt(40, 1, 2)], 1, since=0) is None


def test_trends_are_given_to_survivors_only():
    rows = growth([_s("a", 1, 1000, 10), _s("b", 2, 1000, 10)], [_s("a", 1, 1000, 10), _s("b", 3, 1000, 10)])
    points = [_pt(t, 1, 1000) for t in (30, 40, 50)]
    by_pid = {r["pid"]: r for r in with_trends(rows, points, since=20)}
    assert by_pid[1]["rss_kib_per_min"] == 0.0
    assert "rss_kib_per_min" not in by_pid[2]
