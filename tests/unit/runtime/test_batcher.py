from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flywheel.runtime.batcher import BatchingConfig, DynamicBatcher
from flywheel.protocol.errors import (
    ConfigError,
    DeadlineExceededError,
    InvalidInputError,
    OverloadedError,
    UnavailableError,
)

from _poll import wait_for_async


def double(inputs):
    return {"y": inputs["x"] * 2, "ids": inputs["x"][:, :1].copy()}


def rows(start, n, width=3):
    return {"x": np.arange(start, start + n * width, dtype=np.float64).reshape(n, width)}


def run(coro):
    return asyncio.run(coro)


def test_config_rejects_bad_values_naming_the_field():
    with pytest.raises(ConfigError, match="max_batch_size"):
        BatchingConfig(max_batch_size=0)
    with pytest.raises(ConfigError, match="preferred_batch_sizes"):
        BatchingConfig(max_batch_size=4, preferred_batch_sizes=(8,))


def test_a_batcher_that_does_not_merge_calls_the_model_once_per_request_as_sent():
    calls = []

    def model(inputs):
        calls.append(len(inputs["x"]))
        return double(inputs)

    async def main():
        b = DynamicBatcher(model, BatchingConfig(max_batch_size=16, max_queue_delay_us=50_000), merge=False)
        reqs = [rows(100 * i, n) for i, n in enumerate([1, 3, 2])]
        results = await asyncio.gather(*(b.submit(r) for r in reqs))
        for r, res in zip(reqs, results):
            np.testing.assert_array_equal(res.outputs["y"], r["x"] * 2)

    run(main())
    assert calls == [1, 3, 2]


def test_requires_a_running_loop():
    with pytest.raises(RuntimeError, match="no running event loop"):
        DynamicBatcher(double, BatchingConfig())


def test_concurrent_requests_of_different_sizes_share_a_batch_and_get_their_rows():
    calls = []

    def model(inputs):
        calls.append(len(inputs["x"]))
        time.sleep(0.01)
        return double(inputs)

    async def main():
        ex = ThreadPoolExecutor(1)
        b = DynamicBatcher(model, BatchingConfig(max_batch_size=16, max_queue_delay_us=50_000), executor=ex)
        reqs = [rows(100 * i, n) for i, n in enumerate([1, 3, 2, 4, 1])]
        results = await asyncio.gather(*(b.submit(r) for r in reqs))
        for r, res in zip(reqs, results):
            np.testing.assert_array_equal(res.outputs["y"], r["x"] * 2)
        return results

    results = run(main())
    # submitted in the same turn of the loop: the idle model takes them all at once
    assert calls == [11]
    assert [r.leader for r in results] == [True, False, False, False, False]
    assert results[1].batch_rows == 11


def test_idle_batcher_does_not_wait_for_its_delay():
    async def main():
        b = DynamicBatcher(double, BatchingConfig(max_queue_delay_us=2_000_000))
        started = time.perf_counter()
        await b.submit(rows(0, 1))
        return time.perf_counter() - started

    assert run(main()) < 0.5


def test_model_exception_fails_only_that_batch_and_batcher_keeps_serving():
    def flaky(inputs):
        if (inputs["x"] < 0).any():
            raise ValueError("negative input")
        return double(inputs)

    async def main():
        b = DynamicBatcher(flaky, BatchingConfig(max_batch_size=1))
        bad = asyncio.ensure_future(b.submit({"x": -np.ones((1, 3))}))
        good = asyncio.ensure_future(b.submit(rows(0, 1)))
        with pytest.raises(ValueError, match="negative"):
            await bad
        assert (await good).outputs["y"].shape == (1, 3)
        assert (await b.submit(rows(5, 1))).outputs["y"][0, 0] == 10

    run(main())


def test_full_queue_rejects_at_once():
    gate, entered = threading.Event(), threading.Event()

    def slow(inputs):
        entered.set()
        gate.wait(5)
        return double(inputs)

    async def main():
        ex = ThreadPoolExecutor(1)
        b = DynamicBatcher(slow, BatchingConfig(max_batch_size=1, max_queue_size=2), executor=ex)
        running = asyncio.ensure_future(b.submit(rows(0, 1)))
        await wait_for_async(entered.is_set, 5, "the first request to be in the model")
        queued = [asyncio.ensure_future(b.submit(rows(i, 1))) for i in (1, 2)]
        await wait_for_async(lambda: b.queue_depth == 2, 5, "two requests queued behind it")
        with pytest.raises(OverloadedError, match="queue full"):
            await b.submit(rows(3, 1))
        gate.set()
        await asyncio.gather(running, *queued)

    run(main())


