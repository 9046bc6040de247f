"""The drift monitor and the replica-side sampler, in-process over loopback."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import numpy as np
import pytest

from flywheel.protocol.errors import ConfigError, ErrorCode
from flywheel.serving._private.drift_sampler import DriftSampler
from flywheel.serving._private.wire import OP_DRIFT_HISTORY, OP_DRIFT_INGEST, OP_METRICS, Call, ReplicaChannel
from flywheel.serving.config import DriftConfig, ModelConfig
from flywheel.serving.drift_monitor import DriftMonitor, encode_samples, fit_detector

from _poll import wait_for, wait_for_async

SECRET = b"s" * 32  # the deployment's: the monitor and its callers share it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def monitor(tmp_path):
    rng = np.random.default_rng(0)
    ref = tmp_path / "ref.npy"
    np.save(ref, rng.normal(size=(2000, 4)))
    cfg = DriftConfig(enabled=True, window=200, tests=("ks", "mmd"), reference=str(ref))
    port = free_port()
    mon = DriftMonitor(port, [ModelConfig(name="m", path="x.onnx", version="1", drift=cfg)], secret=SECRET)
    events = []
    got = threading.Event()
    mon.add_callback(lambda e: (events.append(e), got.set()))
    yield mon, port, events, got, cfg
    mon.close()


async def _call(port, op, payload):
    ch = ReplicaChannel("127.0.0.1", port, pool_size=1, secret=SECRET)
    try:
        return await ch.call(Call(op, payload))
    finally:
        ch.close()


def test_shifted_window_raises_an_event_and_same_distribution_does_not(monitor):
    mon, port, events, got, _ = monitor
    rng = np.random.default_rng(1)
    same = rng.normal(size=(200, 4))
    assert asyncio.run(_call(port, OP_DRIFT_INGEST, encode_samples("m", "1", same))).code == 0
    shifted = rng.normal(size=(200, 4))
    shifted[:, 2] += 1.0
    assert asyncio.run(_call(port, OP_DRIFT_INGEST, encode_samples("m", "1", shifted))).code == 0
    assert got.wait(30)
    history = json.loads(asyncio.run(_call(port, OP_DRIFT_HISTORY, b'{"model": "m", "version": "1"}')).payload)
    assert [(h["test"], h["any_drift"]) for h in history] == [("ks", False), ("mmd", False), ("ks", True), ("mmd", True)]
    ks_event = next(e for e in events if e.test == "ks")
    assert ks_event.features == [2]
    assert ks_event.model == "m"
    text = asyncio.run(_call(port, OP_METRICS, b"")).payload.decode()
    assert 'flywheel_drift_detected{feature="2",model="m",test="ks",version="1"} 1.0' in text
    assert 'flywheel_drift_sampled_rows_total{model="m",version="1"} 400.0' in text


def test_bad_samples_are_refused_with_a_reason(monitor):
    _, port, *_ = monitor
    assert asyncio.run(_call(port, OP_DRIFT_INGEST, b"\x01")).code == ErrorCode.INVALID_ARGUMENT
    wrong = asyncio.run(_call(port, OP_DRIFT_INGEST, encode_samples("m", "1", np.zeros((5, 3)))))
    assert wrong.code == ErrorCode.INVALID_ARGUMENT
    assert b"3 features" in wrong.payload
    unknown = asyncio.run(_call(port, OP_DRIFT_INGEST, encode_samples("z", "1", np.zeros((5, 4)))))
    assert unknown.code == ErrorCode.NOT_FOUND


def test_sampler_ships_batches_and_drops_when_the_monitor_is_gone(monitor):
    mon, port, *_ , cfg = monitor
    cfg = DriftConfig(enabled=True, sample_rate=1.0, batch_rows=50, flush_interval_s=0.05, window=200)

    async def run(p):
        s = DriftSampler(cfg, "m", "1", p, seed=0, secret=SECRET)
        s.start()
        for _ in range(10):
            s.offer({"x": np.zeros((10, 4))})
        await wait_for_async(lambda: s.shipped_rows + s.dropped_rows >= 100, 10, "all 100 rows shipped or dropped")
        s.close()
        return s

    ok = asyncio.run(run(port))
    assert ok.shipped_rows == 100
    assert ok.dropped_rows == 0
    gone = asyncio.run(run(free_port()))
    assert gone.shipped_rows == 0
    assert gone.dropped_rows == 100


def test_a_version_added_later_is_tracked_from_its_config_and_scored_since_a_time(monitor):
    import msgspec

    from flywheel.serving._private.wire import OP_DRIFT_TRACK

    mon, port, _, got, cfg = monitor
    assert mon.drift_score("m", "2", 0.0) is None  # not tracked: no score, no error
    late = ModelConfig(name="m", path="x.onnx", version="2", drift=cfg)
    assert asyncio.run(_call(port, OP_DRIFT_TRACK, msgspec.json.encode(late))).code == 0
    rng = np.random.default_rng(2)
    before = time.time()
    assert mon.drift_score("m", "2", before) is None  # tracked, no window yet
    shifted = rng.normal(size=(200, 4))
    shifted[:, [1, 3]] += 2.0
    assert asyncio.run(_call(port, OP_DRIFT_INGEST, encode_samples("m", "2", shifted))).code == 0
    wait_for(lambda: len(mon.history("m", "2")) >= 2, 30, "version 2's ks and mmd results", every_s=0.05)
    ks = [h for h in mon.history("m", "2") if h["test"] == "ks"]
    assert ks[0]["result"]["drift"] == [False, True, False, True]
    assert mon.drift_score("m", "2", before) == 1.0  # the worst window: mmd flags the whole input
    assert mon.drift_score("m", "2", before + 3600) is None  # nothing scored since then
    off = ModelConfig(name="m", path="x.onnx", version="3")
    refused = asyncio.run(_call(port, OP_DRIFT_TRACK, msgspec.json.encode(off)))
    assert refused.code == ErrorCode.INVALID_ARGUMENT
    assert b"drift.enabled" in refused.payload


def test_drift_config_accepts_every_registered_test_and_names_them_on_a_typo():
    from flywheel.kernels import available_tests

    for test in available_tests():
        assert DriftConfig(tests=(test,)).tests == (test,)
    with pytest.raises(ConfigError, match=r"drift.tests \['kss'\]: choose from ks, cvm, chi2, psi, mmd"):
        DriftConfig(tests=("kss",))


def test_drift_params_reach_the_test_and_bad_ones_are_refused_naming_the_field():
    cfg = DriftConfig(enabled=True, tests=("psi", "mmd"), params={"psi": {"threshold": 0.5},
                                                                 "mmd": {"n_permutations": 0}})
    model = ModelConfig(name="p", path="x.onnx", version="1", drift=cfg)
    assert fit_detector(model, "psi", np.zeros((20, 1))).params.threshold == 0.5
    assert fit_detector(model, "mmd", np.random.default_rng(0).normal(size=(20, 2))).params.n_permutations == 0
    with pytest.raises(ConfigError, match=r"drift.params.psi: parameters of test 'psi': Object contains unknown "
                                          r"field `treshold`"):
        DriftConfig(tests=("psi",), params={"psi": {"treshold": 0.5}})
    with pytest.raises(ConfigError, match=r"drift.params.ks: test 'ks' takes no parameters \(got sigma\)"):
        DriftConfig(tests=("ks",), params={"ks": {"sigma": 1.0}})
    with pytest.raises(ConfigError, match=r"drift.params.mmd: 'mmd' is not among drift.tests \['ks'\]"):
        DriftConfig(tests=("ks",), params={"mmd": {"sigma": 1.0}})


def test_a_test_registered_at_run_time_is_accepted_and_scored_by_the_monitor():
    from flywheel.kernels import register_test, unregister_test
    from flywheel.kernels.drift import ContinuousTest

    class Toy(ContinuousTest):
        name = "toy_serving"
        backends = ("numpy",)

        def fit_data(self, data):
            pass

        def score_numpy(self, win):
            return np.zeros(win.shape[1]), np.ones(win.shape[1])

    register_test(Toy)
    try:
        cfg = DriftConfig(enabled=True, tests=("toy_serving",))
        assert cfg.tests == ("toy_serving",)
        # a NumPy-only test runs on its NumPy kernel in the monitor
        model = ModelConfig(name="t", path="x.onnx", version="1", drift=cfg)
        det = fit_detector(model, "toy_serving", np.zeros((50, 3)))
        assert det.backend == "numpy"
        assert list(det.score(np.ones((20, 3))).p_value) == [1.0, 1.0, 1.0]
    finally:
        unregister_test("toy_serving")


def _codes_monitor(tmp_path, reference, tests=("chi2", "psi", "ks")):
    ref = tmp_path / "codes.npy"
    np.save(ref, reference)
    cfg = DriftConfig(enabled=True, window=200, tests=tests, reference=str(ref))
    port = free_port()
    return DriftMonitor(port, [ModelConfig(name="c", path="x.onnx", version="1", drift=cfg)], secret=SECRET), port


def test_categorical_tests_score_integer_codes_and_refuse_other_values(tmp_path):
    rng = np.random.default_rng(3)
    mon, port = _codes_monitor(tmp_path, rng.integers(0, 5, size=(2000, 3)))
    try:
        moved = rng.integers(0, 5, size=(200, 3)).astype(np.float64)  # codes travel as float64
        moved[:150, 1] = 4.0
        assert asyncio.run(_call(port, OP_DRIFT_INGEST, encode_samples("c", "1", moved))).code == 0
        by_test = {h["test"]: h["result"]["drift"] for h in mon.history("c", "1")}
        assert by_test["chi2"] == [False, True, False]
        assert by_test["psi"] == [False, True, False]
        not_codes = rng.normal(2.0, 1.0, size=(200, 3))
        assert asyncio.run(_call(port, OP_DRIFT_INGEST, encode_samples("c", "1", not_codes))).code == 0
        assert [h["test"] for h in mon.history("c", "1")] == ["chi2", "psi", "ks", "ks"]  # ks still scores
        text = asyncio.run(_call(port, OP_METRICS, b"")).payload.decode()
        assert 'flywheel_drift_refused_windows_total{model="c",test="chi2",version="1"} 1.0' in text
        assert 'flywheel_drift_refused_windows_total{model="c",test="psi",version="1"} 1.0' in text
    finally:
        mon.close()


def test_a_reference_that_is_not_integer_codes_refuses_the_model_naming_the_test(tmp_path):
    rng = np.random.default_rng(4)
    with pytest.raises(ConfigError, match=r"model 'c' version '1': drift test 'chi2' cannot use the reference "
                                          r"sample: reference: categorical codes must be integers"):
        _codes_monitor(tmp_path, rng.normal(size=(500, 3)), tests=("ks", "chi2"))


def test_a_frame_through_serve_is_answered_as_over_loopback(monitor):
    """What a replica on another node sends through Serve (monitor_link.py)."""
    mon, port, _, got, _ = monitor
    shifted = np.random.default_rng(2).normal(size=(200, 4)) + 3.0
    code, payload = asyncio.run(mon.frame(OP_DRIFT_INGEST, encode_samples("m", "1", shifted)))
    assert (code, payload) == (0, b"")
    assert got.wait(30)
    code, payload = asyncio.run(mon.frame(OP_DRIFT_HISTORY, b'{"model": "m", "version": "1"}'))
    assert code == 0 and json.loads(payload)[0]["any_drift"]
    code, payload = asyncio.run(mon.frame(OP_DRIFT_INGEST, b"\x01"))
    assert code == ErrorCode.INVALID_ARGUMENT and payload


def test_without_an_application_the_monitor_is_reached_over_loopback_alone():
    from flywheel.serving._private.monitor_link import MonitorLink, monitor_link

    assert isinstance(monitor_link(9, SECRET, ""), ReplicaChannel)
    assert isinstance(monitor_link(9, SECRET, "app"), MonitorLink)


def test_a_link_whose_local_monitor_is_gone_asks_again_where_it_is():
    from flywheel.protocol.errors import UnavailableError
    from flywheel.serving._private.monitor_link import MonitorLink

    link = MonitorLink(free_port(), SECRET, "app")  # nothing listens there: the monitor went
    link._local = ReplicaChannel("127.0.0.1", link._port, pool_size=1, secret=SECRET)
    with pytest.raises(UnavailableError):
        asyncio.run(link.call(Call(OP_METRICS, b"")))
    assert link._local is None  # the next call resolves the monitor's node afresh
