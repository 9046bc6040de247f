"""The new_data trigger: a fingerprint of a listing, and the fsspec lister."""

from __future__ import annotations

import os
import uuid

import fsspec
import msgspec
import pytest

from flywheel.loops.triggers import FileInfo, NewDataTrigger, parse_triggers
from flywheel.loops.triggers.files import list_files
from flywheel.loops.triggers.fixed import FixedSignals
from flywheel.loops.triggers.new_data import MAX_REMEMBERED_FILES, fingerprint
from flywheel.protocol.errors import ConfigError

T0 = 1_796_650_000.0
A = FileInfo(path="s3://b/a.parquet", size=10, modified="1")
B = FileInfo(path="s3://b/b.parquet", size=20, modified="1")
B2 = FileInfo(path="s3://b/b.parquet", size=25, modified="2")
C = FileInfo(path="s3://b/c.parquet", size=30, modified="1")


def roundtrip(memory: dict) -> dict:
    return msgspec.json.decode(msgspec.json.encode(memory))


def check(trigger, signals, memory, now=T0):
    return trigger.check(signals, memory, now, endpoint="ep")


def test_fingerprint_ignores_order_and_sees_every_field():
    assert fingerprint([A, B]) == fingerprint([B, A])
    assert fingerprint([A, B]) != fingerprint([A, B2])
    assert fingerprint([]) != fingerprint([A])


def test_first_check_records_without_firing():
    signals, memory = FixedSignals(files=[A]), {}
    assert check(NewDataTrigger(path="s3://b/*"), signals, memory) is None
    assert memory["fingerprint"] == fingerprint([A])
    assert signals.calls == [("list_files", "s3://b/*")]


def test_an_unchanged_listing_does_not_fire():
    trigger, signals, memory = NewDataTrigger(path="s3://b/*"), FixedSignals(files=[A, B]), {}
    check(trigger, signals, memory)
    assert check(trigger, signals, memory, T0 + 60) is None


def test_a_change_fires_once_and_counts_what_changed():
    trigger, signals, memory = NewDataTrigger(path="s3://b/*"), FixedSignals(files=[A, B]), {}
    check(trigger, signals, memory)
    signals.files = [B2, C]
    firing = check(trigger, signals, memory, T0 + 60)
    assert firing is not None
    assert firing.reason == "new data at s3://b/*: 1 added, 1 changed, 1 removed (2 files)"
    assert (firing.detail["added"], firing.detail["changed"], firing.detail["removed"]) == (1, 1, 1)
    assert check(trigger, signals, memory, T0 + 120) is None


def test_an_empty_listing_is_a_fingerprint_and_the_first_file_fires():
    trigger, signals, memory = NewDataTrigger(path="s3://b/*"), FixedSignals(files=[]), {}
    assert check(trigger, signals, memory) is None
    signals.files = [A]
    assert check(trigger, signals, memory, T0 + 1) is not None


def test_memory_survives_a_json_round_trip():
    trigger, signals, memory = NewDataTrigger(path="s3://b/*"), FixedSignals(files=[A]), {}
    check(trigger, signals, memory)
    memory = roundtrip(memory)
    assert check(trigger, signals, memory, T0 + 1) is None
    signals.files = [A, B]
    firing = check(trigger, signals, roundtrip(memory), T0 + 2)
    assert firing is not None and firing.detail["added"] == 1


def test_settle_waits_until_the_listing_is_quiet():
    trigger, signals, memory = NewDataTrigger(path="s3://b/*", settle_s="5m"), FixedSignals(files=[A]), {}
    check(trigger, signals, memory)
    signals.files = [A, B]
    assert check(trigger, signals, memory, T0 + 10) is None  # first seen
    signals.files = [A, B, C]  # the writer goes on: the wait starts again
    assert check(trigger, signals, memory, T0 + 200) is None
    assert check(trigger, signals, memory, T0 + 400) is None  # 200 s quiet
    memory = roundtrip(memory)
    firing = check(trigger, signals, memory, T0 + 500)  # 300 s quiet
    assert firing is not None
    assert firing.detail["added"] == 2
    assert firing.reason.endswith(", unchanged for 5m")
    assert check(trigger, signals, memory, T0 + 900) is None


def test_settle_is_cancelled_by_a_return_to_the_recorded_listing():
    trigger, signals, memory = NewDataTrigger(path="s3://b/*", settle_s=60), FixedSignals(files=[A]), {}
    check(trigger, signals, memory)
    signals.files = [A, B]
    check(trigger, signals, memory, T0 + 10)
    signals.files = [A]
    assert check(trigger, signals, memory, T0 + 20) is None
    assert "pending" not in memory
    signals.files = [A, B]
    assert check(trigger, signals, memory, T0 + 75) is None  # a new wait, not the old one


