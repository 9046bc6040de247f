"""The latency bench's paired comparisons (bench/latency.py): the record a
comparison writes, which way its ratios point, failed blocks, the pooled
table rows and the targets read from the pairs. No servers: LoadResults
are built by hand."""

from __future__ import annotations

import json

from flywheel.bench import interleave as il
from flywheel.bench.latency import _summary, comparison, pooled
from flywheel.bench.loadgen import LoadResult


def _result(rps: float, p50_ms: float, seconds: float = 1.0, c: int = 1) -> LoadResult:
    n = int(rps * seconds)
    return LoadResult(c, seconds, [p50_ms / 1e3] * n)


def test_the_floor_twice_as_fast_reads_as_x2_both_ways():
    # A = flywheel (1000 req/s, 2 ms), B = the floor (2000 req/s, 1 ms)
    blocks = il.run_blocks(2, lambda: _result(1000, 2.0), lambda: _result(2000, 1.0))
    rec = comparison("flywheel", "flywheel, no ray", "http json", 1, blocks, 2, 1.0)
    assert rec["b_faster"]["throughput_rps"] == {"median": 2.0, "min": 2.0, "max": 2.0, "pairs": 4}
    assert rec["b_faster"]["p50_ms"]["median"] == 2.0
    assert rec["median_a"] == {"throughput_rps": 1000.0, "p50_ms": 2.0}
    assert rec["median_b"] == {"throughput_rps": 2000.0, "p50_ms": 1.0}


def test_the_record_keeps_every_block_in_time_order_with_its_system():
    blocks = il.run_blocks(1, lambda: _result(1000, 2.0), lambda: _result(2000, 1.0))
    rec = comparison("ray serve", "flywheel", "grpc", 32, blocks, 1, 1.0)
    assert [b["system"] for b in rec["blocks"]] == ["ray serve", "flywheel", "flywheel", "ray serve"]
    assert [b["throughput_rps"] for b in rec["blocks"]] == [1000.0, 2000.0, 2000.0, 1000.0]
    json.dumps(rec)  # latency.json carries it


def test_a_failed_block_is_left_out_with_its_pair_and_recorded():
    a = _result(1000, 2.0)
    blocks = [il.Block(0, il.A, a), il.Block(1, il.B, _result(3000, 1.0)),
              il.Block(2, il.B, None, "RuntimeError('refused')"), il.Block(3, il.A, a)]
    rec = comparison("flywheel", "flywheel, no ray", "grpc", 8, blocks, 1, 1.0)
    assert rec["pairs"] == 1
    assert rec["blocks"][2]["error"] == "RuntimeError('refused')"
    assert len(rec["excluded"]) == 1
    assert rec["b_faster"]["throughput_rps"]["median"] == 3.0


def test_every_block_failing_gives_no_ratio():
    def down():
        raise RuntimeError("down")

    rec = comparison("flywheel", "mlserver", "grpc", 1, il.run_blocks(1, down, down), 1, 1.0)
    assert rec["pairs"] == 0
    assert rec["b_faster"] == {}
    assert _summary([], [rec], 1)  # reported, not a crash


def test_pooled_rows_count_every_request_over_the_blocks_time():
    row = pooled("flywheel", "http json", [_result(1000, 1.0), _result(3000, 1.0)])
    assert row["throughput_rps"] == 2000.0
    assert row["requests"] == 4000
    assert row["blocks"] == 2
    assert row["mode"] == "paired blocks"


def test_floor_target_comes_from_the_paired_median():
    fw_slow = il.run_blocks(3, lambda: _result(1000, 2.0, c=32), lambda: _result(1500, 1.0, c=32))
    rec = comparison("flywheel", "flywheel, no ray", "grpc", 32, fw_slow, 3, 1.0)
    lines = _summary([], [rec], 32)
    target = next(x for x in lines if "within 1.1x of the no-Ray floor" in x)
    assert target.strip().startswith("MISS")
    assert "floor/flywheel 1.50" in target


def test_peer_target_reads_flywheel_over_the_peer():
    blocks = il.run_blocks(1, lambda: _result(100, 10.0, c=32), lambda: _result(1200, 1.0, c=32))
    rec = comparison("ray serve", "flywheel", "http json", 32, blocks, 1, 1.0)
    target = next(x for x in _summary([], [rec], 32) if ">= 10x ray serve" in x)
    assert target.strip().startswith("met")
    assert "x12.0" in target
