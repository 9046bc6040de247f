"""The per-batch functions of streamed datasets (training/stream_rows.py)
and the driver's pure helpers (training/streamed.py), on real files, with
no Ray: the split, Parquet/CSV columns, .npy chunks, PNG decoding, the
user transform's contract, file listings and fingerprints."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from flywheel.protocol.errors import ConfigError, InvalidInputError
from flywheel.training.data import JobData, load_data
from flywheel.training.spec import DatasetSpec
from flywheel.training.stream_rows import (
    apply_transform,
    held_out,
    image_rows,
    index_keys,
    npy_rows,
    path_keys,
    split_counts,
    table_rows,
    value_keys,
)
from flywheel.training.streamed import files_fingerprint, list_files


def test_the_split_holds_out_about_the_fraction_and_the_same_rows_every_time():
    keys = index_keys(3, 0, 20_000)
    val = held_out(keys, seed=7, fraction=0.2)
    assert 0.18 < val.mean() < 0.22
    assert np.array_equal(val, held_out(keys, seed=7, fraction=0.2))
    assert not np.array_equal(val, held_out(keys, seed=8, fraction=0.2))  # the seed decides
    assert not held_out(keys, seed=7, fraction=0.0).any()


def test_a_row_split_by_chunks_is_the_split_of_the_whole_file():
    whole = held_out(index_keys(0, 0, 100), 1, 0.3)
    parts = np.concatenate([held_out(index_keys(0, a, 25), 1, 0.3) for a in range(0, 100, 25)])
    assert np.array_equal(whole, parts)


def test_equal_rows_get_equal_keys_and_different_rows_different_ones():
    x = np.array([[1.0, 2.0], [1.0, 2.0], [2.0, 1.0]], np.float32)
    keys = value_keys(x, np.array([0, 0, 0]))
    assert keys[0] == keys[1]
    assert keys[0] != keys[2]
    assert value_keys(x[:1], np.array([1]))[0] != keys[0]  # the label counts too


def test_path_keys_depend_on_the_path_only():
    assert np.array_equal(path_keys(["a/1.png", "b/2.png"]), path_keys(["a/1.png", "b/2.png"]))
    assert path_keys(["a/1.png"])[0] != path_keys(["a/2.png"])[0]


def _columns(n: int = 200) -> dict:
    rng = np.random.default_rng(0)
    return {"a": rng.random(n), "b": rng.random(n), "label": rng.integers(0, 3, n)}


def test_table_rows_of_both_splits_are_every_row_once():
    cols = _columns()
    kw = {"features": ["a", "b"], "label": "label", "regression": False, "seed": 0, "fraction": 0.25}
    train, val = table_rows(cols, split="train", **kw), table_rows(cols, split="validation", **kw)
    assert len(train["y"]) + len(val["y"]) == 200
    assert train["x"].dtype == np.float32 and train["x"].shape[1] == 2
    assert train["y"].dtype == np.int64
    got = sorted(map(tuple, np.concatenate([train["x"], val["x"]]).tolist()))
    assert got == sorted(map(tuple, np.stack([cols["a"], cols["b"]], 1).astype(np.float32).tolist()))
    counts = split_counts(cols, **kw)
    assert counts["train"] == [len(train["y"])]
    assert counts["validation"] == [len(val["y"])]
    assert counts["max_label"] == [2.0]


@pytest.mark.parametrize(("change", "kw", "message"), [
    ({}, {"label": "target"}, "dataset.label 'target' is not a column"),
    ({}, {"features": ["a", "zz"]}, r"dataset.features \['zz'\] are not columns"),
    ({"a": np.array(["x"] * 200, dtype=object)}, {}, "dataset.features must be numeric"),
    ({"label": np.full(200, 0.5)}, {}, "must hold integer class ids"),
    ({"label": np.full(200, -1)}, {}, "class ids must be >= 0"),
])
def test_table_rows_name_the_bad_column(change, kw, message):
    args = {"features": ["a", "b"], "label": "label", "regression": False, "seed": 0, "fraction": 0.2,
            "split": "train", **kw}
    with pytest.raises(InvalidInputError, match=message):
        table_rows({**_columns(), **change}, **args)


def test_regression_labels_become_float32_and_must_be_finite():
    cols = {**_columns(), "label": np.linspace(0, 1, 200)}
    out = table_rows(cols, features=["a"], label="label", regression=True, split="train", seed=0, fraction=0)
    assert out["y"].dtype == np.float32 and len(out["y"]) == 200
    with pytest.raises(InvalidInputError, match="finite"):
        table_rows({**cols, "label": np.full(200, np.nan)}, features=["a"], label="label", regression=True,
                   split="train", seed=0, fraction=0)


def test_npy_rows_read_their_chunk_of_the_pair(tmp_path):
    x = np.arange(40 * 3, dtype=np.float64).reshape(40, 3)
    y = np.arange(40) % 4
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    chunk = {"features": np.array([str(tmp_path / "x.npy")] * 2), "labels": np.array([str(tmp_path / "y.npy")] * 2),
             "file": np.array([0, 0]), "start": np.array([0, 20]), "stop": np.array([20, 40])}
    kw = {"regression": False, "seed": 1, "fraction": 0.3}
    train, val = npy_rows(chunk, split="train", **kw), npy_rows(chunk, split="validation", **kw)
    assert train["x"].dtype == np.float32
    assert len(train["y"]) + len(val["y"]) == 40
    rows = np.concatenate([train["x"], val["x"]])
    assert sorted(rows[:, 0].tolist()) == x[:, 0].tolist()
    # every row keeps its own label
    both = np.concatenate([train["y"], val["y"]])
    assert np.array_equal(both, (rows[:, 0] // 3).astype(np.int64) % 4)
    assert np.array_equal(val["x"][:, 0] // 3, np.flatnonzero(held_out(index_keys(0, 0, 40), 1, 0.3)))


def test_images_decode_to_channels_first_floats_at_the_asked_size(tmp_path):
    Image.fromarray(np.full((4, 6, 3), [255, 0, 51], np.uint8), mode="RGB").save(tmp_path / "a.png")
    Image.fromarray(np.full((10, 10), 255, np.uint8), mode="L").save(tmp_path / "b.png")
    batch = {"path": np.array([str(tmp_path / "a.png"), str(tmp_path / "b.png")]), "label": np.array([1, 0])}
    rgb = image_rows(batch, size=(5, 7), mode="rgb")
    assert rgb["x"].shape == (2, 3, 5, 7) and rgb["x"].dtype == np.float32
    assert np.allclose(rgb["x"][0, :, 2, 3], [1.0, 0.0, 0.2])
    assert rgb["y"].tolist() == [1, 0]
    gray = image_rows(batch, size=(2, 2), mode="grayscale")
    assert gray["x"].shape == (2, 1, 2, 2)
    assert np.allclose(gray["x"][1], 1.0)


def test_an_undecodable_image_is_named(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(InvalidInputError, match="bad.png"):
        image_rows({"path": np.array([str(tmp_path / "bad.png")]), "label": np.array([0])}, size=(2, 2), mode="rgb")


def test_a_transform_must_keep_the_batch_shape():
    x = np.zeros((4, 1, 2, 2), np.float32)
    assert apply_transform(lambda b: b + 1, x).max() == 1.0
    with pytest.raises(ConfigError, match=r"dataset.transform must return a NumPy array of the batch's shape"):
        apply_transform(lambda b: b[:2], x)
    with pytest.raises(ConfigError, match="returned list"):
        apply_transform(lambda b: [1], x)


def test_files_are_listed_sorted_and_a_missing_one_is_named(tmp_path):
    for name in ("b.npy", "a.npy", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert list_files(str(tmp_path), (".npy",), "dataset.path") == [str(tmp_path / "a.npy"), str(tmp_path / "b.npy")]
    assert list_files(str(tmp_path / "*.txt"), (".npy",), "dataset.path") == [str(tmp_path / "notes.txt")]
    with pytest.raises(InvalidInputError, match=r"dataset.labels_path '.*nothing': no .npy files"):
        list_files(str(tmp_path / "nothing"), (".npy",), "dataset.labels_path")


def test_the_fingerprint_changes_with_a_file_and_with_what_reads_it(tmp_path):
    f = tmp_path / "a.npy"
    f.write_bytes(b"12")
    first = files_fingerprint("npy", [str(f)])
    assert files_fingerprint("npy", [str(f)]) == first
    assert files_fingerprint("npy", [str(f)], "other") != first
    f.write_bytes(b"123")
    assert files_fingerprint("npy", [str(f)]) != first
    os.utime(f, ns=(1, 1))
    changed = files_fingerprint("npy", [str(f)])
    os.utime(f, ns=(2, 2))
    assert files_fingerprint("npy", [str(f)]) != changed


def test_job_data_counts_come_from_metadata_when_streamed():
    x = np.zeros((2, 4), np.float32)
    y = np.array([0, 1])
    memory = JobData(x, y, x[:1], np.array([4]), "f", "rows")
    assert (memory.n_train, memory.n_val, memory.n_classes, memory.streamed) == (2, 1, 5, False)
    streamed = JobData(x, y, x[:0], y[:0], "f", "rows", train_rows=1000, val_rows=200, classes=7,
                       row_shape=(1, 2, 2), datasets={"train": None, "validation": None})
    assert (streamed.n_train, streamed.n_val, streamed.n_classes, streamed.streamed) == (1000, 200, 7, True)


@pytest.mark.parametrize("spec", [DatasetSpec(kind="npy", path="x", labels_path="y"),
                                  DatasetSpec(kind="images", path="x", image_size=(8, 8))])
def test_streamed_only_kinds_are_not_loaded_into_memory(spec):
    with pytest.raises(InvalidInputError, match="streamed to the training workers"):
        load_data(spec, seed=0)


@pytest.mark.parametrize("kind", ["parquet", "csv"])
def test_the_driver_reads_only_the_first_rows_of_a_table(tmp_path, kind):
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    from flywheel.training.streamed import table_head

    table = pa.table({"a": np.arange(1000, dtype=np.float64), "label": np.arange(1000) % 3})
    path = tmp_path / f"t.{kind}"
    pq.write_table(table, path, row_group_size=100) if kind == "parquet" else pcsv.write_csv(table, path)
    head = table_head(kind, str(path), 16)
    assert list(head) == ["a", "label"]
    assert head["a"].tolist() == list(range(16))
    out = table_rows(head, features=["a"], label="label", regression=False, split="train", seed=0, fraction=0)
    assert out["y"].tolist() == [i % 3 for i in range(16)]