def test_a_huge_listing_fires_with_counts_only():
    many = [FileInfo(path=f"f{i}", size=1, modified="1") for i in range(MAX_REMEMBERED_FILES + 1)]
    trigger, signals, memory = NewDataTrigger(path="s3://b/*"), FixedSignals(files=many), {}
    check(trigger, signals, memory)
    assert memory["files"] is None
    signals.files = many + [A]
    firing = check(trigger, signals, roundtrip(memory), T0 + 1)
    assert firing is not None
    assert firing.reason == f"new data at s3://b/*: {len(many)} -> {len(many) + 1} files"


def test_a_signals_error_leaves_memory_alone():
    class Broken(FixedSignals):
        def list_files(self, pattern):
            raise OSError("bucket unreachable")

    trigger, memory = NewDataTrigger(path="s3://b/*"), {}
    check(trigger, FixedSignals(files=[A]), memory)
    before = dict(memory)
    with pytest.raises(OSError):
        check(trigger, Broken(), memory, T0 + 1)
    assert memory == before


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"kind": "new_data"}, r"triggers\[0\]: Object missing required field `path`"),
        ({"kind": "new_data", "path": " "}, r"triggers\[0\]\.path: expected a local path, glob or fsspec URI"),
        ({"kind": "new_data", "path": "x", "settle_s": "-1m"}, r"triggers\[0\]\.settle_s: "),
        ({"kind": "new_data", "path": "x", "glob": "*"}, r"triggers\[0\]: Object contains unknown field `glob`"),
    ],
)
def test_bad_specs_name_the_field(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_triggers([spec])


def test_settle_s_accepts_a_duration():
    assert parse_triggers([{"kind": "new_data", "path": "x", "settle_s": "10m"}])[0].settle_s == 600.0


# --- a real folder through the fsspec lister -------------------------------


def write(path, data: bytes, mtime: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))


@pytest.fixture
def folder(tmp_path):
    write(tmp_path / "data" / "a.csv", b"1,2\n", T0)
    write(tmp_path / "data" / "part" / "b.csv", b"3,4\n", T0)
    write(tmp_path / "data" / "notes.txt", b"x", T0)
    return tmp_path / "data"


def test_list_files_of_a_folder_lists_every_file_below_it(folder):
    files = list_files(str(folder))
    assert [f.path for f in files] == [str(folder / "a.csv"), str(folder / "notes.txt"), str(folder / "part" / "b.csv")]
    assert files[0].size == 4


def test_list_files_of_a_glob(folder):
    assert [f.path for f in list_files(f"{folder}/*.csv")] == [str(folder / "a.csv")]


def test_list_files_of_a_recursive_file_uri_glob(folder):
    names = [f.path for f in list_files(f"file://{folder}/**/*.csv")]
    assert names == [str(folder / "a.csv"), str(folder / "part" / "b.csv")]


def test_list_files_of_one_file_and_of_nothing(folder):
    assert [f.path for f in list_files(str(folder / "a.csv"))] == [str(folder / "a.csv")]
    assert list_files(str(folder / "missing")) == []


def test_list_files_through_another_protocol():
    fs, root = fsspec.filesystem("memory"), f"/loops-test-{uuid.uuid4().hex}"
    fs.pipe(f"{root}/x.bin", b"abc")
    try:
        files = list_files(f"memory://{root}/*.bin")
        assert [(f.path, f.size) for f in files] == [(f"memory://{root}/x.bin", 3)]
    finally:
        fs.rm(root, recursive=True)


def test_list_files_of_an_unknown_protocol_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^path: cannot list 'nosuchproto://b/\*': Protocol not known: nosuchproto"):
        list_files("nosuchproto://b/*")


def test_new_data_on_a_real_folder(folder):
    trigger, signals, memory = NewDataTrigger(path=f"{folder}/**/*.csv"), FixedSignals(), {}
    assert check(trigger, signals, memory) is None
    write(folder / "notes.txt", b"changed", T0 + 5)  # not matched by the glob
    assert check(trigger, signals, memory, T0 + 10) is None
    write(folder / "part" / "c.csv", b"5,6\n", T0 + 20)
    write(folder / "a.csv", b"1,2\n7,8\n", T0 + 20)
    firing = check(trigger, signals, roundtrip(memory), T0 + 30)
    assert firing is not None
    assert (firing.detail["added"], firing.detail["changed"], firing.detail["removed"]) == (1, 1, 0)
    (folder / "part" / "b.csv").unlink()
    firing = check(trigger, signals, memory, T0 + 40)
    assert firing is not None and firing.detail["removed"] == 1
