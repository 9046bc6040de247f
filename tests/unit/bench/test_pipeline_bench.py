"""The pipeline benchmark's pure parts: its three models answer alike (no
Ray: each loaded by the model server's own factory) and its verdicts. No
timings."""

import numpy as np

from flywheel.bench.pipeline import LAYERS, in_process_us, medians, prepare, request_body, verdicts
from flywheel.serving.config import parse_config
from flywheel.serving.model_server import make_backend


def test_the_three_variants_serve_the_same_model(tmp_path):
    cfg = parse_config({"models": prepare(str(tmp_path))})
    x = np.random.default_rng(0).random((3, LAYERS[0]), dtype=np.float32)
    out = {}
    for model in cfg.models:
        backend = make_backend(model)
        backend.load()
        backend.warmup((1, 4))
        out[model.name] = backend.infer({"input": x})["output"]
    np.testing.assert_allclose(out["python"], out["plain"], rtol=1e-6)
    plain_of_normalised = make_backend(cfg.models[0])
    plain_of_normalised.load()
    z = plain_of_normalised.infer({"input": (x - np.float32(0.5)) / np.float32(0.29)})["output"]
    softmax = np.exp(z - z.max(axis=1, keepdims=True))
    np.testing.assert_allclose(out["steps"], softmax / softmax.sum(axis=1, keepdims=True), rtol=1e-4)
    assert request_body().startswith(b'{"inputs":[{"name":"input","shape":[1,64]')
    assert sorted(in_process_us(prepare(str(tmp_path)), calls=3)) == ["plain", "python", "steps"]


def test_verdicts_compare_each_variant_to_plain_against_the_target():
    rows = [{"variant": v, "concurrency": c, "p50_ms": p50, "throughput_rps": rps, "errors": 0}
            for v, c, p50, rps in (("plain", 1, 1.0, 900), ("plain", 32, 2.0, 10_000),
                                   ("python", 1, 1.1, 800), ("python", 32, 3.0, 7_000),
                                   ("steps", 1, 1.3, 700), ("steps", 32, 2.1, 9_000),
                                   ("steps", 1, 1.5, 700), ("steps", 32, 2.1, 9_000))]
    python, steps = verdicts(medians(rows))
    assert python.startswith("python: c=1 p50 x1.10 (1.100 vs 1.000 ms) ok; c=32 throughput cost x1.43")
    assert "x1.43 (7000 vs 10000 req/s) OVER" in python
    assert steps.startswith("steps: c=1 p50 x1.40 (1.400 vs 1.000 ms) OVER; c=32 throughput cost x1.11")
