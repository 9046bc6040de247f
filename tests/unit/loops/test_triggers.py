"""The public face of triggers: the registry, decoding a list, manual firings."""

from __future__ import annotations

import msgspec
import pytest

import flywheel.loops.triggers as triggers
from flywheel.loops.triggers import (
    TRIGGER_KINDS,
    DriftTrigger,
    Firing,
    NewDataTrigger,
    PerformanceTrigger,
    ScheduleTrigger,
    TriggerSpec,
    manual_firing,
    parse_triggers,
    trigger_error_message,
)
from flywheel.loops.triggers.base import register
from flywheel.protocol.errors import ConfigError

SPECS = [
    {"kind": "schedule", "every": "6h"},
    {"kind": "schedule", "cron": "0 3 * * *"},
    {"kind": "drift", "k": 3, "n": 5},
    {"kind": "new_data", "path": "s3://b/captured/*.parquet", "settle_s": "10m"},
    {"kind": "performance", "metric": "accuracy", "below": 0.9},
]


def test_every_kind_is_registered_by_its_tag():
    assert set(TRIGGER_KINDS) == {"schedule", "drift", "new_data", "performance"}
    assert TRIGGER_KINDS["drift"] is DriftTrigger


def test_trigger_spec_is_the_union_of_the_registered_kinds():
    assert set(TriggerSpec.__args__) == set(TRIGGER_KINDS.values())


def test_a_list_of_dicts_decodes_to_trigger_structs():
    got = msgspec.convert(SPECS, list[TriggerSpec])
    assert [type(t) for t in got] == [ScheduleTrigger, ScheduleTrigger, DriftTrigger, NewDataTrigger,
                                      PerformanceTrigger]
    assert got[3].settle_s == 600.0
    assert got[4].window_s == 600.0 and got[4].min_samples == 20


def test_decoded_specs_round_trip_through_json():
    got = parse_triggers(SPECS)
    assert msgspec.json.decode(msgspec.json.encode(got), type=list[TriggerSpec]) == got


def test_as_a_field_of_a_larger_spec():
    class Loop(msgspec.Struct, forbid_unknown_fields=True):
        triggers: list[TriggerSpec]  # type: ignore[valid-type]

    loop = msgspec.json.decode(b'{"triggers": [{"kind": "drift"}]}', type=Loop)
    assert loop.triggers == [DriftTrigger(k=3, n=5)]


def test_an_unknown_kind_names_the_allowed_kinds():
    with pytest.raises(ConfigError, match=r"^triggers\[1\]\.kind: unknown trigger kind 'retrain'; "
                                          r"allowed kinds: drift, new_data, performance, schedule$"):
        parse_triggers([{"kind": "drift"}, {"kind": "retrain"}])


def test_an_unknown_kind_inside_a_larger_spec():
    class Loop(msgspec.Struct):
        triggers: list[TriggerSpec]  # type: ignore[valid-type]

    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.convert({"triggers": [{"kind": "nope"}]}, Loop)
    assert trigger_error_message(info.value).startswith("triggers[0].kind: unknown trigger kind 'nope'; allowed kinds:")


def test_a_bad_field_is_named_with_its_position():
    with pytest.raises(ConfigError, match=r"^triggers\[2\]\.k: expected a count of drifted windows"):
        parse_triggers([{"kind": "drift"}, {"kind": "drift"}, {"kind": "drift", "k": 7}])


def test_a_missing_kind_is_named():
    with pytest.raises(ConfigError, match=r"^triggers\[0\]: Object missing required field `kind`"):
        parse_triggers([{"k": 3}])


def test_not_a_list():
    with pytest.raises(ConfigError, match=r"^triggers: Expected `array`, got `object`"):
        parse_triggers({"kind": "drift"})


def test_manual_firing():
    firing = manual_firing("alice", "new labels from the audit")
    assert firing == Firing(
        kind="manual",
        reason="manual: started by alice: new labels from the audit",
        detail={"actor": "alice", "note": "new labels from the audit"},
    )
    assert manual_firing("bob").reason == "manual: started by bob"


def test_firings_encode_to_json():
    firing = msgspec.json.decode(msgspec.json.encode(manual_firing("alice")), type=Firing)
    assert firing.detail["actor"] == "alice"


def test_register_refuses_a_struct_without_a_kind_tag():
    class Untagged(msgspec.Struct):
        def check(self, signals, memory, now, *, endpoint):
            return None

    with pytest.raises(TypeError, match="tag_field='kind'"):
        register(Untagged)


def test_register_refuses_a_taken_tag():
    class Again(msgspec.Struct, tag="drift", tag_field="kind"):
        def check(self, signals, memory, now, *, endpoint):
            return None

    with pytest.raises(TypeError, match="'drift' is registered already"):
        register(Again)
    assert TRIGGER_KINDS["drift"] is DriftTrigger


def test_register_refuses_a_kind_without_check():
    class NoCheck(msgspec.Struct, tag="no_check", tag_field="kind"):
        pass

    with pytest.raises(TypeError, match="needs a check"):
        register(NoCheck)
    assert "no_check" not in TRIGGER_KINDS


def test_the_public_names():
    for name in triggers.__all__:
        assert hasattr(triggers, name), name
    for name in ("Signals", "DriftWindow", "Quality", "FileInfo"):
        assert name in triggers.__all__