def test_deadline_passed_in_queue_fails_without_running():
    gate = threading.Event()
    seen = []

    def slow(inputs):
        seen.append(float(inputs["x"][0, 0]))
        gate.wait(5)
        return double(inputs)

    async def main():
        ex = ThreadPoolExecutor(1)
        b = DynamicBatcher(slow, BatchingConfig(max_batch_size=1), executor=ex)
        first = asyncio.ensure_future(b.submit(rows(0, 1)))
        await wait_for_async(lambda: seen, 5, "the first request to be in the model")
        late = asyncio.ensure_future(b.submit(rows(9, 1), timeout_s=0.01))
        await asyncio.sleep(0.05)  # the behaviour under test: late's 10 ms pass while it waits in the queue
        gate.set()
        await first
        with pytest.raises(DeadlineExceededError, match="timed out while queued"):
            await late

    run(main())
    assert seen == [0.0]


def test_oversized_request_is_rejected():
    async def main():
        b = DynamicBatcher(double, BatchingConfig(max_batch_size=2))
        with pytest.raises(InvalidInputError, match="max_batch_size"):
            await b.submit(rows(0, 3))

    run(main())


def test_requests_with_different_inner_shapes_never_share_a_batch():
    calls = []

    def model(inputs):
        calls.append(inputs["x"].shape)
        time.sleep(0.01)
        return double(inputs)

    async def main():
        ex = ThreadPoolExecutor(1)
        b = DynamicBatcher(model, BatchingConfig(max_batch_size=8), executor=ex)
        reqs = [rows(0, 1, 3), rows(0, 1, 3), rows(0, 1, 4), rows(0, 1, 3)]
        res = await asyncio.gather(*(b.submit(r) for r in reqs))
        for r, out in zip(reqs, res):
            np.testing.assert_array_equal(out.outputs["y"], r["x"] * 2)

    run(main())
    assert (1, 4) in calls


def test_preferred_batch_size_caps_the_batch():
    calls = []

    def model(inputs):
        calls.append(len(inputs["x"]))
        time.sleep(0.01)
        return double(inputs)

    async def main():
        ex = ThreadPoolExecutor(1)
        cfg = BatchingConfig(max_batch_size=8, preferred_batch_sizes=(4,), max_queue_delay_us=0)
        b = DynamicBatcher(model, cfg, executor=ex)
        await asyncio.gather(*(b.submit(rows(i, 1)) for i in range(7)))

    run(main())
    # all seven arrive in one turn: the first batch stops at the preferred 4
    assert calls == [4, 3]


def test_close_lets_accepted_requests_finish_then_refuses():
    async def main():
        ex = ThreadPoolExecutor(1)
        b = DynamicBatcher(lambda i: (time.sleep(0.01), double(i))[1], BatchingConfig(max_batch_size=1), executor=ex)
        pending = [asyncio.ensure_future(b.submit(rows(i, 1))) for i in range(3)]
        await asyncio.sleep(0)
        await b.close()
        done = await asyncio.wait_for(asyncio.gather(*pending), 0.5)  # none failed
        assert [float(r.outputs["y"][0, 0]) for r in done] == [0.0, 2.0, 4.0]
        with pytest.raises(UnavailableError, match="shutting down"):
            await b.submit(rows(0, 1))

    run(main())


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=25),
    gaps=st.lists(st.integers(0, 3), min_size=25, max_size=25),
    max_batch=st.integers(6, 16),
    delay_us=st.sampled_from([0, 200, 2000]),
    concurrent=st.integers(1, 2),
)
def test_property_every_request_gets_exactly_its_own_rows_in_order(sizes, gaps, max_batch, delay_us, concurrent):
    def model(inputs):
        time.sleep(0.0005)
        return {"y": inputs["x"] + 0.5}

    async def main():
        ex = ThreadPoolExecutor(concurrent)
        b = DynamicBatcher(
            model,
            BatchingConfig(max_batch_size=max_batch, max_queue_delay_us=delay_us, max_concurrent_batches=concurrent),
            executor=ex,
        )
        tasks, start = [], 0
        for n, gap in zip(sizes, gaps):
            x = np.arange(start, start + n, dtype=np.float64).reshape(n, 1)
            start += n
            tasks.append((x, asyncio.ensure_future(b.submit({"x": x}))))
            if gap:
                await asyncio.sleep(gap / 1000)
        for x, t in tasks:
            res = await t
            np.testing.assert_array_equal(res.outputs["y"], x + 0.5)
            assert res.batch_rows <= max_batch
        ex.shutdown()

    run(main())


def test_inline_mode_runs_the_model_on_the_loop_thread():
    seen = []

    def model(inputs):
        seen.append(threading.current_thread().name)
        return double(inputs)

    async def main():
        cfg = BatchingConfig(inline=True)
        b = DynamicBatcher(model, cfg, executor=None if cfg.inline else ThreadPoolExecutor(1))
        await b.submit(rows(0, 1))
        return threading.current_thread().name

    assert seen == [run(main())]
