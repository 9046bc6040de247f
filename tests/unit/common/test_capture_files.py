"""Capture files: the table layout, finishing and salvaging open files,
label files, and the captures-labels join (common/capture_files.py)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from flywheel.common.capture_files import (
    CapturedRequest, OpenCaptureFile, filesystem, labelled_accuracy, read_captured, read_labels, rows_table,
    salvage_stale, write_label_file,
)
from flywheel.protocol.errors import InvalidInputError


def _req(rid: str, x: np.ndarray, scores: np.ndarray, ts: float = 100.0) -> CapturedRequest:
    return CapturedRequest(rid, ts, {"x": x}, {"y": scores})


def _write(root, reqs, *, version="1", writer="w", seq=1, finish=True):
    fs, base = filesystem(str(root))
    table = rows_table(reqs, "ep", version)
    f = OpenCaptureFile(fs, os.path.join(base, "ep", version), writer, seq, table.schema)
    f.write(table)
    return f.finish() if finish else f


def test_a_batched_request_becomes_one_row_per_row():
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    table = rows_table([_req("a", x, np.eye(3, dtype=np.float32))], "ep", "1")
    assert table.column("request_id").to_pylist() == ["a", "a", "a"]
    assert table.column("row").to_pylist() == [0, 1, 2]
    assert table.column("in.x").to_pylist()[1] == [2.0, 3.0]
    assert table.column("in.x.shape").to_pylist() == [[2], [2], [2]]


def test_finished_file_reads_back_with_shapes(tmp_path):
    x = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    _write(tmp_path, [_req("a", x, np.eye(2, dtype=np.float32)), _req("b", x[:1] + 10, np.eye(2, dtype=np.float32)[:1])])
    cap = read_captured(str(tmp_path), "ep", labelled=False)
    assert cap.request_id.tolist() == ["a", "a", "b"]
    assert cap.inputs["x"].shape == (3, 2, 2)
    assert np.array_equal(cap.inputs["x"][2], x[0] + 10)
    assert cap.version.tolist() == ["1", "1", "1"]
    assert np.isnan(cap.labels).all()


def test_bytes_tensors_round_trip(tmp_path):
    words = np.array([[b"hi"], [b"there"]], dtype=object)
    _write(tmp_path, [CapturedRequest("a", 1.0, {"s": words}, {"n": np.array([[1], [2]], np.int64)})])
    cap = read_captured(str(tmp_path), "ep", labelled=False)
    assert cap.inputs["s"][:, 0].tolist() == [b"hi", b"there"]
    assert cap.outputs["n"][:, 0].tolist() == [1, 2]


def test_open_and_tmp_files_are_not_read(tmp_path):
    _write(tmp_path, [_req("open", np.zeros((1, 2), np.float32), np.zeros((1, 3), np.float32))], finish=False)
    (tmp_path / "ep" / "1" / "captures-1-2-x-000009.parquet.tmp").write_bytes(b"partial")
    assert len(read_captured(str(tmp_path), "ep", labelled=False)) == 0


def test_since_and_until_select_by_row_time(tmp_path):
    reqs = [_req(f"r{t}", np.zeros((1, 2), np.float32), np.zeros((1, 3), np.float32), ts=t) for t in (10, 20, 30)]
    _write(tmp_path, reqs)
    cap = read_captured(str(tmp_path), "ep", since=15, until=30, labelled=False)
    assert cap.request_id.tolist() == ["r20"]


def test_labels_join_by_request_and_row(tmp_path):
    x = np.arange(4, dtype=np.float32).reshape(2, 2)
    _write(tmp_path, [_req("a", x, np.eye(2, dtype=np.float32)), _req("b", x[:1], np.eye(2, dtype=np.float32)[:1])])
    write_label_file(str(tmp_path), "ep", [
        {"request_id": "a", "row": 1, "label": 1, "ts": 1.0},
        {"request_id": "b", "row": -1, "label": 0, "ts": 1.0},
        {"request_id": "zzz", "row": -1, "label": 5, "ts": 1.0},
    ], "u", 1)
    cap = read_captured(str(tmp_path), "ep")
    assert list(zip(cap.request_id.tolist(), cap.row.tolist(), cap.labels.tolist())) == [("a", 1, 1), ("b", 0, 0)]
    assert cap.labels.dtype == np.int64


def test_the_latest_label_wins_and_parquet_label_files_count(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_label_file(str(tmp_path), "ep", [{"request_id": "a", "row": -1, "label": 1, "ts": 5.0}], "u", 1)
    pq.write_table(pa.table({"request_id": ["a"], "label": [2], "ts": [9.0]}),
                   tmp_path / "ep" / "labels" / "mine.parquet")
    (tmp_path / "ep" / "labels" / "later.jsonl.tmp").write_text(json.dumps(
        {"request_id": "a", "label": 3, "ts": 99.0}) + "\n")
    assert read_labels(str(tmp_path), "ep") == {("a", -1): 2.0}


def test_labelled_accuracy_is_argmax_against_label(tmp_path):
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], np.float32)
    _write(tmp_path, [_req("a", np.zeros((3, 2), np.float32), scores)])
    write_label_file(str(tmp_path), "ep", [{"request_id": "a", "row": i, "label": lab, "ts": 1.0}
                                           for i, lab in enumerate([0, 1, 1])], "u", 1)
    n, acc = labelled_accuracy(str(tmp_path), "ep", since=0)
    assert n == 3
    assert acc == pytest.approx(2 / 3)


def test_labelled_accuracy_without_labels_is_none(tmp_path):
    _write(tmp_path, [_req("a", np.zeros((1, 2), np.float32), np.zeros((1, 2), np.float32))])
    assert labelled_accuracy(str(tmp_path), "ep", since=0) == (0, None)


def test_labelled_accuracy_names_an_unknown_output(tmp_path):
    _write(tmp_path, [_req("a", np.zeros((1, 2), np.float32), np.zeros((1, 2), np.float32))])
    write_label_file(str(tmp_path), "ep", [{"request_id": "a", "row": -1, "label": 0, "ts": 1.0}], "u", 1)
    with pytest.raises(InvalidInputError, match="'nope' was not captured"):
        labelled_accuracy(str(tmp_path), "ep", since=0, output="nope")


def test_salvage_finishes_a_dead_writers_open_file(tmp_path):
    f = _write(tmp_path, [_req("a", np.zeros((2, 2), np.float32), np.zeros((2, 3), np.float32))],
               writer="dead", finish=False)
    fs, base = filesystem(str(tmp_path))
    assert salvage_stale(fs, os.path.join(base, "ep", "1"), stale_after_s=0, own_writer="new") == 2
    assert not os.path.exists(f.path)
    assert read_captured(str(tmp_path), "ep", labelled=False).request_id.tolist() == ["a", "a"]


def test_salvage_leaves_a_recent_open_file(tmp_path):
    f = _write(tmp_path, [_req("a", np.zeros((1, 2), np.float32), np.zeros((1, 3), np.float32))],
               writer="live", finish=False)
    fs, base = filesystem(str(tmp_path))
    assert salvage_stale(fs, os.path.join(base, "ep", "1"), stale_after_s=3600, own_writer="new") == 0
    assert os.path.exists(f.path)


def test_salvage_keeps_the_whole_batches_of_a_torn_file(tmp_path):
    f = _write(tmp_path, [_req("a", np.zeros((1, 2), np.float32), np.zeros((1, 3), np.float32))],
               writer="torn", finish=False)
    f.write(rows_table([_req("b", np.ones((1, 2), np.float32), np.zeros((1, 3), np.float32))], "ep", "1"))
    size = os.path.getsize(f.path)
    with open(f.path, "r+b") as fh:  # the process died in the middle of its second batch
        fh.truncate(size - 20)
    fs, base = filesystem(str(tmp_path))
    assert salvage_stale(fs, os.path.join(base, "ep", "1"), stale_after_s=0, own_writer="new") == 1
    assert read_captured(str(tmp_path), "ep", labelled=False).request_id.tolist() == ["a"]


def test_label_batches_append_to_one_growing_file_and_a_torn_line_waits(tmp_path):
    from flywheel.common.capture_files import append_label_rows

    for i in range(3):
        path, appended = append_label_rows(str(tmp_path), "ep", [{"request_id": f"r{i}", "label": i, "ts": 1.0}],
                                           "w1", 1, 100.0)
        assert appended
    assert [p.name for p in (tmp_path / "ep" / "labels").iterdir()] == ["labels-0000000100000-w1-000001.jsonl"]
    with open(path, "ab") as f:  # a writer caught mid-line
        f.write(b'{"request_id": "r3", "lab')
    assert read_labels(str(tmp_path), "ep") == {("r0", -1): 0.0, ("r1", -1): 1.0, ("r2", -1): 2.0}


def test_on_an_object_store_each_label_batch_is_a_finished_file():
    import fsspec

    from flywheel.common.capture_files import append_label_rows

    root = "memory://labels-test"
    for i in range(2):
        _, appended = append_label_rows(root, "ep", [{"request_id": f"r{i}", "label": i, "ts": 1.0}], "w1", i + 1,
                                        100.0)
        assert not appended
    fs = fsspec.filesystem("memory")
    assert len(fs.ls("/labels-test/ep/labels")) == 2
    assert read_labels(root, "ep") == {("r0", -1): 0.0, ("r1", -1): 1.0}
    fs.rm("/labels-test", recursive=True)
