"""The router controller's signature checks, without Ray: add_variant, swap
and a canary's start refuse a candidate whose signature differs from the
endpoint's, change nothing when they do, and record a change that is allowed."""

from __future__ import annotations

import itertools

import msgspec
import pytest

from flywheel.protocol.errors import InvalidInputError
from flywheel.runtime.signature import Signature, SignatureMismatchError, TensorSpec
from flywheel.serving.config import EndpointConfig, ModelConfig
from flywheel.serving.control_state import ControlState

T0 = 1_000_000.0
SAME = Signature(inputs=(TensorSpec("x", "FP32", (-1, 4)),), outputs=(TensorSpec("y", "FP32", (-1, 3)),))
FP64 = Signature(inputs=(TensorSpec("x", "FP64", (-1, 4)),), outputs=(TensorSpec("y", "FP32", (-1, 3)),))
_seq = itertools.count(1)


def meta(sig: Signature) -> dict:
    return {"name": "m", "versions": [], "platform": "onnx_onnxv1", **msgspec.to_builtins(sig)}


def report(st: ControlState, loaded: dict, signatures: dict) -> dict:
    """One ingress replica's report (serving/_private/endpoint_sync.py)."""
    return {"replica": "r1", "epoch": st.epoch, "applied": st.version, "loaded": {"m": loaded},
            "signatures": {"m": {v: meta(s) for v, s in signatures.items()}}, "inflight": {},
            "batches": [{"seq": next(_seq), "windows": {}, "rewards": {}, "ids": [], "used_ids": []}]}


def state(allow: bool = False) -> ControlState:
    """Endpoint m serving version 1 (signature SAME), reported by one replica."""
    st = ControlState("d", "id1", [EndpointConfig(name="m", allow_signature_change=allow)],
                      [ModelConfig(name="m", version="1", path="/models/1.onnx")], now=T0)
    st.sync(report(st, {"1": "ready"}, {"1": SAME}), now=T0)
    return st


def frozen(st: ControlState) -> tuple:
    doc = st.endpoints["m"].doc
    return (st.version, msgspec.json.encode(doc["variants"]), msgspec.json.encode(doc["policy"]),
            doc["swap"], doc["canary"], len(doc["events"]))


def test_add_variant_refuses_a_different_signature_and_changes_nothing():
    st = state()
    before = frozen(st)
    with pytest.raises(SignatureMismatchError,
                       match=r"^endpoint 'm': input 'x': datatype FP32 on the endpoint \(version 1\), FP64 on version 2;"):
        st.add_variant("m", {"version": "2", "path": "/models/2.onnx"}, now=T0 + 1, signature=FP64)
    assert frozen(st) == before


def test_a_refusal_says_how_to_allow_the_change():
    st = state()
    with pytest.raises(SignatureMismatchError, match="allow_signature_change: true"):
        st.swap("m", {"version": "2", "path": "/models/2.onnx"}, now=T0 + 1, signature=FP64)


def test_swap_refuses_a_different_signature_and_changes_nothing():
    st = state()
    before = frozen(st)
    with pytest.raises(SignatureMismatchError, match="FP64 on version 2"):
        st.swap("m", {"version": "2", "path": "/models/2.onnx"}, now=T0 + 1, signature=FP64)
    assert frozen(st) == before
    assert st.status("m")["weights"] == {"1": 1.0}


def test_a_compatible_candidate_is_taken():
    st = state()
    status = st.swap("m", {"version": "2", "path": "/models/2.onnx"}, now=T0 + 1, signature=SAME)
    assert status["swap"]["phase"] == "loading"
    assert not [e for e in status["events"] if e["kind"] == "signature"]


def test_the_request_may_allow_the_change_and_it_is_recorded():
    st = state()
    status = st.swap("m", {"version": "2", "path": "/models/2.onnx", "allow_signature_change": True},
                     now=T0 + 1, signature=FP64)
    assert status["swap"]["phase"] == "loading"
    events = [e["detail"] for e in status["events"] if e["kind"] == "signature"]
    assert events == ["signature change allowed by the request's allow_signature_change: "
                      "input 'x': datatype FP32 on the endpoint (version 1), FP64 on version 2"]


def test_the_endpoint_config_may_allow_the_change_and_it_is_recorded():
    st = state(allow=True)
    status = st.add_variant("m", {"version": "2", "path": "/models/2.onnx"}, now=T0 + 1, signature=FP64)
    assert status["variants"]["2"]["status"] == "loading"
    events = [e["detail"] for e in status["events"] if e["kind"] == "signature"]
    assert len(events) == 1 and "the endpoint config's" in events[0]


def test_allow_signature_change_must_be_a_boolean():
    st = state()
    with pytest.raises(InvalidInputError, match="allow_signature_change must be true or false"):
        st.add_variant("m", {"version": "2", "path": "/models/2.onnx", "allow_signature_change": "yes"},
                       now=T0 + 1, signature=SAME)


def test_a_candidate_unknown_before_loading_is_judged_once_loaded():
    st = state()
    st.swap("m", {"version": "2", "path": "/models/2.onnx"}, now=T0 + 1)  # no signature read in advance
    st.sync(report(st, {"1": "ready", "2": "ready"}, {"2": FP64}), now=T0 + 2)
    st.tick(now=T0 + 2)
    status = st.status("m", now=T0 + 2)
    assert status["swap"]["phase"] == "failed"
    assert "input 'x': datatype FP32 on the endpoint (version 1), FP64 on version 2" in status["swap"]["error"]
    assert "2" not in status["variants"]
    assert status["weights"] == {"1": 1.0}


