"""The capture writer (serving/capture.py): sampling, rotation, the bounded
queue, close, storage errors, and its metrics."""

from __future__ import annotations

import os

import numpy as np
import pytest

from flywheel.common.capture_files import read_captured
from flywheel.serving.capture import CaptureWriter, render_capture_metrics
from flywheel.serving.config import CaptureConfig

from _poll import wait_for


def _cfg(root, **kw) -> CaptureConfig:
    kw.setdefault("sample", 1.0)
    kw.setdefault("flush_interval_s", 0.05)
    return CaptureConfig(path=str(root), **kw)


def _offer(w: CaptureWriter, i: int, rows: int = 1) -> None:
    w.offer(f"r{i}", {"x": np.full((rows, 2), i, np.float32)}, {"y": np.zeros((rows, 3), np.float32)})


def _finished(root) -> list[str]:
    d = root / "ep" / "1"
    return sorted(p for p in os.listdir(d) if p.endswith(".parquet")) if d.exists() else []


@pytest.fixture
def writers():
    made: list[CaptureWriter] = []
    yield made
    for w in made:
        w.close()


def _writer(writers, cfg, **kw) -> CaptureWriter:
    w = CaptureWriter(cfg, "ep", "1", seed=0, **kw)
    writers.append(w)
    return w


def test_sampling_takes_about_the_configured_share(tmp_path, writers):
    w = _writer(writers, _cfg(tmp_path, sample=0.1))
    taken = sum(w.sampled() for _ in range(20_000))
    assert 1_700 < taken < 2_300


def test_sample_zero_takes_nothing(tmp_path, writers):
    w = _writer(writers, _cfg(tmp_path, sample=0.0))
    assert not any(w.sampled() for _ in range(1000))


def test_files_rotate_by_rows(tmp_path, writers):
    w = _writer(writers, _cfg(tmp_path, max_file_rows=4))
    w.start()
    for i in range(5):
        _offer(w, i, rows=2)
    w.close()
    assert len(_finished(tmp_path)) == 3  # 4 + 4 + 2 rows
    assert w.rows_written == 10
    assert w.files_finished == 3


def test_files_rotate_by_age_while_the_writer_runs(tmp_path, writers):
    w = _writer(writers, _cfg(tmp_path, max_file_age_s=0.2))
    w.start()
    _offer(w, 1)
    wait_for(lambda: _finished(tmp_path), 10, "a file finished by its age")
    assert w.rows_written == 1


def test_close_writes_the_queue_and_finishes_the_open_file(tmp_path, writers):
    w = _writer(writers, _cfg(tmp_path, flush_interval_s=60, max_file_age_s=600))
    w.start()
    for i in range(3):
        _offer(w, i)
    w.close()
    assert read_captured(str(tmp_path), "ep", labelled=False).request_id.tolist() == ["r0", "r1", "r2"]
    assert not [p for p in os.listdir(tmp_path / "ep" / "1") if p.endswith(".tmp")]


def test_a_full_queue_drops_and_counts(tmp_path, writers):
    w = _writer(writers, _cfg(tmp_path, max_queue_rows=5))  # not started: nothing leaves the queue
    for i in range(4):
        _offer(w, i, rows=2)
    assert w.queued_rows == 4
    assert w.dropped["queue_full"] == 4
    w.start()
    w.close()
    assert w.rows_written == 4


def test_storage_errors_are_counted_not_raised(tmp_path, writers):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    w = _writer(writers, _cfg(blocker))
    w.start()
    _offer(w, 1, rows=3)
    w.close()
    assert w.dropped["write_error"] == 3
    assert w.rows_written == 0


def _die_with_open_file(tmp_path, writers, request: int, rows: int) -> None:
    """A writer whose process dies with ``rows`` rows in its open file."""
    dead = _writer(writers, _cfg(tmp_path, flush_interval_s=0.05, max_file_age_s=600))
    dead.start()
    _offer(dead, request, rows=rows)
    wait_for(lambda: dead.queued_rows == 0 and dead._file is not None and dead._file.rows == rows, 10,
             "rows in the open file")
    dead._file = None  # the open file stays behind, unfinished
    dead.close()


def test_a_restarted_writer_salvages_the_dead_ones_file(tmp_path, writers):
    _die_with_open_file(tmp_path, writers, 7, 2)
    assert _finished(tmp_path) == []
    fresh = _writer(writers, _cfg(tmp_path), stale_after_s=0)
    fresh.start()
    fresh.close()
    assert fresh.salvaged_rows == 2
    assert read_captured(str(tmp_path), "ep", labelled=False).request_id.tolist() == ["r7", "r7"]


def test_metrics_name_model_version_and_reason(tmp_path, writers):
    w = _writer(writers, _cfg(tmp_path, max_queue_rows=1))
    _offer(w, 1)
    _offer(w, 2)
    w.start()
    w.close()
    text = render_capture_metrics([w]).decode()
    assert 'flywheel_capture_rows_total{model="ep",version="1"} 1' in text
    assert 'flywheel_capture_dropped_rows_total{model="ep",version="1",reason="queue_full"} 1' in text
    assert 'flywheel_capture_files_total{model="ep",version="1"} 1' in text


def test_an_fsspec_uri_works_like_a_folder(writers):
    root = "memory://capture-writer-test"
    w = _writer(writers, CaptureConfig(path=root, sample=1.0, flush_interval_s=0.05))
    w.start()
    _offer(w, 3, rows=2)
    w.close()
    assert read_captured(root, "ep", labelled=False).request_id.tolist() == ["r3", "r3"]


def test_without_pyarrow_the_start_fails_with_the_install_hint(tmp_path, monkeypatch):
    import sys

    from flywheel.protocol.errors import ConfigError

    monkeypatch.setitem(sys.modules, "pyarrow", None)  # what an install without it imports
    with pytest.raises(ConfigError, match="pip install pyarrow"):
        CaptureWriter(_cfg(tmp_path), "ep", "1")


def test_labels_share_a_file_until_it_rotates(tmp_path):
    import asyncio

    from flywheel.common.capture_files import read_labels
    from flywheel.serving.capture import LabelWriter, label_rows

    async def send(writer, n):
        for i in range(n):
            await writer.write(label_rows(f"r{i}", i % 10))

    one = LabelWriter(str(tmp_path / "a"), "ep", "w1")
    asyncio.run(send(one, 50))
    assert len(list((tmp_path / "a" / "ep" / "labels").iterdir())) == 1
    assert len(read_labels(str(tmp_path / "a"), "ep")) == 50
    rotating = LabelWriter(str(tmp_path / "b"), "ep", "w1", rotate_rows=10)
    asyncio.run(send(rotating, 50))
    assert len(list((tmp_path / "b" / "ep" / "labels").iterdir())) == 5


def test_a_writer_that_started_before_the_dead_ones_file_went_stale_salvages_it_later(tmp_path, writers):
    _die_with_open_file(tmp_path, writers, 8, 3)
    fresh = _writer(writers, _cfg(tmp_path, flush_interval_s=0.05), stale_after_s=0.6)
    fresh.start()  # at its start the file may still be fresh (its writer could be alive): taken once stale
    wait_for(lambda: fresh.salvaged_rows == 3, 10, "the salvage while it runs")
    fresh.close()
    assert read_captured(str(tmp_path), "ep", labelled=False).request_id.tolist() == ["r8"] * 3
