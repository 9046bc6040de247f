"""Interleaved A/B comparisons (bench/interleave.py): the block order, the
pairing of neighbours, failed blocks, and which way the ratios point."""

from __future__ import annotations

import pytest

from flywheel.bench import interleave as il
from flywheel.protocol.errors import ConfigError


def test_each_round_is_a_b_b_a():
    assert il.abba(1) == ["a", "b", "b", "a"]
    assert il.abba(3) == ["a", "b", "b", "a"] * 3


def test_names_follow_the_sides():
    assert il.abba_names("plain", "watched", 2) == ["plain", "watched", "watched", "plain"] * 2


@pytest.mark.parametrize("rounds", [0, -1, 1.5, True])
def test_rounds_must_be_a_positive_integer(rounds):
    with pytest.raises(ConfigError, match="rounds"):
        il.abba(rounds)


def test_blocks_are_measured_in_a_b_b_a_order():
    calls = []
    blocks = il.run_blocks(2, lambda: calls.append("A") or len(calls), lambda: calls.append("B") or len(calls))
    assert calls == ["A", "B", "B", "A", "A", "B", "B", "A"]
    assert [b.side for b in blocks] == il.abba(2)
    assert [b.result for b in blocks] == list(range(1, 9))
    assert [b.round for b in blocks] == [0, 0, 0, 0, 1, 1, 1, 1]


def test_neighbours_in_time_are_paired():
    blocks = il.run_blocks(2, iter(["a1", "a2", "a3", "a4"]).__next__, iter(["b1", "b2", "b3", "b4"]).__next__)
    pairs, excluded = il.neighbour_pairs(blocks)
    # A1 B1 B2 A2 | A3 B3 B4 A4: (A1, B1), (A2, B2), (A3, B3), (A4, B4)
    assert [(p.round, p.a, p.b) for p in pairs] == [(0, "a1", "b1"), (0, "a2", "b2"), (1, "a3", "b3"),
                                                     (1, "a4", "b4")]
    assert excluded == []


def _failing_second_b():
    values = iter([10.0, None, 12.0])

    def measure():
        v = next(values)
        if v is None:
            raise RuntimeError("connection refused")
        return v

    return measure


def test_a_failed_block_costs_its_pair_and_is_said():
    blocks = il.run_blocks(1, iter([1.0, 2.0]).__next__, _failing_second_b())
    assert [b.ok for b in blocks] == [True, True, False, True]
    assert "connection refused" in blocks[2].error
    pairs, excluded = il.neighbour_pairs(blocks)
    assert [(p.a, p.b) for p in pairs] == [(1.0, 10.0)]
    assert len(excluded) == 1
    assert "blocks 2-3" in excluded[0]
    assert "block 2 (B) failed" in excluded[0]
    assert "connection refused" in excluded[0]


def test_every_block_failing_leaves_no_ratio():
    def boom():
        raise RuntimeError("down")

    pairs, excluded = il.neighbour_pairs(il.run_blocks(2, boom, boom))
    assert pairs == []
    assert len(excluded) == 4
    assert il.RatioStats.of(il.paired_ratios(pairs, float)) is None


def test_an_unpaired_last_block_is_left_out_and_said():
    blocks = il.run_blocks(1, iter([1.0, 2.0]).__next__, iter([3.0, 4.0]).__next__)[:3]
    pairs, excluded = il.neighbour_pairs(blocks)
    assert len(pairs) == 1
    assert excluded == ["block 2 has no neighbour: left out"]


def test_blocks_out_of_order_are_refused():
    blocks = [il.Block(0, "b", 1.0), il.Block(1, "a", 2.0)]
    with pytest.raises(ValueError, match="A B B A"):
        il.neighbour_pairs(blocks)


def test_ratio_is_b_over_a_by_default_and_a_over_b_when_asked():
    # A: 100 req/s and 2 ms; B: 200 req/s and 1 ms: B is twice as fast both ways
    pairs = [il.Pair(0, {"rps": 100.0, "p50": 2.0}, {"rps": 200.0, "p50": 1.0})]
    assert il.paired_ratios(pairs, lambda r: r["rps"]) == [2.0]
    assert il.paired_ratios(pairs, lambda r: r["p50"], numerator=il.A) == [2.0]
    assert il.paired_ratios(pairs, lambda r: r["p50"]) == [0.5]


def test_a_zero_denominator_is_skipped():
    pairs = [il.Pair(0, 0.0, 5.0), il.Pair(0, 2.0, 4.0)]
    assert il.paired_ratios(pairs, float) == [2.0]


def test_unknown_numerator_is_refused():
    with pytest.raises(ConfigError, match="numerator"):
        il.paired_ratios([], float, numerator="c")


def test_stats_are_the_median_and_range_of_the_ratios():
    stats = il.RatioStats.of([1.2, 0.9, 1.0, 1.5])
    assert stats == il.RatioStats(median=1.1, low=0.9, high=1.5, n=4)
    assert stats.as_dict() == {"median": 1.1, "min": 0.9, "max": 1.5, "pairs": 4}


def test_side_medians_come_from_each_side():
    pairs = [il.Pair(0, 1.0, 10.0), il.Pair(0, 3.0, 30.0), il.Pair(1, 2.0, 20.0)]
    assert il.side_median(pairs, il.A, float) == 2.0
    assert il.side_median(pairs, il.B, float) == 20.0