def test_a_candidate_allowed_in_the_request_passes_once_loaded():
    st = state()
    st.swap("m", {"version": "2", "path": "/models/2.onnx", "allow_signature_change": True}, now=T0 + 1)
    st.sync(report(st, {"1": "ready", "2": "ready"}, {"2": FP64}), now=T0 + 2)
    st.tick(now=T0 + 2)
    status = st.status("m", now=T0 + 2)
    assert status["swap"]["phase"] == "draining"
    assert [e["kind"] for e in status["events"]].count("signature") == 1


def _with_ready_variant(signature: Signature) -> ControlState:
    st = state(allow=False)
    st.add_variant("m", {"version": "2", "path": "/models/2.onnx", "allow_signature_change": True},
                   now=T0 + 1, signature=signature)
    st.sync(report(st, {"1": "ready", "2": "ready"}, {"2": signature}), now=T0 + 2)
    st.tick(now=T0 + 2)
    assert st.status("m", now=T0 + 2)["variants"]["2"]["status"] == "ready"
    return st


def test_a_canary_of_a_different_signature_is_refused_and_changes_nothing():
    st = _with_ready_variant(FP64)
    before = frozen(st)
    with pytest.raises(SignatureMismatchError, match=r"FP32 on the endpoint \(version 1\), FP64 on version 2"):
        st.start_canary("m", {"variant": "2", "hold_s": 1}, now=T0 + 3)
    assert frozen(st) == before
    assert st.status("m", now=T0 + 3)["weights"] == {"1": 1.0}


def test_a_canary_may_allow_the_change():
    st = _with_ready_variant(FP64)
    status = st.start_canary("m", {"variant": "2", "hold_s": 1, "allow_signature_change": True}, now=T0 + 3)
    assert status["canary"]["status"] == "running"
    assert status["events"][-2]["kind"] == "signature"


def test_a_canary_of_the_same_signature_starts():
    st = _with_ready_variant(SAME)
    assert st.start_canary("m", {"variant": "2", "hold_s": 1}, now=T0 + 3)["canary"]["status"] == "running"


def test_a_removed_variants_signature_is_forgotten():
    st = _with_ready_variant(FP64)
    st.remove_variant("m", "2", now=T0 + 3)
    st.sync(report(st, {"1": "ready"}, {}), now=T0 + 4)
    st.tick(now=T0 + 4)
    assert "2" not in st.endpoints["m"].doc["signatures"]
    # the same version number, now compatible, is taken
    assert st.swap("m", {"version": "2", "path": "/models/2b.onnx"}, now=T0 + 5, signature=SAME)["swap"]


def test_signatures_read_from_artifacts_fill_in_until_a_replica_reports():
    st = ControlState("d", "id1", [], [ModelConfig(name="m", version="1", path="/models/1.onnx")], now=T0)
    assert [v for v, _ in st.unknown_signatures("m")] == ["1"]
    st.learn_signatures("m", {"1": FP64})
    assert st.unknown_signatures("m") == []
    with pytest.raises(SignatureMismatchError, match="FP64 on the endpoint"):
        st.add_variant("m", {"version": "2", "path": "/models/2.onnx"}, now=T0 + 1, signature=SAME)
    st.sync(report(st, {"1": "ready"}, {"1": SAME}), now=T0 + 1)  # the loaded model's own wins
    st.learn_signatures("m", {"1": FP64})  # and is not overwritten by a later read
    assert st.add_variant("m", {"version": "2", "path": "/models/2.onnx"}, now=T0 + 2, signature=SAME)


def test_a_loaded_variant_whose_signature_no_replica_reported_waits_instead_of_passing():
    st = state()
    st.swap("m", {"version": "2", "path": "/models/2.onnx"}, now=T0 + 1)  # nothing read in advance
    st.sync(report(st, {"1": "ready", "2": "ready"}, {}), now=T0 + 2)  # loaded, signature not reported
    st.tick(now=T0 + 2)
    status = st.status("m", now=T0 + 2)
    assert status["variants"]["2"]["status"] == "loading" and status["swap"]["phase"] == "loading"
    assert status["weights"] == {"1": 1.0}
    st.sync(report(st, {"1": "ready", "2": "ready"}, {"2": FP64}), now=T0 + 3)  # now it is judged
    st.tick(now=T0 + 3)
    status = st.status("m", now=T0 + 3)
    assert status["swap"]["phase"] == "failed" and "FP64 on version 2" in status["swap"]["error"]


def test_a_canary_between_versions_of_unknown_signature_is_refused_until_they_are_known():
    from flywheel.protocol.errors import UnavailableError

    st = _with_ready_variant(SAME)
    st.endpoints["m"].doc["signatures"].pop("1")  # as if no replica had reported version 1
    before = frozen(st)
    with pytest.raises(UnavailableError, match=r"signature of version\(s\) \['1'\] is not known yet"):
        st.start_canary("m", {"variant": "2", "hold_s": 1}, now=T0 + 3)
    assert frozen(st) == before
