"""A model replica chooses where its model runs when the config does not
say: inline on the request loop for a model whose largest batch takes at
most a millisecond, a worker thread otherwise; and it says which."""

from __future__ import annotations

import json
import time

import msgspec
import numpy as np

from flywheel.runtime.backends import Backend
from flywheel.runtime.batcher import BatchingConfig
from flywheel.runtime.signature import Signature, TensorSpec
from flywheel.serving._private.execution import INLINE_BUDGET_S, choose_execution
from flywheel.serving.config import ModelConfig, ServerConfig
from flywheel.serving.model_server import ModelServer


class Sleeper(Backend):
    """A real backend whose every call takes ``per_row_s`` per row."""

    platform = "test"

    def __init__(self, per_row_s: float) -> None:
        self.per_row_s = per_row_s
        self.calls: list[int] = []

    def load(self) -> None:
        self._signature = Signature(inputs=(TensorSpec("x", "FP32", (-1, 2)),),
                                    outputs=(TensorSpec("y", "FP32", (-1, 2)),))

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = len(inputs["x"])
        self.calls.append(rows)
        time.sleep(self.per_row_s * rows)
        return {"y": inputs["x"]}


def _loaded(per_row_s: float) -> Sleeper:
    b = Sleeper(per_row_s)
    b.load()
    return b


def test_a_slow_model_goes_to_a_worker_thread_without_timing_a_large_batch():
    b = _loaded(0.005)  # 5 ms a row: over the budget at one row already
    ex = choose_execution(b, BatchingConfig(max_batch_size=32), batchable=True)
    assert not ex.inline and ex.chosen_by == "warm-up timing"
    assert ex.timed_rows == 1 and ex.timed_s > INLINE_BUDGET_S
    assert 32 not in b.calls  # no point timing the largest batch
    assert "on a worker thread" in ex.describe() and "over the 1 ms inline budget" in ex.describe()


def test_a_model_fast_at_one_row_but_slow_at_its_largest_batch_goes_to_a_worker_thread():
    b = _loaded(0.0001)  # 0.1 ms a row: 1 row fits the budget, 32 rows do not
    ex = choose_execution(b, BatchingConfig(max_batch_size=32), batchable=True)
    assert not ex.inline  # whichever batch showed it: sleep never takes less than asked


def test_an_onnx_model_is_timed_and_its_metadata_says_where_it_runs(mlp_onnx):
    server = ModelServer(ModelConfig(name="mlp", version="1", path=mlp_onnx), ServerConfig().request_limits())
    ex = server.execution
    # (about 0.02 ms here; the rule, not the machine's speed, is what is checked)
    assert ex.chosen_by == "warm-up timing" and ex.inline == (ex.timed_s <= INLINE_BUDGET_S)
    if ex.inline:
        assert ex.timed_rows == 32  # the largest batch was timed too
    meta = json.loads(server.metadata)
    assert meta["parameters"] == ex.parameters()
    assert meta["parameters"]["execution"] == ("inline" if ex.inline else "worker_thread")
    assert meta["parameters"]["warmup_batch_us"] == round(ex.timed_s * 1e6)


def test_the_config_decides_when_it_says_and_nothing_is_timed():
    for inline in (True, False):
        b = _loaded(0.005)
        ex = choose_execution(b, BatchingConfig(inline=inline), batchable=True)
        assert (ex.inline, ex.chosen_by, ex.timed_rows) == (inline, "config", 0)
        assert b.calls == []
    b = _loaded(0.0)
    ex = choose_execution(b, BatchingConfig(max_concurrent_batches=2), batchable=True)
    assert not ex.inline and "max_concurrent_batches" in ex.chosen_by and b.calls == []


def test_a_model_without_a_batch_axis_is_timed_at_its_one_shape():
    b = _loaded(0.0)
    ex = choose_execution(b, BatchingConfig(max_batch_size=32), batchable=False)
    assert ex.timed_rows == 1 and set(b.calls) == {1}


def test_an_explicit_inline_false_model_still_answers_through_the_worker_thread(mlp_onnx):
    import asyncio

    from flywheel.serving._private.wire import OP_INFER, Call

    cfg = ModelConfig(name="mlp", version="1", path=mlp_onnx, batching=BatchingConfig(inline=False))
    server = ModelServer(cfg, ServerConfig().request_limits())
    assert json.loads(server.metadata)["parameters"] == {"execution": "worker_thread",
                                                        "execution_chosen_by": "config"}
    body = msgspec.json.encode({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                            "data": [0.5] * 64}]})

    async def run():
        await server.start()
        try:
            return await server.handle(Call(OP_INFER, body))
        finally:
            await server.close()

    reply = asyncio.run(run())
    assert reply.code == 0 and json.loads(reply.payload)["outputs"][0]["shape"] == [1, 10]
