"""A deploy config's ``loops:``: everything a loop needs is checked when the
config loads, and the error names the field."""

from __future__ import annotations

import pytest

from flywheel.protocol.errors import ConfigError
from flywheel.serving import parse_config

JOB = {"name": "digits", "model": {"architecture": "mlp", "hparams": {}}}
CAPTURE = {"path": "/tmp/captures"}


def config(*loops, endpoints=({"name": "digits", "capture": CAPTURE},)):
    return {"models": [{"name": "digits", "path": "x.onnx"}, {"name": "other", "path": "y.onnx"}],
            "endpoints": list(endpoints), "loops": list(loops)}


def loop(**fields):
    return {"name": "keep", "endpoint": "digits", "job": JOB, **fields}


def test_a_loop_loads_with_its_triggers_and_defaults():
    cfg = parse_config(config(loop(triggers=[{"kind": "drift", "k": 2, "n": 4},
                                             {"kind": "schedule", "cron": "0 3 * * *"}])))
    (spec,) = cfg.loops
    assert [type(t).__name__ for t in spec.triggers] == ["DriftTrigger", "ScheduleTrigger"]
    assert spec.model_name == "digits"
    assert spec.guards.cooldown_s == 3600.0


def test_capture_on_the_model_is_enough_for_captured_data():
    data = {"models": [{"name": "digits", "path": "x.onnx", "capture": CAPTURE}], "loops": [loop()]}
    assert parse_config(data).loops[0].data.captured


@pytest.mark.parametrize("data, fragment", [
    (config(loop(endpoint="nope")), "loops.keep.endpoint 'nope' names no model"),
    (config(loop(), loop()), "loops: the name 'keep' is listed twice"),
    (config(loop(), loop(name="again")), "loops.again.endpoint: 'digits' already has a loop"),
    (config(loop(canary={"steps": [50, 10]})), "loops.keep.canary: canary.steps"),
    (config(loop(canary={"gates": {"nope": 1}})), "loops.keep.canary"),
    (config(loop(canary={"promote": False})), "loops.keep.canary.promote must stay true"),
    (config(loop(), endpoints=()), "loops.keep.data.captured: endpoint 'digits' has no capture"),
    (config(loop(job={"name": "x"})), "loops.keep.job"),
    (config(loop(triggers=[{"kind": "schedule", "cron": "61 * * * *"}])), "minute"),
    (config(loop(triggers=[{"kind": "retrain"}])), "retrain"),
    (config(loop(notify=[{"url": "http://127.0.0.1:9/hook", "secret_file": "/nonexistent/secret"}])),
     "loops.keep.notify[0].secret_file: cannot read"),
    (config(loop(notify=[{"url": "ftp://example"}])), "url"),
    (config(loop(guards={"daily_budget": 0})), "daily_budget"),
    (config(loop(data={"captured_fraction": 0})), "captured_fraction"),
])
def test_a_bad_loop_is_refused_naming_the_field(data, fragment):
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert fragment in info.value.message
